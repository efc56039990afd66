"""Videos read with PyAV: metadata from the container's headers, frames decoded and sampled at ``data.video_fps``.

A video is a file (mp4, webm, avi, mkv, mov, ...; PyAV reads what FFmpeg reads) or a folder of frame images (png,
jpg), sorted by name with numbers compared as numbers (``frame_2`` before ``frame_10``); a folder's other files are
not frames and are left alone.

How many frames (``sample_indices``), from the metadata alone, so a sample's token length is known without decoding:
    * a file: ``duration x video_fps`` frames (rounded down), at most ``video_max_frames`` and at most the frames it
      has, taken at the centres of equal stretches of the video;
    * a folder: every frame, as it is, played at ``video_fps``; more than ``video_max_frames`` are taken evenly.
The count is then made a multiple of the temporal patch size (Qwen-VL's towers take frames two at a time): a file's
count is rounded down (never below one patch: a single-frame video gives its frame twice), a folder's last frame is
repeated, as Qwen2-VL's own processor does with an odd count. Decoding always returns exactly that many frames, even
where a container reports a wrong frame count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

VIDEO_SUFFIXES = (".mp4", ".m4v", ".webm", ".avi", ".mkv", ".mov", ".mpeg", ".mpg", ".flv", ".wmv", ".3gp", ".gif")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
VALID = f"a video file ({', '.join(VIDEO_SUFFIXES)}) or a folder of frame images ({', '.join(FRAME_SUFFIXES)})"


class VideoError(ValueError):
    """A video that cannot be read; the message names the file and what would be valid."""


@dataclass(frozen=True)
class VideoInfo:
    """What the headers say: frames in the file (or folder), frames per second, seconds, and each frame's size."""

    frames: int
    fps: float
    duration: float
    height: int
    width: int
    folder: bool = False


@dataclass
class Clip:
    """A decoded video: the sampled frames as a uint8 tensor (frames, 3, height, width), which frame of the video
    each one is, and the video's metadata."""

    frames: torch.Tensor
    indices: list[int]
    info: VideoInfo

    @property
    def sampled_fps(self) -> float:
        """Frames per second of the sampled frames (transformers' ``VideoMetadata.sampled_fps``)."""
        return len(self.indices) / self.info.frames * self.info.fps


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def frame_files(folder: Path) -> list[Path]:
    """A folder's frame images in frame order."""
    found = [p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and not p.name.startswith(".")]
    return sorted(found, key=lambda p: _natural(p.name))


def video_info(path: str | Path, folder_fps: float) -> VideoInfo:
    """Frame count, frame rate, duration and frame size, from headers only (a container that does not record its
    frame count has its packets counted, still without decoding). A folder's frames play at ``folder_fps``.

    Raises:
        VideoError: not a video, or unreadable; the message names the file.
    """
    path = Path(path)
    if path.is_dir():
        frames = frame_files(path)
        if not frames:
            raise VideoError(f"video folder '{path}' holds no frame images ({', '.join(FRAME_SUFFIXES)})")
        sizes = {}
        for f in frames:
            try:
                with Image.open(f) as im:
                    sizes.setdefault(im.size, f)
            except Exception as e:  # PIL raises several types for corrupt files
                raise VideoError(f"frame '{f}' of video folder '{path}' cannot be opened: {e}") from e
        if len(sizes) > 1:
            (w0, h0), (w1, h1) = list(sizes)[:2]
            raise VideoError(
                f"video folder '{path}' mixes frame sizes ({w0}x{h0} in '{sizes[(w0, h0)].name}', {w1}x{h1} in "
                f"'{sizes[(w1, h1)].name}'); every frame of a video has one size"
            )
        ((width, height),) = sizes
        return VideoInfo(len(frames), folder_fps, len(frames) / folder_fps, height, width, folder=True)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise VideoError(f"'{path}' is not a video (suffix '{path.suffix}'); a video is {VALID}")
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"video '{path}' holds no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            rate = stream.average_rate or stream.guessed_rate
            frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            else:
                duration = 0.0
    except VideoError:
        raise
    except Exception as e:  # FFmpeg's errors (invalid data, unsupported codec, I/O) have several types
        raise VideoError(f"video '{path}' cannot be opened: {e}") from e
    fps = float(rate) if rate else (frames / duration if duration > 0 else 0.0)
    if frames <= 0 or width <= 0 or height <= 0 or fps <= 0:
        raise VideoError(
            f"video '{path}' has no readable frames (headers say {frames} frame(s) of {width}x{height} at {fps:g} fps)"
        )
    return VideoInfo(frames, fps, duration if duration > 0 else frames / fps, height, width)


def sample_indices(info: VideoInfo, fps: float, max_frames: int, multiple: int = 2) -> list[int]:
    """Which frames of the video are taken (see the module's docstring); their count is a multiple of
    ``multiple``, at least ``multiple``."""
    cap = max(multiple, max_frames // multiple * multiple)
    if info.folder:
        n = min(info.frames, cap)
        picked = _even(info.frames, n) if n < info.frames else list(range(n))
        return picked + picked[-1:] * (-len(picked) % multiple)
    n = min(int(info.duration * fps + 1e-6), info.frames, cap)
    return _even(info.frames, max(multiple, n // multiple * multiple))


def _even(total: int, n: int) -> list[int]:
    """n frame indices of ``total``, at the centres of n equal stretches."""
    return [min(total - 1, int((i + 0.5) * total / n)) for i in range(n)]


def read_video(path: str | Path, info: VideoInfo, indices: list[int]) -> Clip:
    """The frames at ``indices`` (in order, repeats allowed) as RGB, every one at the size the headers give.

    Raises:
        VideoError: the file does not decode; the message names it.
    """
    path = Path(path)
    if info.folder:
        files = frame_files(path)
        arrays = []
        for i in indices:
            file = files[min(i, len(files) - 1)]
            try:
                with Image.open(file) as im:
                    arrays.append(np.asarray(im.convert("RGB")))
            except Exception as e:  # PIL raises several types for corrupt files
                raise VideoError(f"frame '{file}' of video folder '{path}' cannot be decoded: {e}") from e
        if len({a.shape for a in arrays}) > 1:
            raise VideoError(f"video folder '{path}' mixes frame sizes; every frame of a video has one size")
    else:
        arrays = _decode(path, info, indices)
    frames = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return Clip(frames, list(indices), info)


def _decode(path: Path, info: VideoInfo, indices: list[int]) -> list[np.ndarray]:
    import av

    def rgb(frame) -> np.ndarray:
        return frame.to_ndarray(format="rgb24", width=info.width, height=info.height)

    order = sorted(range(len(indices)), key=indices.__getitem__)
    out: list[np.ndarray | None] = [None] * len(indices)
    at, tail = 0, None  # the next wanted index (in order), the last frame decoded
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for k, tail in enumerate(container.decode(stream)):
                if indices[order[at]] != k:
                    continue
                frame = rgb(tail)
                while at < len(order) and indices[order[at]] == k:
                    out[order[at]] = frame
                    at += 1
                if at == len(order):
                    break  # every wanted frame is in: the rest is never decoded
    except Exception as e:  # FFmpeg's errors (invalid data, unsupported codec, I/O) have several types
        raise VideoError(f"video '{path}' cannot be decoded: {e}") from e
    if tail is None:
        raise VideoError(f"video '{path}' has no frame that decodes")
    if at < len(order):  # fewer frames than the headers said: the last one stands in for the missing ones
        frame = rgb(tail)
        for k in order[at:]:
            out[k] = frame
    return out


def decode_all(path: str | Path, info: VideoInfo) -> int:
    """Decodes every frame (what finds a corrupt or truncated file whose headers read fine); returns the count.

    Raises:
        VideoError: a frame does not decode, or none does; the message names the file.
    """
    path = Path(path)
    if info.folder:
        read_video(path, info, list(range(info.frames)))
        return info.frames
    import av

    count = 0
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for _ in container.decode(stream):
                count += 1
    except Exception as e:  # FFmpeg's errors have several types
        raise VideoError(f"video '{path}' cannot be decoded after frame {count}: {e}") from e
    if count == 0:
        raise VideoError(f"video '{path}' has no frame that decodes")
    return count
