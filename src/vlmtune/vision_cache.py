"""Frozen vision-tower features computed once and kept on disk, so training runs projector + language model only.

When the vision tower trains in no stage and augmentation is off, its output for an image (the projector's input)
never changes. The cache stores it per image, keyed by the image's processed pixels and grid (so image content and
processor settings are in the key) under a folder named by a fingerprint of the vision tower's weights (a changed
model never reads old entries). Training then hands the model its image embeddings through transformers'
``mm_encoder_outputs`` argument, computed by the (trainable) projector from the cached features inside the model's
forward (a forward pre-hook), so DDP sees the projector used like any other module.

Supported families: those whose projector maps the tower's output to the image embeddings directly (Qwen2-VL).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

SUPPORTED = ("qwen2_vl",)
CACHED = "cached_vision"  # the batch key holding per-image cached features in place of pixel_values


def unavailable(model_type: str, vision_trains: bool, augment: bool, enabled: bool) -> str | None:
    """Why the cache cannot be used for this run, or None when it can."""
    if not enabled:
        return "train.vision_cache is false"
    if vision_trains:
        return "the vision tower trains in a stage (its features change)"
    if augment:
        return "data augmentation is on (every epoch sees different pixels)"
    if model_type not in SUPPORTED:
        return f"not available for model_type '{model_type}' yet (supported: {', '.join(SUPPORTED)})"
    return None


def fingerprint(model: nn.Module, names: list[str]) -> str:
    """A hash of the named parameters' values, dtypes and shapes (the vision tower's, without the projector)."""
    h = hashlib.sha256()
    params = dict(model.named_parameters())
    for name in sorted(names):
        p = params[name].detach()
        h.update(f"{name}:{p.dtype}:{tuple(p.shape)}".encode())
        h.update(p.float().cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def _image_rows(grid: torch.Tensor) -> list[int]:
    return [int(g.prod()) for g in grid]


class VisionCache:
    """Per-image safetensors files under ``root/<fingerprint>/``; ``inner`` is the multimodal model whose
    ``get_image_features`` computes them and ``projector`` the module whose input they are."""

    def __init__(self, root: Path, model_fingerprint: str, inner: nn.Module | None = None,
                 projector: nn.Module | None = None):
        self.dir = root / model_fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)
        self.inner = inner
        self.projector = projector

    @staticmethod
    def keys(batch: dict) -> list[str]:
        """One key per image of the batch: its processed pixel rows and grid."""
        keys, start = [], 0
        pixels, grid = batch["pixel_values"], batch["image_grid_thw"]
        for g, rows in zip(grid, _image_rows(grid)):
            h = hashlib.sha256(pixels[start:start + rows].detach().float().cpu().contiguous().numpy())  # no copy
            h.update(str(g.tolist()).encode())
            keys.append(h.hexdigest())
            start += rows
        return keys

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def missing(self, keys: list[str]) -> list[str]:
        return [k for k in keys if not self.path(k).is_file()]

    def put(self, key: str, features: torch.Tensor) -> None:
        path = self.path(key)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"features": features.detach().cpu().contiguous()}, str(tmp))
        tmp.rename(path)  # a reader never sees half a file

    def get(self, key: str, device) -> torch.Tensor:
        return load_file(str(self.path(key)), device=str(device))["features"]

    def substitute(self, batch: dict) -> dict:
        """The batch with its images' cached features in place of ``pixel_values`` (the grid stays: positions need it)."""
        if "pixel_values" not in batch:
            return batch
        device = batch["pixel_values"].device
        out = {k: v for k, v in batch.items() if k != "pixel_values"}
        out[CACHED] = [self.get(k, device) for k in self.keys(batch)]
        return out


@torch.no_grad()
def fill(cache: VisionCache, inner: nn.Module, projector: nn.Module, loader, device, echo=print,
         progress: bool = True) -> tuple[int, int]:
    """Computes and stores the projector input of every image the loader yields that the cache lacks.

    Returns:
        (images computed now, images found in the cache).
    """
    from tqdm.auto import tqdm

    captured: list[torch.Tensor] = []
    hook = projector.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    computed = found = 0
    try:
        for batch in tqdm(loader, desc="vision cache", disable=not progress, dynamic_ncols=True):
            if "pixel_values" not in batch:
                continue
            keys = VisionCache.keys(batch)
            todo = set(cache.missing(keys))
            found += len(keys) - len(todo)
            if not todo:
                continue
            captured.clear()
            inner.get_image_features(pixel_values=batch["pixel_values"].to(device),
                                     image_grid_thw=batch["image_grid_thw"].to(device))
            features = captured[0]
            start = 0
            for key, rows in zip(keys, _image_rows(batch["image_grid_thw"])):
                if key in todo:
                    cache.put(key, features[start:start + rows])
                    todo.discard(key)
                    computed += 1
                start += rows
    finally:
        hook.remove()
    return computed, found


def expected_bytes(ds, processor, width: int, dtype: torch.dtype) -> int:
    """Size the features of a dataset's images will take, from their sizes alone (headers, nothing decoded)."""
    from PIL import Image

    from vlmtune.data.collate import image_token_counts

    merge = getattr(processor.image_processor, "merge_size", 1)
    rows = 0
    for item in ds.items:
        sizes = []
        for path in item.sample.images:
            with Image.open(path) as im:
                sizes.append((im.height, im.width))
        rows += sum(image_token_counts(processor, sizes, ds.data.image_min_pixels, item.max_pixels)) * merge**2
    return rows * width * torch.empty((), dtype=dtype).element_size()


def install(inner: nn.Module, projector: nn.Module):
    """A forward pre-hook on the multimodal model: turns ``cached_vision`` into ``mm_encoder_outputs`` by running
    the projector on each image's cached features. Returns the hook handle."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    def hook(module, args, kwargs):
        cached = kwargs.pop(CACHED, None)
        if cached is None:
            return args, kwargs
        embeds = tuple(projector(f) for f in cached)
        kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=embeds)}
        return args, kwargs

    return inner.register_forward_pre_hook(hook, with_kwargs=True)
