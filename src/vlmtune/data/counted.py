"""The counted path (the Qwen-VL families): image and video tokens follow from sizes alone, so a sample's length is
known without decoding a pixel, and each placeholder is expanded to exactly that many tokens.

Images: the image processor says how many tokens an image of a given size makes (``get_number_of_image_patches``);
``image_min_pixels`` / ``image_max_pixels`` are its own pixel bounds.

Videos (Qwen2-VL and Qwen2.5-VL, whose processors take Qwen2-VL's video processor): a ``<video>`` placeholder becomes
``<|vision_start|><|video_pad|>*N<|vision_end|>``, as the chat template renders a video part and the processor
expands it, with N = (frames / temporal patch size) x (resized height / patch) x (resized width / patch) / merge^2.
``video_min_pixels`` / ``video_max_pixels`` bound each frame's pixels (the video processor's ``size``, applied per
frame, with its whole-video budget ``cap_pixels_per_frame`` off): a video costs at most
``video_max_frames / 2 x video_max_pixels / (patch x merge)^2`` tokens. The frame count comes from the metadata
(``vlmtune.data.video.sample_indices``), so the length is known before decoding. Qwen2.5-VL's positions also take
the seconds per temporal patch (``second_per_grid_ts``), from the sampled frame rate.
"""

from __future__ import annotations

import re

import torch
from PIL import Image

from vlmtune.data.chat import IGNORE, Encoded, label_segments
from vlmtune.data.video import Clip, VideoInfo, sample_indices


def counts_image_tokens(processor) -> bool:
    """True where image tokens are counted from image sizes alone (the Qwen-VL image processors)."""
    ip = getattr(processor, "image_processor", None)
    return hasattr(ip, "merge_size") and hasattr(ip, "get_number_of_image_patches")


def video_refusal(processor) -> str | None:
    """Why this model's processor cannot take a sample's videos, or None where it can (Qwen2-VL's video processor
    behind a counted processor: Qwen2-VL, Qwen2.5-VL)."""
    from transformers import Qwen2VLVideoProcessor

    vp = getattr(processor, "video_processor", None)
    name = type(processor).__name__
    if vp is None or getattr(processor, "video_token", None) is None:
        return f"this model's processor ({name}) takes no videos; videos train Qwen2-VL and Qwen2.5-VL models"
    if counts_image_tokens(processor) and isinstance(vp, Qwen2VLVideoProcessor):
        return None
    return (
        f"vlmtune reads videos for Qwen2-VL and Qwen2.5-VL models; this model's {name} (with "
        f"{type(vp).__name__}) is not supported for videos yet: give its frames as images, or use a Qwen2-VL model"
    )


def temporal_patch(processor) -> int:
    """Frames per temporal patch of the video processor (2 for Qwen-VL); a video's frame count is a multiple of it."""
    return getattr(getattr(processor, "video_processor", None), "temporal_patch_size", None) or 2


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


def _patches(part, smart_resize, height: int, width: int, min_pixels, max_pixels) -> tuple[int, int]:
    """(height, width) in patches after ``part`` (an image or video processor) resizes a picture within its pixel
    bounds with its own ``smart_resize``."""
    patch = part.patch_size
    h, w = smart_resize(
        height,
        width,
        patch * part.merge_size,
        min_pixels=min_pixels or part.size["shortest_edge"],
        max_pixels=max_pixels or part.size["longest_edge"],
    )
    return h // patch, w // patch


def image_grid(
    processor, height: int, width: int, min_pixels: int | None, max_pixels: int | None
) -> tuple[int, int, int]:
    """The (temporal, height, width) patch grid a Qwen-VL image processor makes for an image of this size, without
    decoding it (the same ``smart_resize`` the processor runs; one temporal patch for a still image)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    return 1, *_patches(processor.image_processor, smart_resize, height, width, min_pixels, max_pixels)


def video_grid(
    processor, frames: int, height: int, width: int, min_pixels: int | None, max_pixels: int | None
) -> tuple[int, int, int]:
    """The (temporal, height, width) patch grid Qwen2-VL's video processor makes for ``frames`` frames of this size
    (each frame resized within the pixel bounds by the processor's ``smart_resize``), without decoding them."""
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize

    vp = processor.video_processor
    return -(-frames // vp.temporal_patch_size), *_patches(vp, smart_resize, height, width, min_pixels, max_pixels)


def video_token_counts(
    processor, infos: list[VideoInfo], fps: float, max_frames: int, min_pixels: int | None, max_pixels: int | None
) -> list[int]:
    """Video tokens of each video, from its metadata: the frames ``sample_indices`` takes, each resized within the
    per-frame pixel bounds."""
    merge = processor.video_processor.merge_size
    out = []
    for info in infos:
        frames = len(sample_indices(info, fps, max_frames, temporal_patch(processor)))
        t, h, w = video_grid(processor, frames, info.height, info.width, min_pixels, max_pixels)
        out.append(t * h * w // merge**2)
    return out


def encode_text(processor, chat: list[dict], counts: list[int], video_counts: list[int] | None = None) -> Encoded:
    """Token ids and labels of a conversation whose i-th image becomes ``counts[i]`` image tokens and i-th video
    ``video_counts[i]`` video tokens."""
    tok = processor.tokenizer
    video_counts = list(video_counts or [])
    pending = {processor.image_token: ("image", list(counts))}
    video_token = getattr(processor, "video_token", None)
    if video_token:  # a video part the template renders without a count is an error, not text
        pending[video_token] = ("video", list(video_counts))
    elif video_counts:
        raise ValueError(f"this model's processor ({type(processor).__name__}) takes no videos")
    spans: dict[str, list[tuple[int, int]]] = {token: [] for token in pending}
    marks = re.compile("(" + "|".join(re.escape(token) for token in pending) + ")")
    ids: list[int] = []
    labels: list[int] = []
    for text, is_answer in label_segments(processor, chat):
        for piece in marks.split(text):
            if piece in pending:
                kind, remaining = pending[piece]
                if not remaining:
                    raise ValueError(f"the chat template produced more {kind} tokens than the sample has {kind}s")
                n = remaining.pop(0)
                spans[piece].append((len(ids), len(ids) + n))
                ids += [tok.convert_tokens_to_ids(piece)] * n
                labels += [IGNORE] * n
            elif piece:
                piece_ids = tok(piece, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                labels += piece_ids if is_answer else [IGNORE] * len(piece_ids)
    for (kind, remaining), given in zip(pending.values(), (counts, video_counts)):
        if remaining:
            raise ValueError(
                f"the chat template rendered {len(given) - len(remaining)} {kind} placeholder(s) for "
                f"{len(given)} {kind}(s)"
            )
    return Encoded(ids, labels, spans[processor.image_token], spans.get(video_token, []))


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


def process_videos(processor, clips: list[Clip], min_pixels: int | None, max_pixels: int | None) -> dict:
    """``pixel_values_videos`` and ``video_grid_thw`` of a sample's decoded videos from the processor's own video
    processor (frames as sampled: its own sampling off; per-frame pixel bounds), and for Qwen2.5-VL the seconds per
    temporal patch (``second_per_grid_ts``, as its processor computes them from the sampled frame rate)."""
    if not clips:
        return {}
    vp = processor.video_processor
    size = dict(vp.size)
    if min_pixels:
        size["shortest_edge"] = min_pixels
    if max_pixels:
        size["longest_edge"] = max_pixels
    kwargs = {"size": size, "do_sample_frames": False, "input_data_format": "channels_first"}
    if "cap_pixels_per_frame" in getattr(vp.valid_kwargs, "__annotations__", {}):
        kwargs["cap_pixels_per_frame"] = False  # the bounds are per frame; video_max_frames bounds the whole
    out = dict(vp(videos=[c.frames for c in clips], return_tensors="pt", **kwargs))
    if "second_per_grid_ts" in processor.model_input_names:
        out["second_per_grid_ts"] = torch.tensor([vp.temporal_patch_size / c.sampled_fps for c in clips])
    return out


def grid_token_counts(processor, pixels: dict, key: str = "image_grid_thw") -> list[int]:
    """Tokens of each processed image (or video, with ``key="video_grid_thw"``) of a counted (Qwen-VL) family: its
    grid's patches / merge_size^2."""
    merge = getattr(processor.image_processor, "merge_size", 1)
    return [int(g.prod()) // merge**2 for g in pixels.get(key, [])]
