"""A sample as the chat template sees it, and where its answers are: the ground both encoding paths stand on.

Labels: only assistant turns carry labels (every assistant turn of a multi-turn conversation, its end-of-turn token
included); system, user, template, image and video tokens are -100. The answers are found by rendering each prefix of
the conversation with the processor's own chat template, which must be a prefix of the whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from vlmtune.data.sharegpt import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Sample

IGNORE = -100
"""The label of a token the loss skips (torch cross-entropy's ignore_index): prompt, template, image, padding."""

_PLACEHOLDERS = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")
_PART = {IMAGE_PLACEHOLDER: "image", VIDEO_PLACEHOLDER: "video"}


@dataclass
class Encoded:
    """One tokenized sample."""

    input_ids: list[int]
    labels: list[int]
    image_spans: list[tuple[int, int]]  # [start, end) token span of each image
    video_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) token span of each video

    @property
    def vision_end(self) -> int:
        """Where the last image or video token ends (0 without any): a length limit may cut only after it."""
        return max((e for _, e in self.image_spans + self.video_spans), default=0)


def to_chat(sample: Sample) -> list[dict]:
    """Messages in the content-parts form that VLM chat templates take: ``<image>`` -> an image part, ``<video>`` ->
    a video part (Qwen2-VL's template renders it ``<|vision_start|><|video_pad|><|vision_end|>``)."""
    chat = []
    for role, content in sample.messages:
        parts: list[dict] = []
        for piece in _PLACEHOLDERS.split(content):
            if piece in _PART:
                parts.append({"type": _PART[piece]})
            elif piece:
                parts.append({"type": "text", "text": piece})
        chat.append({"role": role, "content": parts})
    return chat


def has_video(chat: list[dict]) -> bool:
    """Whether a conversation (``to_chat``'s form) holds a video part."""
    return any(part.get("type") == "video" for message in chat for part in message["content"])


def label_segments(processor, chat: list[dict]) -> list[tuple[str, bool]]:
    """Splits the rendered conversation into (text, is_answer) pieces.

    Raises:
        ValueError: the chat template renders a prefix of the conversation differently from the whole,
            so answer boundaries cannot be located.
    """
    render = processor.apply_chat_template
    full = render(chat, tokenize=False)
    segments, pos = [], 0
    for k, message in enumerate(chat):
        if message["role"] != "assistant":
            continue
        prompt = render(chat[:k], tokenize=False, add_generation_prompt=True)
        upto = render(chat[: k + 1], tokenize=False)
        start = len(prompt)
        if not (full.startswith(upto) and upto.startswith(prompt)) or start < pos:
            raise ValueError(
                "the chat template does not render conversation prefixes as prefixes of the whole; "
                "vlmtune cannot locate the assistant answers for label masking"
            )
        segments.append((full[pos:start], False))
        segments.append((full[start : len(upto)], True))
        pos = len(upto)
    if pos < len(full):
        segments.append((full[pos:], False))
    return [(t, a) for t, a in segments if t]
