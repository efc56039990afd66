"""Chat template, label masking, an image-safe length limit, and batching.

Labels: only assistant turns carry labels (every assistant turn of a multi-turn conversation, its
end-of-turn token included); system, user, template and image tokens are -100.

The prompt is built by the processor's own chat template. The text is cut at assistant-turn
boundaries (found by rendering each prefix of the conversation, which must be a prefix of the whole),
each piece is tokenized on its own, and each image placeholder is expanded to as many image tokens
as the processor makes features for that image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from vlmtune.data.sharegpt import IMAGE_PLACEHOLDER, Sample

IGNORE = -100


@dataclass
class Encoded:
    """One tokenized sample."""

    input_ids: list[int]
    labels: list[int]
    image_spans: list[tuple[int, int]]  # [start, end) token span of each image


def to_chat(sample: Sample) -> list[dict]:
    """Messages in the content-parts form that VLM chat templates take: ``<image>`` -> an image part."""
    chat = []
    for role, content in sample.messages:
        parts: list[dict] = []
        pieces = content.split(IMAGE_PLACEHOLDER)
        for i, piece in enumerate(pieces):
            if i > 0:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        chat.append({"role": role, "content": parts})
    return chat


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
            raise ValueError("the chat template does not render conversation prefixes as prefixes of the whole; "
                             "vlmtune cannot locate the assistant answers for label masking")
        segments.append((full[pos:start], False))
        segments.append((full[start:len(upto)], True))
        pos = len(upto)
    if pos < len(full):
        segments.append((full[pos:], False))
    return [(t, a) for t, a in segments if t]


def image_token_counts(processor, sizes: list[tuple[int, int]], min_pixels: int | None, max_pixels: int | None) -> list[int]:
    """Image tokens the processor makes for images of the given (height, width), without decoding them."""
    ip = processor.image_processor
    kwargs = {}
    if min_pixels:
        kwargs["min_pixels"] = min_pixels
    if max_pixels:
        kwargs["max_pixels"] = max_pixels
    merge = getattr(ip, "merge_size", 1)
    return [ip.get_number_of_image_patches(h, w, kwargs) // merge**2 for h, w in sizes]


def encode_text(processor, chat: list[dict], counts: list[int]) -> Encoded:
    """Token ids and labels of a conversation whose i-th image becomes ``counts[i]`` image tokens."""
    tok = processor.tokenizer
    image_token = processor.image_token
    image_id = tok.convert_tokens_to_ids(image_token)
    ids: list[int] = []
    labels: list[int] = []
    spans: list[tuple[int, int]] = []
    remaining = list(counts)
    for text, is_answer in label_segments(processor, chat):
        pieces = text.split(image_token)
        for i, piece in enumerate(pieces):
            if i > 0:
                if not remaining:
                    raise ValueError("the chat template produced more image tokens than the sample has images")
                n = remaining.pop(0)
                spans.append((len(ids), len(ids) + n))
                ids += [image_id] * n
                labels += [IGNORE] * n
            if piece:
                piece_ids = tok(piece, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                labels += piece_ids if is_answer else [IGNORE] * len(piece_ids)
    if remaining:
        raise ValueError(f"the chat template rendered {len(counts) - len(remaining)} image placeholder(s) for {len(counts)} image(s)")
    return Encoded(input_ids=ids, labels=labels, image_spans=spans)


def load_images(sample: Sample) -> list[Image.Image]:
    """Decodes a sample's images as RGB.

    Raises:
        ValueError: an image cannot be opened or decoded; names the sample and the path.
    """
    images = []
    for path in sample.images:
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except Exception as e:  # PIL raises several types for corrupt files
            raise ValueError(f"{sample.where}: image '{path}' cannot be decoded: {e}") from e
    return images


def process_images(processor, images: list[Image.Image], min_pixels: int | None, max_pixels: int | None) -> dict:
    """Pixel inputs for a sample's images, within the configured pixel bounds."""
    if not images:
        return {}
    ip = processor.image_processor
    kwargs = {}
    if min_pixels or max_pixels:
        size = dict(ip.size) if getattr(ip, "size", None) else {}
        if min_pixels:
            size["shortest_edge"] = min_pixels
        if max_pixels:
            size["longest_edge"] = max_pixels
        kwargs["size"] = size
    return dict(ip(images=images, return_tensors="pt", **kwargs))


def collate(batch: list[dict], pad_id: int, image_token_id: int, video_token_id: int | None = None) -> dict:
    """Right-pads token ids (labels with -100) and concatenates the images' pixel inputs."""
    width = max(len(b["input_ids"]) for b in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        input_ids[i, :n] = torch.as_tensor(b["input_ids"])
        labels[i, :n] = torch.as_tensor(b["labels"])
        attention[i, :n] = 1
    out = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    # M-RoPE needs to know which tokens are image (1) or video (2) tokens.
    mm = (input_ids == image_token_id).long()
    if video_token_id is not None:
        mm[input_ids == video_token_id] = 2
    out["mm_token_type_ids"] = mm
    for key in sorted({k for b in batch for k in b} - {"input_ids", "labels"}):
        parts = [b[key] for b in batch if key in b]
        if parts:
            out[key] = torch.cat(parts, dim=0)
    return out
