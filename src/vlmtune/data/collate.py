"""From a conversation to model inputs, for any family, and batching.

The prompt is built by the processor's own chat template; the answers carry the labels (``vlmtune.data.chat``). The
text is cut at assistant-turn boundaries, each piece is tokenized on its own, and each image (or video) placeholder is
expanded to as many tokens as the processor makes features for it.

Two ways to expand the images, both through the family's real processor:
    * counted (Qwen2-VL, Qwen2.5-VL, Qwen3-VL; ``vlmtune.data.counted``): the token count of an image (and of a
      Qwen2-VL / Qwen2.5-VL video) follows from its size, so lengths are known without decoding a pixel;
    * processor (every other family): each piece goes through ``processor(text=..., images=...)``, which
      expands its image placeholders in the family's own way (LLaVA's repeated ``<image>``, Idefics3's tiles
      with row/column tags, Gemma 3's ``<start_of_image>`` block, Pixtral's rows with ``[IMG_BREAK]``, ...);
      the pixel inputs and any extra model inputs (``image_sizes``, ``pixel_attention_mask``,
      ``token_type_ids``) are the processor's, and ``image_max_pixels`` downscales the image before it.
      Pieces without an image are plain text and go through the processor's tokenizer. A processor that takes a
      ``suffix`` (PaliGemma, a prefix-LM) gets ``token_type_ids`` 1 from the first answer on (see ``marks_suffix``).
      These families take no videos: a sample with one is refused by the checks (``counted.video_refusal``).
"""

from __future__ import annotations

import inspect

import torch
from PIL import Image

from vlmtune.data.chat import IGNORE, Encoded, has_video, label_segments, to_chat
from vlmtune.data.counted import (
    counts_image_tokens,
    encode_text,
    grid_token_counts,
    image_grid,
    image_token_counts,
    process_images,
    process_videos,
    video_refusal,
)
from vlmtune.data.media import load_image, load_images
from vlmtune.data.rows import PACK_ROWS, plan_rows
from vlmtune.data.video import Clip

# The encoding API in one place: collate's own names and those of chat, counted and media that it builds on.
__all__ = [
    "CACHED",
    "IGNORE",
    "PER_TOKEN",
    "TEXT_KEYS",
    "Encoded",
    "collate",
    "counts_image_tokens",
    "downscale",
    "encode_example",
    "encode_text",
    "encode_with_processor",
    "expanded_image_token",
    "grid_token_counts",
    "image_grid",
    "image_runs",
    "image_token_counts",
    "label_segments",
    "load_image",
    "load_images",
    "marks_suffix",
    "pad_cat",
    "process_images",
    "to_chat",
]

CACHED = "cached_vision"
"""The item and batch key holding per-image cached vision features in place of pixel_values (vlmtune.train.vision_cache)."""


PER_TOKEN = "per_token"
"""Item key holding the processor's per-token inputs (``token_type_ids``, ...): padded like ``input_ids``."""


TEXT_KEYS = ("input_ids", "attention_mask", "labels")
"""Processor outputs that vlmtune makes itself: PaliGemma's processor also returns ``labels`` (prefix -100)."""


def expanded_image_token(processor) -> str:
    """The token a processor repeats once per image feature (Gemma 3 renders ``<start_of_image>`` in the
    template but repeats ``<image_soft_token>``)."""
    return getattr(processor.tokenizer, "image_token", None) or processor.image_token


def marks_suffix(processor) -> bool:
    """True where the processor takes a ``suffix`` (PaliGemma): the model is a prefix-LM whose ``token_type_ids``
    are 0 on the prefix (image, question: attended bidirectionally) and 1 on the suffix (answer: causal).

    vlmtune marks every token from the first answer on as suffix, as ``processor(text=prefix, suffix=answer)``
    does. Only processors that take a suffix get this: Gemma 3 also returns ``token_type_ids``, but there 1 marks
    image tokens.
    """
    return "suffix" in inspect.signature(processor.__call__).parameters


def image_runs(ids: list[int], image_id: int) -> list[tuple[int, int]]:
    """[start, end) of every maximal run of ``image_id`` in ``ids``."""
    spans, start = [], None
    for i, t in enumerate([*ids, None]):
        if t == image_id and start is None:
            start = i
        elif t != image_id and start is not None:
            spans.append((start, i))
            start = None
    return spans


def downscale(images: list[Image.Image], max_pixels: int | None) -> list[Image.Image]:
    """Images over ``max_pixels`` shrunk to fit it, keeping the aspect ratio (processor-expanded families)."""
    if not max_pixels:
        return images
    out = []
    for im in images:
        if im.width * im.height > max_pixels:
            scale = (max_pixels / (im.width * im.height)) ** 0.5
            im = im.resize((max(1, int(im.width * scale)), max(1, int(im.height * scale))), Image.BICUBIC)
        out.append(im)
    return out


def encode_with_processor(processor, chat: list[dict], images: list[Image.Image]) -> tuple[Encoded, dict, dict]:
    """Token ids, labels, per-token inputs and pixel inputs of a conversation, the processor expanding its images.

    Each answer/prompt piece with images goes through the processor with the images whose placeholders it holds
    (a piece without images through its tokenizer), so the answers' token places are exact whatever a family's
    image expansion looks like. For a prefix-LM processor (``marks_suffix``) every token from the first answer
    on gets ``token_type_ids`` 1.

    Returns:
        (encoded, per-token inputs such as ``token_type_ids``, pixel inputs for the model).

    Raises:
        ValueError: the placeholders the template rendered do not match the images.
    """
    placeholder = processor.image_token
    image_id = processor.tokenizer.convert_tokens_to_ids(expanded_image_token(processor))
    ids: list[int] = []
    labels: list[int] = []
    per_token: dict[str, list[int]] = {}
    pixel_parts: list[dict] = []
    pending = list(images)
    suffix_start: int | None = None  # where the first answer starts
    for text, is_answer in label_segments(processor, chat):
        n = text.count(placeholder)
        if n > len(pending):
            raise ValueError("the chat template produced more image tokens than the sample has images")
        seg_images, pending = pending[:n], pending[n:]
        if is_answer and suffix_start is None:
            suffix_start = len(ids)
        if seg_images:
            out = processor(text=[text], images=seg_images, add_special_tokens=False, return_tensors="pt")
        else:  # a piece without images is plain text (PaliGemma's processor refuses text without images)
            out = processor.tokenizer(
                [text], add_special_tokens=False, return_token_type_ids=False, return_tensors="pt"
            )
        seg = out["input_ids"][0].tolist()
        for key, value in out.items():
            if key in TEXT_KEYS:
                continue
            if torch.is_tensor(value) and value.shape == out["input_ids"].shape:
                per_token.setdefault(key, [0] * len(ids)).extend(value[0].tolist())
        for values in per_token.values():  # keys a piece did not return are 0 there
            values.extend([0] * (len(ids) + len(seg) - len(values)))
        if seg_images:
            pixel_parts.append({k: v for k, v in out.items() if k not in per_token and k not in TEXT_KEYS})
        ids += seg
        labels += seg if is_answer else [IGNORE] * len(seg)
    if pending:
        raise ValueError(
            f"the chat template rendered {len(images) - len(pending)} image placeholder(s) for {len(images)} image(s)"
        )
    if suffix_start is not None and marks_suffix(processor):
        per_token["token_type_ids"] = [0] * suffix_start + [1] * (len(ids) - suffix_start)
    pixels = pixel_parts[0] if len(pixel_parts) == 1 else {}
    if len(pixel_parts) > 1:  # images in several turns: one call, so the processor batches (pads) them its way
        full = processor.apply_chat_template(chat, tokenize=False)
        out = processor(text=[full], images=images, add_special_tokens=False, return_tensors="pt")
        if out["input_ids"][0].tolist() != ids:
            raise ValueError(
                "the processor tokenizes the conversation differently from its turns; "
                "vlmtune cannot locate the assistant answers for label masking"
            )
        pixels = {k: v for k, v in out.items() if k not in per_token and k not in TEXT_KEYS}
    return Encoded(input_ids=ids, labels=labels, image_spans=image_runs(ids, image_id)), per_token, pixels


def encode_example(
    processor,
    chat: list[dict],
    images: list[Image.Image],
    min_pixels: int | None,
    max_pixels: int | None,
    videos: list[Clip] | None = None,
    video_pixels: tuple[int | None, int | None] = (None, None),
) -> tuple[Encoded, dict | None, dict]:
    """Token ids, labels and model inputs of a conversation with its (decoded) images and videos, for any family.

    Args:
        videos: the decoded videos, in placeholder order (``vlmtune.data.media.load_videos``).
        video_pixels: (min, max) pixels of each video frame after resizing; None: the video processor's own.

    Returns:
        (encoded, per-token inputs or None for the counted Qwen-VL families, pixel inputs: ``pixel_values`` and
        ``image_grid_thw``, and ``pixel_values_videos`` and ``video_grid_thw`` for videos).

    Raises:
        ValueError: the placeholders do not match the images or videos, or the family takes no videos.
    """
    if videos or has_video(chat):
        why = video_refusal(processor)
        if why is not None:
            raise ValueError(why)
    if counts_image_tokens(processor):
        pixels = process_images(processor, images, min_pixels, max_pixels)
        pixels.update(process_videos(processor, videos or [], *video_pixels))
        counts = grid_token_counts(processor, pixels)
        video_counts = grid_token_counts(processor, pixels, "video_grid_thw")
        return encode_text(processor, chat, counts, video_counts), None, pixels
    return encode_with_processor(processor, chat, downscale(images, max_pixels))


def pad_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenates along dim 0, zero-padding every other dim to the largest (LLaVA-NeXT patch counts,
    Idefics3 tile counts, Pixtral image sizes differ between samples; each model drops the padding)."""
    if all(p.shape[1:] == parts[0].shape[1:] for p in parts):
        return torch.cat(parts, dim=0)
    shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
    out = []
    for p in parts:
        padded = p.new_zeros((p.shape[0], *shape))
        padded[tuple(slice(0, s) for s in p.shape)] = p
        out.append(padded)
    return torch.cat(out, dim=0)


def collate(
    batch: list[dict],
    pad_id: int,
    image_token_id: int,
    video_token_id: int | None = None,
    pack: bool = False,
    pack_length: int | None = None,
) -> dict:
    """Right-pads token ids (labels with -100) and concatenates the images' pixel inputs.

    Items of processor-expanded families carry their per-token inputs under ``PER_TOKEN`` (padded with 0);
    for the counted (Qwen-VL) families the M-RoPE ``mm_token_type_ids`` are made here from the token ids.
    With ``pack`` the samples are put in packed-row order (rows of at most ``pack_length`` tokens, or the longest
    sample) and ``PACK_ROWS`` says how many each row holds (``vlmtune.train.packing.pack`` lays them out before the forward).
    """
    if pack:
        rows = plan_rows([len(b["input_ids"]) for b in batch], pack_length)
        batch = [batch[i] for row in rows for i in row]
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
    if any(PER_TOKEN in b for b in batch):
        for key in sorted({k for b in batch for k in b.get(PER_TOKEN, {})}):
            values = torch.zeros((len(batch), width), dtype=torch.long)
            for i, b in enumerate(batch):
                row = b.get(PER_TOKEN, {}).get(key)
                if row is not None:
                    values[i, : len(row)] = torch.as_tensor(row)
            out[key] = values
    else:
        # M-RoPE needs to know which tokens are image (1) or video (2) tokens.
        mm = (input_ids == image_token_id).long()
        if video_token_id is not None:
            mm[input_ids == video_token_id] = 2
        out["mm_token_type_ids"] = mm
    for key in sorted({k for b in batch for k in b} - {"input_ids", "labels", PER_TOKEN}):
        parts = [b[key] for b in batch if key in b]
        if parts and isinstance(parts[0], list):  # per-image values that are not tensors (vision-cache keys)
            out[key] = [x for part in parts for x in part]
        elif parts:
            out[key] = pad_cat(parts)
    if pack:
        out[PACK_ROWS] = torch.tensor([len(row) for row in rows])
    return out
