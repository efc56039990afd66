"""Seeded visual augmentation of training images with torchvision's transforms (train split only).

Every random draw comes from a generator seeded by (seed, sample index, epoch, image), never from the
global torch or Python state, so a resumed run sees exactly the images the interrupted one would have.
A crop is resized back to the image's own size: the processor then maps it into its pixel bounds exactly
as it maps the original, so the image-token count (and the length limit checked before training) holds.
Horizontal flips are off by default because answers may say "left" or "right"; hue is 0 by default
because answers may name colours.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from PIL import Image, ImageStat

from vlmtune.config.data import AugmentConfig


@dataclass(frozen=True)
class AugmentParams:
    """One draw: what is done to one image."""

    crop: tuple[int, int, int, int]  # top, left, height, width of the region kept
    brightness: float
    contrast: float
    saturation: float
    hue: float
    order: tuple[int, ...]  # the order the four colour adjustments are applied in, as torchvision's ColorJitter
    angle: float
    flip: bool

    def describe(self, size: tuple[int, int]) -> str:
        """A short text for previews: crop area, colour factors, angle, flip."""
        top, left, h, w = self.crop
        area = h * w / (size[0] * size[1])
        parts = [f"crop {area:.0%}", f"b{self.brightness:.2f} c{self.contrast:.2f} s{self.saturation:.2f}"]
        if self.hue:
            parts.append(f"h{self.hue:+.2f}")
        parts.append(f"rot {self.angle:+.1f}")
        if self.flip:
            parts.append("flip")
        return " ".join(parts)


def generator_for(seed: int, index: int, epoch: int, image: int) -> torch.Generator:
    """A CPU generator that depends only on its arguments (a hash, so nearby seeds do not correlate)."""
    digest = hashlib.blake2b(f"{seed}/{index}/{epoch}/{image}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _crop_box(cfg: AugmentConfig, height: int, width: int, gen: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawn from ``gen``: area fraction and log-uniform aspect ratio."""
    area = height * width
    log_ratio = (math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]))
    for _ in range(10):
        target = area * _uniform(gen, *cfg.crop_scale)
        ratio = math.exp(_uniform(gen, *log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=gen))
            left = int(torch.randint(0, width - w + 1, (), generator=gen))
            return top, left, h, w
    return 0, 0, height, width  # as torchvision's fallback, simplified: the whole image


def draw_params(cfg: AugmentConfig, size: tuple[int, int], gen: torch.Generator) -> AugmentParams:
    """Draws one set of parameters for an image of (height, width)."""

    def factor(strength: float) -> float:
        return _uniform(gen, max(0.0, 1 - strength), 1 + strength) if strength else 1.0

    crop = _crop_box(cfg, *size, gen)
    brightness, contrast, saturation = factor(cfg.brightness), factor(cfg.contrast), factor(cfg.saturation)
    hue = _uniform(gen, -cfg.hue, cfg.hue) if cfg.hue else 0.0
    order = tuple(int(i) for i in torch.randperm(4, generator=gen))
    angle = _uniform(gen, -cfg.rotation, cfg.rotation) if cfg.rotation else 0.0
    flip = bool(cfg.flip and float(torch.rand((), generator=gen)) < 0.5)
    return AugmentParams(crop, brightness, contrast, saturation, hue, order, angle, flip)


def apply_params(image: Image.Image, params: AugmentParams) -> Image.Image:
    """Applies one draw with torchvision's functional transforms; the result has the input's size."""
    import torchvision.transforms.v2.functional as F

    size = [image.height, image.width]
    out = F.resized_crop(image, *params.crop, size=size, antialias=True)
    colour = [  # (function, factor, the factor that changes nothing)
        (F.adjust_brightness, params.brightness, 1.0),
        (F.adjust_contrast, params.contrast, 1.0),
        (F.adjust_saturation, params.saturation, 1.0),
        (F.adjust_hue, params.hue, 0.0),
    ]
    for i in params.order:
        fn, value, neutral = colour[i]
        if value != neutral:
            out = fn(out, value)
    if params.angle:
        # Corners are filled with the image's mean colour rather than black, which could read as an object.
        fill = [round(v) for v in ImageStat.Stat(out).mean]
        out = F.rotate(out, params.angle, interpolation=F.InterpolationMode.BILINEAR, fill=fill)
    if params.flip:
        out = F.horizontal_flip(out)
    return out


class Augmenter:
    """Augments the images of a training sample as a function of (seed, index, epoch) only."""

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg

    def params(self, size: tuple[int, int], index: int, epoch: int, image: int = 0) -> AugmentParams:
        return draw_params(self.cfg, size, generator_for(self.cfg.seed, index, epoch, image))

    def __call__(self, image: Image.Image, index: int, epoch: int, image_index: int = 0) -> Image.Image:
        """The augmented copy of ``image``, the ``image_index``-th image of sample ``index``, at ``epoch``."""
        return apply_params(image, self.params((image.height, image.width), index, epoch, image_index))
