"""Chat template, label masking, an image-safe length limit, and batching.

Labels: only assistant turns carry labels (every assistant turn of a multi-turn conversation, its
end-of-turn token included); system, user, template and image tokens are -100.

The prompt is built by the processor's own chat template. The text is cut at assistant-turn
boundaries (found by rendering each prefix of the conversation, which must be a prefix of the whole),
each piece is tokenized on its own, and each image placeholder is expanded to as many image tokens
as the processor makes features for that image.

Two ways to expand the images, both through the family's real processor:
    * counted (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): the image processor says how many tokens an image of a given
      size makes (``get_number_of_image_patches``), so lengths are known without decoding a pixel, and
      ``image_min_pixels``/``image_max_pixels`` are the processor's own pixel bounds;
    * processor (every other family): each piece goes through ``processor(text=..., images=...)``, which
      expands its image placeholders in the family's own way (LLaVA's repeated ``<image>``, Idefics3's tiles
      with row/column tags, Gemma 3's ``<start_of_image>`` block, Pixtral's rows with ``[IMG_BREAK]``, ...);
      the pixel inputs and any extra model inputs (``image_sizes``, ``pixel_attention_mask``,
      ``token_type_ids``) are the processor's, and ``image_max_pixels`` downscales the image before it.
      Pieces without an image are plain text and go through the processor's tokenizer. A processor that takes a
      ``suffix`` (PaliGemma, a prefix-LM) gets ``token_type_ids`` 1 from the first answer on (see ``marks_suffix``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from PIL import Image

from vlmtune.data.rows import PACK_ROWS, plan_rows
from vlmtune.data.sharegpt import IMAGE_PLACEHOLDER, Sample

IGNORE = -100
"""The label of a token the loss skips (torch cross-entropy's ignore_index): prompt, template, image, padding."""
CACHED = "cached_vision"
"""The item and batch key holding per-image cached vision features in place of pixel_values (vlmtune.train.vision_cache)."""


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


def image_token_counts(
    processor, sizes: list[tuple[int, int]], min_pixels: int | None, max_pixels: int | None
) -> list[int]:
    """Image tokens the processor makes for images of the given (height, width), without decoding them."""
    ip = processor.image_processor
    kwargs = {}
    if min_pixels:
        kwargs["min_pixels"] = min_pixels
    if max_pixels:
        kwargs["max_pixels"] = max_pixels
    merge = getattr(ip, "merge_size", 1)
    return [ip.get_number_of_image_patches(h, w, kwargs) // merge**2 for h, w in sizes]


def image_grid(
    processor, height: int, width: int, min_pixels: int | None, max_pixels: int | None
) -> tuple[int, int, int]:
    """The (temporal, height, width) patch grid a Qwen-VL image processor makes for an image of this size, without
    decoding it (the same ``smart_resize`` the processor runs; one temporal patch for a still image)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    ip = processor.image_processor
    patch = ip.patch_size
    h, w = smart_resize(
        height,
        width,
        patch * ip.merge_size,
        min_pixels=min_pixels or ip.size["shortest_edge"],
        max_pixels=max_pixels or ip.size["longest_edge"],
    )
    return 1, h // patch, w // patch


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
        raise ValueError(
            f"the chat template rendered {len(counts) - len(remaining)} image placeholder(s) for {len(counts)} image(s)"
        )
    return Encoded(input_ids=ids, labels=labels, image_spans=spans)


def load_images(sample: Sample) -> list[Image.Image]:
    """Decodes a sample's images as RGB.

    Raises:
        ValueError: an image cannot be opened or decoded; names the sample and the path.
    """
    return [load_image(path, sample.where) for path in sample.images]


def load_image(path, where: str) -> Image.Image:
    """Decodes one image as RGB; ``where`` (a sample's file:line) names it in the error."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises several types for corrupt files
        raise ValueError(f"{where}: image '{path}' cannot be decoded: {e}") from e


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


PER_TOKEN = "per_token"
"""Item key holding the processor's per-token inputs (``token_type_ids``, ...): padded like ``input_ids``."""


TEXT_KEYS = ("input_ids", "attention_mask", "labels")
"""Processor outputs that vlmtune makes itself: PaliGemma's processor also returns ``labels`` (prefix -100)."""


def counts_image_tokens(processor) -> bool:
    """True where image tokens are counted from image sizes alone (the Qwen-VL image processors)."""
    ip = getattr(processor, "image_processor", None)
    return hasattr(ip, "merge_size") and hasattr(ip, "get_number_of_image_patches")


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


def grid_token_counts(processor, pixels: dict) -> list[int]:
    """Image tokens of each processed image of a counted (Qwen-VL) family: its grid's patches / merge_size^2."""
    merge = getattr(processor.image_processor, "merge_size", 1)
    return [int(g.prod()) // merge**2 for g in pixels.get("image_grid_thw", [])]


def encode_example(
    processor, chat: list[dict], images: list[Image.Image], min_pixels: int | None, max_pixels: int | None
) -> tuple[Encoded, dict | None, dict]:
    """Token ids, labels and model inputs of a conversation with its (decoded) images, for any family.

    Returns:
        (encoded, per-token inputs or None for the counted Qwen-VL families, pixel inputs).
    """
    if counts_image_tokens(processor):
        pixels = process_images(processor, images, min_pixels, max_pixels)
        return encode_text(processor, chat, grid_token_counts(processor, pixels)), None, pixels
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
