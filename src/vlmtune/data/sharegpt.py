"""Read multimodal ShareGPT data (LLaMA-Factory's format) into typed samples; errors name file:line.

Two spellings are accepted, in JSON (a list) or JSONL (an object per line):
``{"messages": [{"role": "user", "content": "<image>..."}, ...], "images": ["a.png"]}`` and
``{"conversations": [{"from": "human", "value": "<image>..."}, {"from": "gpt", ...}], "images": [...]}``.
Image paths are relative to the data file's folder (absolute paths are kept).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_PLACEHOLDER = "<image>"

ROLE_ALIASES = {
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant",
    "system": "system",
}


class DataError(ValueError):
    """Problems found in a data file, each naming its place."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = "\n".join(f"  - {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} data problem(s):\n{shown}{more}")


@dataclass
class Sample:
    """One conversation: messages as (role, content) and the images its placeholders refer to."""

    messages: list[tuple[str, str]]
    images: list[Path] = field(default_factory=list)
    where: str = ""  # "file:line" or "file[index]", used in every message about this sample


@dataclass
class Format:
    """Column and tag names (dataset_info.json's ``columns`` and ``tags``)."""

    messages: str | None = None  # None: whichever of messages / conversations is present
    images: str = "images"
    system: str | None = None
    role_tag: str | None = None
    content_tag: str | None = None
    user_tag: str | None = None
    assistant_tag: str | None = None
    system_tag: str | None = None


def _records(path: Path) -> list[tuple[str, object]]:
    """(place, parsed object) for each record of a JSON or JSONL file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError([f"{path}: not UTF-8 text ({e.reason} at byte {e.start})"]) from e
    stripped = text.lstrip()
    if path.suffix == ".json" or stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError([f"{path}:{e.lineno}: bad JSON: {e.msg}"]) from e
        if not isinstance(data, list):
            raise DataError([f"{path}: a .json data file must hold a list of samples, found {type(data).__name__}"])
        return [(f"{path}[{i}]", obj) for i, obj in enumerate(data)]
    records, problems = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{lineno}: bad JSON line: {e.msg}")
    if problems:
        raise DataError(problems)
    return records


def _role(raw: str, fmt: Format) -> str | None:
    custom = {fmt.user_tag: "user", fmt.assistant_tag: "assistant", fmt.system_tag: "system"}
    return custom.get(raw) if raw in custom and raw is not None else ROLE_ALIASES.get(raw)


def parse_record(obj: object, where: str, base: Path, fmt: Format) -> tuple[Sample | None, list[str]]:
    """One record -> a Sample, or the list of problems that prevent it."""
    if not isinstance(obj, dict):
        return None, [f"{where}: a sample must be a JSON object, found {type(obj).__name__}"]
    key = fmt.messages or ("messages" if "messages" in obj else "conversations")
    turns = obj.get(key)
    if not isinstance(turns, list) or not turns:
        return None, [f"{where}: no '{key}' list of turns (expected 'messages' or 'conversations')"]
    first = turns[0] if isinstance(turns[0], dict) else {}
    role_key = fmt.role_tag or ("role" if key == "messages" or "role" in first else "from")
    content_key = fmt.content_tag or ("content" if role_key == "role" else "value")
    problems: list[str] = []
    messages: list[tuple[str, str]] = []
    turn_of: list[str] = []  # how each message is named in errors: its turn index in the file
    if fmt.system and obj.get(fmt.system):
        messages.append(("system", str(obj[fmt.system])))
        turn_of.append(f"'{fmt.system}'")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            problems.append(f"{where}: turn {i} is not an object")
            continue
        role = _role(str(turn.get(role_key)), fmt)
        if role is None:
            problems.append(f"{where}: turn {i} has role {turn.get(role_key)!r}; valid: user/human, assistant/gpt, system")
            continue
        content = turn.get(content_key)
        if not isinstance(content, str):
            problems.append(f"{where}: turn {i} has no text '{content_key}'")
            continue
        messages.append((role, content))
        turn_of.append(str(i))
    if problems:
        return None, problems
    body = [r for r, _ in messages if r != "system"]
    if any(r == "system" for r, _ in messages[1:]) or not body:
        problems.append(f"{where}: a system message may only come first, and a conversation needs user and assistant turns")
    elif any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(body)):
        problems.append(f"{where}: roles out of order ({' -> '.join(body)}); expected user, assistant, user, assistant, ...")
    elif body[-1] != "assistant":
        problems.append(f"{where}: the last turn is from the user; a training sample ends with an assistant answer")
    for turn, (role, content) in zip(turn_of, messages):
        if role == "assistant" and not content.strip():
            problems.append(f"{where}: assistant turn {turn} is empty")
    raw_images = obj.get(fmt.images) or []
    if isinstance(raw_images, str):
        raw_images = [raw_images]
    images = [Path(p) if Path(p).is_absolute() else base / p for p in raw_images]
    n_placeholders = sum(c.count(IMAGE_PLACEHOLDER) for _, c in messages)
    if n_placeholders != len(images):
        problems.append(f"{where}: {n_placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s) but {len(images)} image(s); each image needs one placeholder where it appears")
    for p in images:
        if not p.is_file():
            problems.append(f"{where}: image '{p}' does not exist")
    if problems:
        return None, problems
    return Sample(messages=messages, images=images, where=where), []


def read_samples(path: str | Path, fmt: Format | None = None) -> list[Sample]:
    """Reads every sample of one data file.

    Raises:
        DataError: the file is missing or unreadable, or any sample is bad; every problem is listed.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError([f"data file '{p}' does not exist"])
    fmt = fmt or Format()
    samples, problems = [], []
    for where, obj in _records(p):
        sample, errs = parse_record(obj, where, p.parent, fmt)
        problems += errs
        if sample is not None:
            samples.append(sample)
    if problems:
        raise DataError(problems)
    if not samples:
        raise DataError([f"{p}: holds no samples"])
    return samples
