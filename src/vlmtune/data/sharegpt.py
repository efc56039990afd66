"""Read multimodal ShareGPT data (LLaMA-Factory's format) into typed samples; every problem names its place.

Two spellings are accepted, in JSON (a list) or JSONL (an object per line):
``{"messages": [{"role": "user", "content": "<image>..."}, ...], "images": ["a.png"]}`` and
``{"conversations": [{"from": "human", "value": "<image>..."}, {"from": "gpt", ...}], "images": [...]}``.
Image paths are relative to the data file's folder (absolute paths are kept). Videos likewise: ``"videos": ["a.mp4"]``
with a ``<video>`` placeholder each, a path being a video file or a folder of frame images. Audio is refused.

Reading streams: ``read_file`` yields each sample or problem in file order (JSONL a line at a time), so a
100k-sample file is checked without holding it; ``read_samples`` collects a file and raises once with every problem.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vlmtune.data.formats import IMAGE_PLACEHOLDER, KTO_LABEL, REJECTED, Format, RecordError, canonical
from vlmtune.data.formats import VIDEO_PLACEHOLDER as VIDEO_PLACEHOLDER  # re-exported: readers name both here

ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "system": "system",
}

# Every kind of problem, in the order summaries list them: kind -> what it means.
KINDS: dict[str, str] = {
    "file missing": "a data file (or dataset name) that does not exist",
    "bad JSON": "a JSON file or JSONL line that does not parse, or a file that is not a list of samples",
    "unreadable dataset": "a Parquet / Arrow file or datasets folder that cannot be read as a dataset",
    "not UTF-8": "bytes that are not UTF-8 text",
    "no samples": "a data file without a single sample",
    "bad sample": "a record that is not a conversation (not an object, no turns, a turn without text)",
    "role": "a turn whose role is missing or unknown",
    "roles out of order": "turns not alternating user, assistant (system first only, ending with an answer)",
    "empty answer": "an assistant turn with no text",
    "image in answer": "an '<image>' placeholder in an assistant turn (images belong to user turns)",
    "video in answer": "a '<video>' placeholder in an assistant turn (videos belong to user turns)",
    "control token": "a chat template's control token typed as text (<|im_end|>, an image pad, ...)",
    "image count": "'<image>' placeholders not matching the number of images",
    "image missing": "an image file that does not exist",
    "image unreadable": "an image that cannot be opened or fully decoded (corrupt or truncated)",
    "image too small": "an image smaller than the processor's minimum",
    "video count": "'<video>' placeholders not matching the number of videos",
    "video missing": "a video file or frames folder that does not exist",
    "video unreadable": "a video that cannot be opened or fully decoded, or a folder without frame images",
    "video unsupported": "a video for a model whose processor takes none (videos train Qwen2-VL and Qwen2.5-VL)",
    "not a pair": "a sample without a rejected answer where the method (dpo) trains preference pairs",
    "no label": "a sample without a desirable / undesirable label (kto_tag) where the method (kto) needs one",
    "labelled data": "a KTO-labelled answer (kto_tag) for a method that does not read labels (sft, grpo)",
    "pair data": "a preference pair for a method that would ignore its rejected answer (grpo)",
    "same answers": "a preference pair whose chosen and rejected answers are the same text (it teaches nothing)",
    "too long": "a sample over data.max_length, image and video tokens included (handled by data.too_long)",
    "duplicate": "the same messages and images as an earlier sample",
}
# Kinds that a run survives without data.on_bad_sample: too-long samples follow data.too_long, duplicates train twice,
# a pair of equal answers adds nothing to the preference loss.
WARNING_KINDS = frozenset({"too long", "duplicate", "same answers"})


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data, at its place (``file:line``, ``file[index]`` or a file)."""

    where: str
    kind: str
    message: str
    whole_file: bool = False  # about a whole source (missing, unparsable JSON list): never skipped

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message

    @property
    def is_error(self) -> bool:
        return self.kind not in WARNING_KINDS

    def to_dict(self) -> dict:
        return {"where": self.where, "kind": self.kind, "message": self.message}


class DataError(ValueError):
    """Problems found in data, each naming its place; ``problems`` as text, ``found`` as Problems."""

    def __init__(self, problems: list[str | Problem]):
        self.found = [p if isinstance(p, Problem) else Problem("", "bad sample", p) for p in problems]
        self.problems = [str(p) for p in problems]
        shown = "\n".join(f"  - {p}" for p in self.problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} data problem(s):\n{shown}{more}")


@dataclass
class Sample:
    """One conversation: messages as (role, content) ending with an answer, the images and videos its placeholders
    refer to, and for preference data the rejected alternative to that answer or the answer's KTO label."""

    messages: list[tuple[str, str]]
    images: list[Path] = field(default_factory=list)
    where: str = ""  # "file:line" or "file[index]", used in every message about this sample
    source: int = 0  # which source of its split it came from (data.train's order), for weighted mixing
    videos: list[Path] = field(default_factory=list)  # video files or folders of frames, in placeholder order
    # A preference pair: the rejected answer's text, the alternative to the last assistant turn (the chosen answer).
    rejected: str | None = None
    # KTO: True when the last assistant turn is a desirable answer, False when undesirable; None: not labelled.
    kto_label: bool | None = None


def is_json_list(path: Path) -> bool:
    """A ``.json`` file, or any file whose first non-blank character is ``[``, holds one JSON list."""
    if path.suffix == ".json":
        return True
    with path.open("rb") as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip().removeprefix(b"\xef\xbb\xbf").lstrip()
            if stripped:
                return stripped.startswith(b"[")
    return False


def iter_records(path: Path) -> Iterator[tuple[str, object] | Problem]:
    """(place, parsed object) for each record of a JSON or JSONL file, or a Problem where one does not parse.

    JSONL is read a line at a time; a bad or non-UTF-8 line is reported at its line and reading goes on.
    """
    if is_json_list(path):
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            yield Problem(str(path), "not UTF-8", f"not UTF-8 text ({e.reason} at byte {e.start})", whole_file=True)
            return
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            yield Problem(f"{path}:{e.lineno}", "bad JSON", f"bad JSON: {e.msg}", whole_file=True)
            return
        if not isinstance(data, list):
            yield Problem(
                str(path),
                "bad JSON",
                f"a .json data file must hold a list of samples, found {type(data).__name__}",
                whole_file=True,
            )
            return
        for i, obj in enumerate(data):
            yield f"{path}[{i}]", obj
        return
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield Problem(where, "not UTF-8", f"not UTF-8 text ({e.reason} at byte {e.start} of the line)")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield Problem(where, "bad JSON", f"bad JSON line: {e.msg} at column {e.colno}")


def count_records(path: Path) -> int | None:
    """Lines of a JSONL file (an upper bound on its samples, for a progress bar); None for a JSON list."""
    if not path.is_file() or is_json_list(path):
        return None
    n = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
    return n


def _role(raw: str, fmt: Format) -> str | None:
    custom = {fmt.user_tag: "user", fmt.assistant_tag: "assistant", fmt.system_tag: "system"}
    return custom.get(raw) if raw in custom and raw is not None else ROLE_ALIASES.get(raw)


def parse_record(obj: object, where: str, base: Path, fmt: Format) -> tuple[Sample | None, list[Problem]]:
    """One record -> a Sample, or the problems that prevent it (every one, each with its kind)."""

    def problem(kind: str, message: str) -> Problem:
        return Problem(where, kind, message)

    if not isinstance(obj, dict):
        return None, [problem("bad sample", f"a sample must be a JSON object, found {type(obj).__name__}")]
    try:
        obj, fmt = canonical(obj, fmt)
    except RecordError as e:
        return None, [problem("bad sample", str(e))]
    key = fmt.messages or ("messages" if "messages" in obj else "conversations")
    turns = obj.get(key)
    if not isinstance(turns, list) or not turns:
        return None, [problem("bad sample", f"no '{key}' list of turns (expected 'messages' or 'conversations')")]
    first = turns[0] if isinstance(turns[0], dict) else {}
    role_key = fmt.role_tag or ("role" if key == "messages" or "role" in first else "from")
    content_key = fmt.content_tag or ("content" if role_key == "role" else "value")
    problems: list[Problem] = []
    messages: list[tuple[str, str]] = []
    turn_of: list[str] = []  # how each message is named in errors: its turn index in the file
    if fmt.system and obj.get(fmt.system):
        messages.append(("system", str(obj[fmt.system])))
        turn_of.append(f"'{fmt.system}'")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            problems.append(problem("bad sample", f"turn {i} is not an object"))
            continue
        if role_key not in turn:
            problems.append(
                problem("role", f"turn {i} has no '{role_key}'; valid roles: user/human, assistant/gpt, system")
            )
            continue
        role = _role(str(turn.get(role_key)), fmt)
        if role is None:
            problems.append(
                problem("role", f"turn {i} has role {turn.get(role_key)!r}; valid: user/human, assistant/gpt, system")
            )
            continue
        content = turn.get(content_key)
        if not isinstance(content, str):
            problems.append(problem("bad sample", f"turn {i} has no text '{content_key}'"))
            continue
        messages.append((role, content))
        turn_of.append(str(i))
    if problems:
        return None, problems
    body = [r for r, _ in messages if r != "system"]
    if any(r == "system" for r, _ in messages[1:]) or not body:
        problems.append(
            problem(
                "roles out of order",
                "a system message may only come first, and a conversation needs user and assistant turns",
            )
        )
    elif any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(body)):
        problems.append(
            problem(
                "roles out of order",
                f"roles out of order ({' -> '.join(body)}); expected user, assistant, user, assistant, ...",
            )
        )
    elif body[-1] != "assistant":
        problems.append(
            problem(
                "roles out of order", "the last turn is from the user; a training sample ends with an assistant answer"
            )
        )
    roles_ok = not problems  # an image in an answer is named only in a conversation whose roles are right
    rejected = obj.get(REJECTED)
    answers = list(zip(turn_of, messages))
    if rejected is not None:
        answers.append((f"'{REJECTED}' (the rejected answer)", ("assistant", rejected)))
    for turn, (role, content) in answers:
        if role == "assistant" and not content.strip():
            problems.append(problem("empty answer", f"assistant turn {turn} is empty"))
        if role == "assistant" and IMAGE_PLACEHOLDER in content and roles_ok:
            problems.append(
                problem(
                    "image in answer",
                    f"assistant turn {turn} holds '{IMAGE_PLACEHOLDER}'; images go in user turns (a model answers "
                    "in text, it would be trained to write the image's tokens)",
                )
            )
        if role == "assistant" and VIDEO_PLACEHOLDER in content and roles_ok:
            problems.append(
                problem(
                    "video in answer",
                    f"assistant turn {turn} holds '{VIDEO_PLACEHOLDER}'; videos go in user turns (a model answers "
                    "in text, it would be trained to write the video's tokens)",
                )
            )
    if obj.get(fmt.audios):
        problems.append(
            problem(
                "bad sample",
                f"'{fmt.audios}' holds audio, which is not supported (vlmtune trains on images and videos only); "
                "remove the audio or the sample",
            )
        )
    images = _media_paths(obj, fmt.images, "image", IMAGE_PLACEHOLDER, messages, base, problem, problems)
    videos = _media_paths(obj, fmt.videos, "video", VIDEO_PLACEHOLDER, messages, base, problem, problems)
    if images is None or videos is None:
        return None, problems
    for p in images:
        if p.is_dir():
            problems.append(problem("image missing", f"image '{p}' is a folder, not an image file"))
        elif not p.is_file():
            problems.append(problem("image missing", f"image '{p}' does not exist"))
    for p in videos:
        if not p.exists():
            problems.append(
                problem("video missing", f"video '{p}' does not exist (a video is a video file or a folder of frames)")
            )
    if problems:
        return None, problems
    sample = Sample(messages, images, where, videos=videos, rejected=rejected, kto_label=obj.get(KTO_LABEL))
    return sample, []


def _media_paths(obj, column, medium, placeholder, messages, base, problem, problems) -> list[Path] | None:
    """A record's image or video paths (relative to ``base``), checked against its placeholders; None when the
    column is not a list of paths (a problem is added either way)."""
    raw = obj.get(column) or []
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(p, str) and p for p in raw):
        what = (
            "image paths (strings)" if medium == "image" else "video paths (strings: video files or folders of frames)"
        )
        problems.append(problem("bad sample", f"'{column}' must be a list of {what}, got {raw!r:.80}"))
        return None
    paths = [Path(p) if Path(p).is_absolute() else base / p for p in raw]
    n_placeholders = sum(c.count(placeholder) for _, c in messages)
    if n_placeholders != len(paths):
        problems.append(
            problem(
                f"{medium} count",
                f"{n_placeholders} '{placeholder}' placeholder(s) but {len(paths)} {medium}(s); each {medium} needs "
                "one placeholder where it appears",
            )
        )
    return paths


def read_file(path: str | Path, fmt: Format | None = None) -> Iterator[Sample | Problem]:
    """Each sample of one data file, or each problem, in file order (streamed; nothing is skipped silently)."""
    p = Path(path)
    if not p.is_file():
        yield Problem("", "file missing", f"data file '{p}' does not exist", whole_file=True)
        return
    fmt = fmt or Format()
    empty = True
    for record in iter_records(p):
        empty = False
        if isinstance(record, Problem):
            yield record
            continue
        where, obj = record
        sample, problems = parse_record(obj, where, p.parent, fmt)
        yield from problems
        if sample is not None:
            yield sample
    if empty:
        yield Problem(str(p), "no samples", "holds no samples", whole_file=True)


def read_samples(path: str | Path, fmt: Format | None = None) -> list[Sample]:
    """Reads every sample of one data file.

    Raises:
        DataError: the file is missing or unreadable, or any sample is bad; every problem is listed.
    """
    samples, problems = [], []
    for got in read_file(path, fmt):
        (problems if isinstance(got, Problem) else samples).append(got)
    if problems:
        raise DataError(problems)
    return samples


class DuplicateFinder:
    """Remembers a 16-byte digest per sample (messages, image and video paths, rejected answer and KTO label), so 100k
    samples cost ~2 MB."""

    def __init__(self):
        self.first: dict[bytes, str] = {}

    @staticmethod
    def key(sample: Sample) -> bytes:
        images = [os.path.normpath(os.path.abspath(p)) for p in sample.images]
        videos = [os.path.normpath(os.path.abspath(p)) for p in sample.videos]
        text = json.dumps([sample.messages, images, videos, sample.rejected, sample.kto_label], ensure_ascii=False)
        return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()

    def check(self, sample: Sample, remember: bool = True) -> Problem | None:
        """A "duplicate" problem naming the first place of the same sample, or None (and remembers it)."""
        k = self.key(sample)
        if k in self.first:
            return Problem(sample.where, "duplicate", f"duplicate of {self.first[k]} (same messages and images)")
        if remember:
            self.first[k] = sample.where
        return None
