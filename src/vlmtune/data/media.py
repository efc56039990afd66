"""A sample's images and videos opened from disk: headers read for the checks, pixels decoded for training.

Every error names the sample (its ``file:line``) and the file, and says what would be valid.
"""

from __future__ import annotations

from PIL import Image

from vlmtune.config.data import DataConfig
from vlmtune.data.sharegpt import Problem, Sample
from vlmtune.data.video import Clip, VideoError, VideoInfo, decode_all, read_video, sample_indices, video_info


def min_image_size(processor) -> tuple[int, int]:
    """(shortest side, pixels) below which the processor has to invent detail: one merged patch per side,
    and its own ``min_pixels`` (Qwen2-VL's ``size["shortest_edge"]`` is a pixel count)."""
    ip = processor.image_processor
    side = (getattr(ip, "patch_size", None) or 1) * (getattr(ip, "merge_size", None) or 1)
    size = getattr(ip, "size", None) or {}
    return side, int(size.get("shortest_edge") or 0) if "longest_edge" in size else 0


def inspect_images(sample: Sample, processor, decode: bool = True) -> tuple[list[tuple[int, int]], list[Problem]]:
    """(height, width) of each image, opening one at a time, and the problems found.

    With ``decode`` every pixel is read, which finds truncated and corrupt files that open fine.
    """
    min_side, min_pixels = min_image_size(processor)
    sizes, problems = [], []
    for p in sample.images:
        try:
            with Image.open(p) as im:
                size = (im.height, im.width)
                if decode:
                    im.load()
        except Exception as e:  # PIL raises several types for corrupt files
            problems.append(Problem(sample.where, "image unreadable", f"image '{p}' cannot be opened: {e}"))
            continue
        sizes.append(size)
        h, w = size
        if min(h, w) < min_side or h * w < min_pixels:
            problems.append(
                Problem(
                    sample.where,
                    "image too small",
                    f"image '{p}' is {w}x{h}, smaller than the processor's "
                    f"minimum ({min_side} px a side, {min_pixels} pixels); it would be upscaled",
                )
            )
    return sizes, problems


def inspect_videos(sample: Sample, data: DataConfig) -> tuple[list[VideoInfo], list[Problem]]:
    """The metadata of each video (headers only), and the problems found ("video unreadable").

    With ``data.decode_images`` every frame is decoded too, which finds corrupt and truncated files whose headers
    read fine.
    """
    infos, problems = [], []
    for p in sample.videos:
        try:
            info = video_info(p, data.video_fps)
            if data.decode_images:
                decode_all(p, info)
        except VideoError as e:
            problems.append(Problem(sample.where, "video unreadable", str(e)))
            continue
        infos.append(info)
    return infos, problems


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


def load_videos(sample: Sample, data: DataConfig, multiple: int = 2) -> list[Clip]:
    """Decodes a sample's videos, each sampled at ``data.video_fps`` (at most ``data.video_max_frames`` frames, a
    multiple of ``multiple``: the processor's temporal patch size).

    Raises:
        ValueError: a video cannot be read; names the sample and the path.
    """
    clips = []
    for path in sample.videos:
        try:
            info = video_info(path, data.video_fps)
            clips.append(read_video(path, info, sample_indices(info, data.video_fps, data.video_max_frames, multiple)))
        except VideoError as e:
            raise ValueError(f"{sample.where}: {e}") from e
    return clips
