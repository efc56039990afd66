"""Record formats other than ShareGPT, turned into ShareGPT's shape before the checks: alpaca (instruction / input /
output, LLaMA-Factory's default), OpenAI chat messages whose content is a list of parts (``text``, ``image``,
``image_url``, ``video``; TRL's ``messages`` + ``images`` too), and media given as data rather than paths (``data:``
URIs, the Hugging Face ``Image`` feature's ``{"bytes", "path"}`` structs).

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


CANONICAL = Format(formatting="sharegpt", messages="messages", role_tag="role", content_tag="content")
"""The shape every other format is turned into."""

PREFERENCE_KEYS = ("chosen", "rejected")


def layout(obj: dict, fmt: Format) -> str:
    """'sharegpt', 'openai', 'alpaca' or 'preference': what a record holds, by its format and keys."""
    if any(k in obj for k in PREFERENCE_KEYS):
        return "preference"
    if fmt.formatting == "alpaca" or (fmt.formatting == "auto" and fmt.prompt in obj and fmt.response in obj):
        return "alpaca"
    key = fmt.messages or ("messages" if "messages" in obj else "conversations")
    turns = obj.get(key)
    if isinstance(turns, list) and any(isinstance(t, dict) and isinstance(t.get("content"), list) for t in turns):
        return "openai"
    return "sharegpt"


def canonical(obj: dict, fmt: Format) -> tuple[dict, Format]:
    """A record in ShareGPT's shape with media as path strings, and the format to read it with.

    Raises:
        RecordError: the record does not fit its format (names the key and what would be valid).
    """
    kind = layout(obj, fmt)
    if kind == "preference":
        raise RecordError(
            "a preference record (chosen / rejected answers): supervised fine-tuning trains one answer per "
            "prompt; give a conversation whose last turn is the answer to learn"
        )
    if kind == "alpaca":
        return _alpaca(obj, fmt), replace(CANONICAL, system="system" if fmt.system else None)
    if kind == "openai":
        return _openai(obj, fmt), replace(CANONICAL, system=fmt.system)
    out = dict(obj)
    for column in (fmt.images, fmt.videos):
        if column in out:
            out[column] = _media_column(out[column], column)
    return out, fmt


def _alpaca(obj: dict, fmt: Format) -> dict:
    messages = []
    history = obj.get(fmt.history) if fmt.history else None
    if history:
        if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
            raise RecordError(f"'{fmt.history}' must be a list of [prompt, answer] pairs")
        for prompt, answer in history:
            messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    # LLaMA-Factory joins instruction and input with a newline.
    query = [str(obj[k]) for k in (fmt.prompt, fmt.query) if obj.get(k)]
    if not query:
        raise RecordError(f"an alpaca record needs a non-empty '{fmt.prompt}' (and optionally '{fmt.query}')")
    response = obj.get(fmt.response)
    if not isinstance(response, str):
        raise RecordError(f"an alpaca record needs its answer as text in '{fmt.response}'")
    messages += [{"role": "user", "content": "\n".join(query)}, {"role": "assistant", "content": response}]
    out: dict = {"messages": messages}
    if fmt.system and obj.get(fmt.system):
        out["system"] = obj[fmt.system]
    for column, key in ((fmt.images, "images"), (fmt.videos, "videos"), (fmt.audios, "audios")):
        if obj.get(column):
            out[key] = _media_column(obj[column], column)
    return out


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
