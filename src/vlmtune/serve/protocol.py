"""What a chat completions request may hold, and how it becomes vlmtune's (role, text) turns and PIL images.

Images come as ``image_url`` content parts: a base64 ``data:`` URI (decoded in memory), or a local file path /
``file://`` URI only when the server was started with ``--allow-local-files DIR`` and the file lies inside DIR
(symlinks resolved first). Nothing is ever fetched over the network: an http(s) URL is refused, as are video and
audio parts. Every refusal is an ``APIError`` naming the offending field, in OpenAI's error shape.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlmtune.data.sharegpt import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

MAX_IMAGE_PIXELS = 50_000_000
"""Largest image accepted (width x height) before decoding: a few-kB PNG can claim gigapixels (a decompression bomb)."""
MAX_STOPS = 4  # OpenAI's limit on stop sequences


class APIError(Exception):
    """A refused request: the HTTP status and OpenAI's error fields."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completions request that vlmtune serves; any other field is refused by name."""

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2, description="0 decodes greedily; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None
    logprobs: Literal[False] | None = None
    presence_penalty: Literal[0] | None = None
    frequency_penalty: Literal[0] | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise APIError(400, f"'stop' takes up to {MAX_STOPS} non-empty strings", "stop")
        return stops


def parse_request(raw: bytes) -> ChatRequest:
    """The request body as a ``ChatRequest``.

    Raises:
        APIError: 400 for a body that is not JSON or does not fit the schema (every problem named).
    """
    try:
        return ChatRequest.model_validate_json(raw)
    except ValidationError as e:
        if any(err["type"] == "json_invalid" for err in e.errors()):
            raise APIError(
                400, f"the request body is not valid JSON: {e.errors()[0]['msg']}", code="invalid_json"
            ) from None
        problems = [f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {_why(err)}" for err in e.errors()]
        param = ".".join(str(x) for x in e.errors()[0]["loc"]) or None
        raise APIError(400, "invalid request: " + "; ".join(problems), param) from None


def _why(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        return "not a field vlmtune serve takes (it serves text and image chat completions only)"
    if err["type"] == "literal_error":
        return f"{err['msg']} (the only value vlmtune serve takes)"
    return err["msg"]


def conversation(
    request: ChatRequest, allow_local_files: Path | None
) -> tuple[list[tuple[str, str]], list[Image.Image]]:
    """The messages as (role, text) turns with ``<image>`` placeholders where images stand, and the images in order.

    Raises:
        APIError: 400 for an unsupported part, a fetched or forbidden URL, or an image that does not decode.
    """
    turns: list[tuple[str, str]] = []
    images: list[Image.Image] = []
    for i, message in enumerate(request.messages):
        role = "system" if message.role == "developer" else message.role
        where = f"messages[{i}].content"
        if isinstance(message.content, str) or message.content is None:
            parts = [{"type": "text", "text": message.content or ""}]
        else:
            parts = message.content
        text = ""
        for j, part in enumerate(parts):
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                piece = part["text"]
                if IMAGE_PLACEHOLDER in piece or VIDEO_PLACEHOLDER in piece:
                    raise APIError(
                        400,
                        f"{where}[{j}]: the text holds '{IMAGE_PLACEHOLDER}' or '{VIDEO_PLACEHOLDER}', which vlmtune "
                        "reserves for media; send images as image_url parts",
                        f"{where}[{j}].text",
                    )
                text += piece
            elif kind == "image_url":
                if role != "user":
                    raise APIError(400, f"{where}[{j}]: images go in user messages only", f"{where}[{j}]")
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str) or not url:
                    raise APIError(400, f"{where}[{j}]: image_url needs a 'url' string", f"{where}[{j}].image_url")
                images.append(open_image(url, allow_local_files, f"{where}[{j}].image_url"))
                text += IMAGE_PLACEHOLDER
            elif kind in ("video_url", "video", "input_audio", "file"):
                raise APIError(
                    400, f"{where}[{j}]: '{kind}' parts are not served (text and images only)", f"{where}[{j}].type"
                )
            else:
                raise APIError(
                    400,
                    f"{where}[{j}]: a content part must be {{type: text, text}} or {{type: image_url, image_url: "
                    f"{{url}}}}, got type {kind!r}",
                    f"{where}[{j}]",
                )
        turns.append((role, text))
    return turns, images


def open_image(url: str, allow_local_files: Path | None, param: str) -> Image.Image:
    """A ``data:`` URI or an allowed local file, decoded to an RGB image.

    Raises:
        APIError: 400 for a network URL, a local file without ``--allow-local-files`` or outside its folder, a bad
            data URI, or bytes that are not an image.
    """
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise APIError(400, "only base64 data: URIs are read (data:image/png;base64,...)", param, "invalid_image")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "the data: URI's base64 payload does not decode", param, "invalid_image") from None
        return _decode(io.BytesIO(data), "the data: URI", param)
    scheme = urlparse(url).scheme.lower()
    if scheme not in ("", "file") and not (len(scheme) == 1 and url[1:3] in (":\\", ":/")):  # not a Windows drive
        raise APIError(
            400,
            f"{url!r:.80} is a {scheme} URL; the server never fetches URLs: send the image as a base64 data: URI",
            param,
            "invalid_image_url",
        )
    if allow_local_files is None:
        raise APIError(
            400,
            "local image paths are refused: the server was not started with --allow-local-files DIR; send the image "
            "as a base64 data: URI",
            param,
            "local_files_not_allowed",
        )
    path = Path(unquote(urlparse(url).path) if scheme == "file" else url).expanduser()
    resolved = path.resolve()
    if not resolved.is_relative_to(allow_local_files.resolve()):
        raise APIError(
            400, f"'{path}' is outside the folder allowed by --allow-local-files", param, "local_files_not_allowed"
        )
    if not resolved.is_file():
        raise APIError(400, f"'{path}' is not a file", param, "invalid_image")
    with open(resolved, "rb") as f:
        return _decode(io.BytesIO(f.read()), f"'{path}'", param)


def _decode(data: io.BytesIO, what: str, param: str) -> Image.Image:
    try:
        with Image.open(data) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise APIError(
                    400,
                    f"{what} is {image.width}x{image.height} pixels; the limit is {MAX_IMAGE_PIXELS:,} pixels",
                    param,
                    "image_too_large",
                )
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise APIError(400, f"{what} is not an image that decodes ({e})", param, "invalid_image") from None
