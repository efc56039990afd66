"""Record formats other than ShareGPT, turned into ShareGPT's shape before the checks: alpaca (instruction / input /
output, LLaMA-Factory's default), OpenAI chat messages whose content is a list of parts (``text``, ``image``,
``image_url``, ``video``; TRL's ``messages`` + ``images`` too), TRL's ``prompt`` + ``completion`` / ``chosen`` +
``rejected``, and media given as data rather than paths (``data:`` URIs, the Hugging Face ``Image`` feature's
``{"bytes", "path"}`` structs).

Preference data: a pair (LLaMA-Factory's ranking records, TRL's preference records) keeps its chosen answer as the
last turn and its rejected answer's text beside it; a KTO label (LLaMA-Factory's ``kto_tag`` column, TRL's ``label``)
is kept beside the labelled last turn.

Media given as bytes are written once into the cache (``media/``, named by their digest), so every later step (the
checks, the vision cache, the report) sees a file like any other. Nothing is fetched: an http(s) URL is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import unquote, urlparse

from vlmtune.paths import cache_dir

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"


class RecordError(ValueError):
    """A record that cannot be read in its format; the message says what would be valid."""


@dataclass(frozen=True)
class Format:
    """How a source's records are laid out: dataset_info.json's ``formatting``, ``columns`` and ``tags``.

    ``formatting`` "auto" (a plain file) tells the layout from each record's keys; "sharegpt" and "alpaca" are
    LLaMA-Factory's (whose default, for an entry that names none, is alpaca).
    """

    formatting: str = "auto"  # auto | sharegpt | alpaca
    messages: str | None = None  # None: whichever of messages / conversations is present
    images: str = "images"
    videos: str = "videos"
    audios: str = "audios"
    system: str | None = None
    prompt: str = "instruction"  # alpaca columns
    query: str = "input"
    response: str = "output"
    history: str | None = None
    role_tag: str | None = None
    content_tag: str | None = None
    user_tag: str | None = None
    assistant_tag: str | None = None
    system_tag: str | None = None
    chosen: str = "chosen"  # preference pairs: the chosen and rejected answers
    rejected: str = "rejected"
    kto_tag: str | None = None  # the KTO label's column; None: a plain file's kto_tag key or TRL's boolean label
    ranking: bool = False  # dataset_info.json ranking: true, every record a pair


CANONICAL = Format(formatting="sharegpt", messages="messages", role_tag="role", content_tag="content")
"""The shape every other format is turned into."""

REJECTED = "rejected"
"""A canonical record's key for the rejected answer's text (the chosen one is its last turn)."""
KTO_LABEL = "kto_tag"
"""A canonical record's key for a KTO label: true desirable, false undesirable (its last turn is the answer)."""
ASSISTANT_ROLES = ("assistant", "gpt", "model")


def layout(obj: dict, fmt: Format) -> str:
    """'trl', 'alpaca', 'openai' or 'sharegpt': what a record holds, by its format and keys."""
    answers = ("completion", fmt.chosen, fmt.rejected)
    messages = fmt.messages or ("messages" if "messages" in obj else "conversations")
    if fmt.formatting == "auto" and "prompt" in obj and messages not in obj and any(k in obj for k in answers):
        return "trl"
    alpaca_keys = (fmt.response, fmt.chosen, fmt.rejected)
    if fmt.formatting == "alpaca" or (
        fmt.formatting == "auto" and fmt.prompt in obj and any(k in obj for k in alpaca_keys)
    ):
        return "alpaca"
    turns = obj.get(messages)
    if isinstance(turns, list) and any(isinstance(t, dict) and isinstance(t.get("content"), list) for t in turns):
        return "openai"
    return "sharegpt"


def canonical(obj: dict, fmt: Format) -> tuple[dict, Format]:
    """A record in ShareGPT's shape with media as path strings, and the format to read it with.

    A preference pair's chosen answer becomes the last turn and its rejected answer's text is under ``REJECTED``;
    a KTO label is under ``KTO_LABEL``.

    Raises:
        RecordError: the record does not fit its format (names the key and what would be valid).
    """
    kind = layout(obj, fmt)
    pair = _pair(obj, fmt)
    label = _label(obj, fmt, kind)
    if pair is not None and label is not None:
        raise RecordError(
            f"both a preference pair ('{fmt.chosen}', '{fmt.rejected}') and a KTO label; a record is either a pair "
            "(method dpo) or one answer labelled desirable or undesirable (method kto)"
        )
    chosen = pair[0] if pair else None
    if kind == "trl":
        out, fmt = _trl(obj, fmt, chosen), replace(CANONICAL, system=None)
    elif kind == "alpaca":
        out, fmt = _alpaca(obj, fmt, chosen), replace(CANONICAL, system="system" if fmt.system else None)
    else:
        if chosen is not None:
            obj = _with_answer(obj, fmt, chosen)
        if kind == "openai":
            out, fmt = _openai(obj, fmt), replace(CANONICAL, system=fmt.system)
        else:
            out = {k: v for k, v in obj.items() if k not in (REJECTED, KTO_LABEL)}
            for column in (fmt.images, fmt.videos):
                if column in out:
                    out[column] = _media_column(out[column], column)
    if pair is not None:
        out[REJECTED] = pair[1]
    if label is not None:
        out[KTO_LABEL] = label
    return out, fmt


def _pair(obj: dict, fmt: Format) -> tuple[str, str] | None:
    """(chosen, rejected) answer texts of a preference record, or None for a record that is not one."""
    given = [k for k in (fmt.chosen, fmt.rejected) if k in obj]
    if not given:
        if fmt.ranking:
            raise RecordError(
                f"a ranking dataset's record needs '{fmt.chosen}' and '{fmt.rejected}' answers (dataset_info.json "
                "ranking: true)"
            )
        return None
    if len(given) == 1:
        missing = fmt.rejected if given[0] == fmt.chosen else fmt.chosen
        raise RecordError(
            f"'{given[0]}' is given but '{missing}' is missing; a preference pair needs both answers (for SFT, give "
            "the answer as the conversation's last turn)"
        )
    return _answer(obj[fmt.chosen], fmt.chosen, fmt), _answer(obj[fmt.rejected], fmt.rejected, fmt)


def _answer(value: object, key: str, fmt: Format) -> str:
    """An answer's text, given as text, an assistant message (ShareGPT or OpenAI style) or a list of exactly one."""
    if isinstance(value, list):
        if len(value) != 1:
            raise RecordError(f"'{key}' must be one assistant message (or its text), got a list of {len(value)}")
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        role_key = next((k for k in (fmt.role_tag, "role", "from") if k and k in value), None)
        content_key = next((k for k in (fmt.content_tag, "content", "value") if k and k in value), None)
        role = value.get(role_key) if role_key else None
        if role is not None and role not in (*ASSISTANT_ROLES, fmt.assistant_tag):
            raise RecordError(f"'{key}' has role {role!r}; an answer is the assistant's (assistant / gpt)")
        content = value.get(content_key) if content_key else None
        if isinstance(content, list):
            content = "".join(_answer_part(part, key, j) for j, part in enumerate(content))
        if isinstance(content, str):
            return content
    raise RecordError(f"'{key}' must be an assistant message or text, got {value!r:.80}")


def _answer_part(part: object, key: str, index: int) -> str:
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    raise RecordError(
        f"'{key}' part {index} is {part!r:.60}; an answer is text parts only (images and videos go in the prompt)"
    )


def _label(obj: dict, fmt: Format, kind: str) -> bool | None:
    """A record's KTO label: the ``columns.kto_tag`` column of a dataset_info.json entry; in a plain file, a
    ``kto_tag`` key, or TRL's boolean ``label``. None for a record without one."""
    if fmt.kto_tag is not None:
        if fmt.kto_tag not in obj:
            raise RecordError(
                f"no '{fmt.kto_tag}' (the KTO label, columns.kto_tag): give true (desirable) or false (undesirable)"
            )
        key = fmt.kto_tag
    elif fmt.formatting == "auto" and KTO_LABEL in obj:
        key = KTO_LABEL
    elif fmt.formatting == "auto" and "label" in obj and (kind == "trl" or isinstance(obj["label"], bool)):
        key = "label"
    else:
        return None
    if not isinstance(obj[key], bool):
        raise RecordError(
            f"'{key}' (a KTO label) must be true (desirable) or false (undesirable), got {obj[key]!r:.80}"
        )
    return obj[key]


def _with_answer(obj: dict, fmt: Format, answer: str) -> dict:
    """A ShareGPT / OpenAI record whose turns end with the question, with ``answer`` appended as the last turn (its
    role and content keys those the reader reads the record's turns by)."""
    key = fmt.messages or ("messages" if "messages" in obj else "conversations")
    turns = obj.get(key)
    if not isinstance(turns, list) or not turns:
        return obj  # the reader names the missing turns
    role_key = fmt.role_tag or ("role" if isinstance(turns[0], dict) and "role" in turns[0] else "from")
    content_key = fmt.content_tag or ("content" if role_key == "role" else "value")
    assistant = fmt.assistant_tag or ("assistant" if role_key == "role" else "gpt")
    if isinstance(turns[-1], dict) and turns[-1].get(role_key) in (*ASSISTANT_ROLES, assistant):
        raise RecordError(
            f"a preference record's '{key}' end with the user's question (its answers are '{fmt.chosen}' and "
            f"'{fmt.rejected}'), but the last turn is the assistant's"
        )
    out = {k: v for k, v in obj.items() if k not in (fmt.chosen, fmt.rejected)}
    out[key] = [*turns, {role_key: assistant, content_key: answer}]
    return out


def _trl(obj: dict, fmt: Format, chosen: str | None) -> dict:
    """TRL's prompt + completion (SFT, or KTO with a label) or prompt + chosen + rejected: the prompt as text or
    as messages (content parts too), the answers as text or as one assistant message."""
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        messages: list = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        messages = [dict(m) for m in prompt]
        if messages[-1].get("role") in ASSISTANT_ROLES:
            raise RecordError("'prompt' ends with an assistant turn; it ends with the user's question")
    else:
        raise RecordError(f"'prompt' must be text or a list of messages ({{role, content}}), got {prompt!r:.80}")
    if chosen is None:
        if "completion" not in obj:
            raise RecordError("a 'prompt' record needs a 'completion', or 'chosen' and 'rejected' answers")
        chosen = _answer(obj["completion"], "completion", fmt)
    messages.append({"role": "assistant", "content": chosen})
    if any(isinstance(m.get("content"), list) for m in messages):
        record = {k: obj[k] for k in (fmt.images, fmt.videos, fmt.audios) if k in obj}
        return _openai({**record, "messages": messages}, replace(fmt, messages="messages", system=None))
    return {"messages": messages, **_media_columns(obj, fmt)}


def _media_columns(obj: dict, fmt: Format) -> dict:
    """A record's images, videos and audios columns under the canonical names, media given as data cached."""
    out = {}
    for column, key in ((fmt.images, "images"), (fmt.videos, "videos"), (fmt.audios, "audios")):
        if obj.get(column):
            out[key] = _media_column(obj[column], column)
    return out


def _alpaca(obj: dict, fmt: Format, answer: str | None = None) -> dict:
    """An alpaca record as messages; ``answer`` (a pair's chosen one) in place of the response column."""
    messages = []
    history = obj.get(fmt.history) if fmt.history else None
    if history:
        if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
            raise RecordError(f"'{fmt.history}' must be a list of [prompt, answer] pairs")
        for prompt, previous in history:
            messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": previous}]
    # LLaMA-Factory joins instruction and input with a newline.
    query = [str(obj[k]) for k in (fmt.prompt, fmt.query) if obj.get(k)]
    if not query:
        raise RecordError(f"an alpaca record needs a non-empty '{fmt.prompt}' (and optionally '{fmt.query}')")
    response = obj.get(fmt.response) if answer is None else answer
    if not isinstance(response, str):
        raise RecordError(f"an alpaca record needs its answer as text in '{fmt.response}'")
    messages += [{"role": "user", "content": "\n".join(query)}, {"role": "assistant", "content": response}]
    out: dict = {"messages": messages}
    if fmt.system and obj.get(fmt.system):
        out["system"] = obj[fmt.system]
    return {**out, **_media_columns(obj, fmt)}


def _openai(obj: dict, fmt: Format) -> dict:
    key = fmt.messages or ("messages" if "messages" in obj else "conversations")
    listed = {}
    for kind, column in (("image", fmt.images), ("video", fmt.videos)):
        value = obj.get(column) or []
        if not isinstance(value, list):
            raise RecordError(f"'{column}' must be a list of {kind} paths, got {value!r:.80}")
        listed[kind] = _media_column(value, column)
    media: dict[str, list[str]] = {"image": [], "video": []}
    messages = []
    for i, turn in enumerate(obj[key]):
        if not isinstance(turn, dict):
            raise RecordError(f"turn {i} is not an object")
        content = turn.get("content")
        if isinstance(content, list):
            content = "".join(_part(part, i, j, listed, media) for j, part in enumerate(content))
        messages.append({"role": turn.get("role"), "content": content})
    for kind, left in listed.items():
        if left:
            raise RecordError(
                f"{len(left)} {kind}(s) of '{fmt.images if kind == 'image' else fmt.videos}' not referred to by a "
                f'{{"type": "{kind}"}} content part'
            )
    out: dict = {"messages": messages, "images": media["image"], "videos": media["video"]}
    if obj.get(fmt.audios):
        out["audios"] = obj[fmt.audios]
    if fmt.system and obj.get(fmt.system):
        out[fmt.system] = obj[fmt.system]
    return out


def _part(part: object, turn: int, index: int, listed: dict[str, list[str]], media: dict[str, list[str]]) -> str:
    """One content part -> its text, or a placeholder with its media appended in order."""
    where = f"turn {turn} part {index}"
    if not isinstance(part, dict) or "type" not in part:
        raise RecordError(f'{where} must be an object with a "type" (text, image, image_url, video)')
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise RecordError(f'{where}: a text part needs "text"')
        return part["text"]
    if kind in ("image", "image_url", "video", "video_url"):
        medium = "video" if kind.startswith("video") else "image"
        value = part.get(kind) or part.get(medium)
        if isinstance(value, dict):  # {"url": ...} (OpenAI) or a {"bytes", "path"} struct
            value = value.get("url", value)
        if value is None:  # TRL: the media come from the record's images / videos column, in order
            if not listed[medium]:
                raise RecordError(
                    f"{where}: {'an' if medium == 'image' else 'a'} {medium} part without its {medium}, and no "
                    f'{medium}s column left (give the part an "{medium}" path or list it in the record\'s {medium}s)'
                )
            media[medium].append(listed[medium].pop(0))
        else:
            media[medium].append(media_path(value, where))
        return IMAGE_PLACEHOLDER if medium == "image" else VIDEO_PLACEHOLDER
    raise RecordError(f"{where} has type {kind!r}; valid: text, image, image_url, video (audio is not supported)")


def _media_column(value: object, column: str) -> list:
    """A record's images / videos column as a list of path strings (structs and data URIs written to the cache).
    Anything else is kept as it is, for the reader to name."""
    items = value if isinstance(value, list) else [value]
    out = []
    for i, item in enumerate(items):
        if (isinstance(item, str) and item) or (isinstance(item, dict) and ("bytes" in item or "path" in item)):
            out.append(media_path(item, f"'{column}'[{i}]"))
        else:
            out.append(item)
    return out if isinstance(value, list) else out[0]


def media_path(value: object, where: str) -> str:
    """A path string for a medium given as a path, a ``file://`` or ``data:`` URI, or a ``{"bytes", "path"}`` struct.

    Raises:
        RecordError: an http(s) URL, a bad data URI, or a struct with neither bytes nor a path.
    """
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return _cached(bytes(data), Path(path).suffix if path else "")
        if path:
            return str(path)
        raise RecordError(f'{where}: a media struct needs "bytes" or "path"')
    if not isinstance(value, str):
        raise RecordError(f"{where}: a medium must be a path, a data: URI or a {{bytes, path}} struct")
    if value.startswith("data:"):
        header, _, payload = value.partition(",")
        if not header.endswith(";base64"):
            raise RecordError(f"{where}: only base64 data: URIs are read (data:image/png;base64,...)")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RecordError(f"{where}: the data: URI's base64 payload does not decode") from None
        subtype = header[5:].split(";")[0].split("/")[-1]
        return _cached(data, f".{subtype}" if subtype.isalnum() else "")
    scheme = urlparse(value).scheme.lower()
    if scheme in ("http", "https", "ftp", "s3", "gs"):
        raise RecordError(
            f"{where}: {value!r:.80} is a {scheme} URL; vlmtune reads local files only (download it and give its path)"
        )
    if scheme == "file":
        return unquote(urlparse(value).path)
    return value


def _cached(data: bytes, suffix: str) -> str:
    """Writes bytes once into the cache under their digest (atomically), and returns the file's path."""
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    folder = cache_dir() / "media" / digest[:2]
    path = folder / f"{digest}{suffix.lower()[:8]}"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return str(path)
