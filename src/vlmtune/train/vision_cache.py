"""Frozen vision-tower features computed once and kept on disk, so training runs projector + language model only.

When the vision tower trains in no stage and augmentation is off, its output for an image (the projector's input)
never changes. The cache stores it per image, keyed by the image file's bytes, the image processor's settings and
the pixel bounds (``ImageKeys``), under a folder named by a fingerprint of the vision tower's weights (a changed
model never reads old entries). With the cache on, the training dataset neither decodes nor preprocesses an image:
it counts the image tokens from the image's size and reads each image's cached features (in the data-loader's
worker processes, when there are any), and the batch carries them with the images' patch grids. Training then
hands the model its image embeddings through transformers' ``mm_encoder_outputs`` argument, computed by the
(trainable) projector from the cached features inside the model's forward (a forward pre-hook), so DDP sees the
projector used like any other module.

Supported families: those whose projector maps the tower's output to the image embeddings directly: Qwen2-VL, and
Qwen2.5-VL, whose tower works in window order (the cached features are in that order; the hook puts the
projector's output back in image order, as the tower's own forward does). Not Qwen3-VL: its language model also
takes features from inside the tower (deepstack).

Videos are not cached: a batch's videos are decoded and go through the frozen tower at every step (the same hook hands
their features to the model with the cached images' ones, since the model takes either pixels or encoder outputs).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from vlmtune.checks import inner_model
from vlmtune.data.collate import CACHED
from vlmtune.data.counted import image_grid, process_images
from vlmtune.data.media import load_image
from vlmtune.model.archs import REGISTRY, ArchSpec
from vlmtune.paths import cache_dir
from vlmtune.tracking import echo


def unavailable(arch: ArchSpec, vision_trains: bool, augment: bool, enabled: bool) -> str | None:
    """Why the cache cannot be used for this run, or None when it can (the family's support is in the registry)."""
    if not enabled:
        return "train.vision_cache is false"
    if vision_trains:
        return "the vision tower trains in a stage (its features change)"
    if augment:
        return "data augmentation is on (every epoch sees different pixels)"
    if not arch.vision_cache:
        supported = [t for s in REGISTRY.values() if s.vision_cache for t in s.model_types]
        return f"not available for {arch.name} yet (supported: {', '.join(supported)})"
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


class ImageKeys:
    """Cache keys of image files: a hash of the file's bytes, the image processor's class and settings, the
    transformers version and the pixel bounds. A file's hash is kept while its size and modification time stay the
    same, so each file is read once."""

    def __init__(self, processor):
        import transformers

        ip = processor.image_processor
        self.settings = json.dumps(
            {"class": type(ip).__name__, "transformers": transformers.__version__, **ip.to_dict()},
            sort_keys=True,
            default=str,
        )
        self._files: dict[str, tuple[tuple[int, int], str]] = {}

    def file_hash(self, path: str) -> str:
        st = os.stat(path)
        signature = (st.st_size, st.st_mtime_ns)
        known = self._files.get(path)
        if known is None or known[0] != signature:
            known = (signature, hashlib.sha256(Path(path).read_bytes()).hexdigest())
            self._files[path] = known
        return known[1]

    def key(self, path: str, min_pixels: int | None, max_pixels: int | None) -> str:
        h = hashlib.sha256(self.file_hash(str(path)).encode())
        h.update(self.settings.encode())
        h.update(f"min_pixels={min_pixels} max_pixels={max_pixels}".encode())
        return h.hexdigest()


class VisionCache:
    """Per-image safetensors files under ``root/<fingerprint>/``; ``inner`` is the multimodal model whose
    ``get_image_features`` computes them and ``projector`` the module whose input they are."""

    def __init__(
        self, root: Path, model_fingerprint: str, inner: nn.Module | None = None, projector: nn.Module | None = None
    ):
        self.dir = root / model_fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)
        self.damaged: list[Path] = []  # entries found damaged (and removed, to be recomputed)
        self.inner = inner
        self.projector = projector

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        """Whether an intact entry exists; a damaged one (its header does not describe the file, e.g. a truncated
        write from another tool or a full disk) is removed and counted in ``damaged``, so that it is recomputed."""
        path = self.path(key)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), "pt") as f:
                if "features" in f.keys():
                    return True
        except (OSError, SafetensorError):
            pass
        path.unlink(missing_ok=True)
        self.damaged.append(path)
        return False

    def put(self, key: str, features: torch.Tensor) -> None:
        path = self.path(key)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({"features": features.detach().cpu().contiguous()}, str(tmp))
        tmp.rename(path)  # a reader never sees half a file

    def get(self, key: str, device="cpu", image: str = "") -> torch.Tensor:
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(
                f"vision cache: no features for image '{image or key}' in {self.dir} (the cache is "
                "filled before training; was the image changed while the run was going?)"
            )
        return load_file(str(path), device=str(device))["features"]

    def reader(self) -> VisionCache:
        """The same cache without the model (what a dataset, and its worker processes, hold)."""
        return VisionCache(self.dir.parent, self.dir.name)


@torch.no_grad()
def fill(
    cache: VisionCache,
    inner: nn.Module,
    projector: nn.Module,
    todo: Iterable[tuple[str, dict]],
    device,
    images_per_pass: int = 8,
) -> int:
    """Computes and stores the projector input of every (key, pixel inputs of one image) in ``todo``, running the
    vision tower on ``images_per_pass`` images at a time. Returns how many were stored."""
    captured: list[torch.Tensor] = []
    hook = projector.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    stored = 0

    def run(group: list[tuple[str, dict]]) -> int:
        captured.clear()
        grid = torch.cat([pixels["image_grid_thw"] for _, pixels in group])
        inner.get_image_features(
            pixel_values=torch.cat([pixels["pixel_values"] for _, pixels in group]).to(device),
            image_grid_thw=grid.to(device),
        )
        start = 0
        for (key, _), rows in zip(group, _image_rows(grid)):
            cache.put(key, captured[0][start : start + rows])
            start += rows
        return len(group)

    try:
        group: list[tuple[str, dict]] = []
        for item in todo:
            group.append(item)
            if len(group) == images_per_pass:
                stored += run(group)
                group = []
        if group:
            stored += run(group)
    finally:
        hook.remove()
    return stored


def missing_images(ds, keys: ImageKeys, cache: VisionCache) -> tuple[dict[str, tuple[str, int | None, int]], int]:
    """The dataset's images the cache lacks, by key, as (path, max_pixels, patches), and how many images it has."""
    todo: dict[str, tuple[str, int | None, int]] = {}
    seen: set[str] = set()
    for item in ds.items:
        for path, (h, w) in zip(item.sample.images, item.sizes):
            key = keys.key(path, ds.data.image_min_pixels, item.max_pixels)
            if key in seen:
                continue
            seen.add(key)
            if cache.has(key):
                continue
            t, gh, gw = image_grid(ds.processor, h, w, ds.data.image_min_pixels, item.max_pixels)
            todo[key] = (str(path), item.max_pixels, t * gh * gw)
    return todo, len(seen) - len(todo)


def _image_order(inner: nn.Module, arch: ArchSpec):
    """For a tower that works in window order (Qwen2.5-VL), a function from one image's grid to the indices that put
    its merged tokens back in image order; None where the projector's output is already in image order."""
    if not arch.window_order:
        return None
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import get_vision_window_index

    visual = inner.visual

    def order(grid: torch.Tensor) -> torch.Tensor:
        window, _ = get_vision_window_index(
            grid[None].cpu(), visual.spatial_merge_size, visual.window_size, visual.patch_size
        )
        return torch.argsort(window)

    return order


def feed_cached_features(inner: nn.Module, projector: nn.Module, arch: ArchSpec):
    """A forward pre-hook on the multimodal model: turns ``cached_vision`` into ``mm_encoder_outputs`` by running
    the projector on each image's cached features (then, for a window-order tower, restoring image order).
    Returns the hook handle."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    order = _image_order(inner, arch)

    def hook(module, args, kwargs):
        cached = kwargs.pop(CACHED, None)
        if cached is None:
            return args, kwargs
        embeds = [projector(f) for f in cached]
        if order is not None:
            embeds = [e[order(grid).to(e.device)] for e, grid in zip(embeds, kwargs["image_grid_thw"])]
        outputs = {"image": BaseModelOutputWithPooling(pooler_output=tuple(embeds))}
        videos = kwargs.pop("pixel_values_videos", None)
        if videos is not None:  # not cached: the tower (frozen) and the projector run on them now
            outputs["video"] = inner.get_video_features(videos, kwargs["video_grid_thw"], return_dict=True)
        kwargs["mm_encoder_outputs"] = outputs
        return args, kwargs

    return inner.register_forward_pre_hook(hook, with_kwargs=True)


def open_cache(cfg, stages, model: nn.Module, gmap, union) -> VisionCache | None:
    """The run's vision-feature cache when it is valid (the tower trains in no stage, no augmentation), else None;
    when valid, the model is set to read cached features (see ``feed_cached_features``)."""

    base = inner_model(model)
    vision_trains = next(p for p in union if p.group == "vision_tower").mode != "frozen"
    augment = any(s.cfg.data.augment.enabled for s in stages)
    why = unavailable(gmap.arch, vision_trains, augment, cfg.train.vision_cache)
    if why is None and cfg.train.sharding == "fsdp":  # one process fills it while the others wait
        why = "train.sharding is fsdp: the tower's blocks are split across processes, which all run them together"
    if why is not None:
        echo(f"vision cache: off ({why})")
        return None
    tower = [n for n, p in base.named_parameters() if gmap.group_of(n) == "vision_tower"]
    projector = base.get_submodule(gmap.layout.patterns["projector"][0])
    cache = VisionCache(cache_dir() / "vision", fingerprint(base, tower), inner=base.model, projector=projector)
    feed_cached_features(cache.inner, projector, gmap.arch)
    echo(f"vision cache: on ({cache.dir}); the frozen vision tower runs once per image, then only the projector")
    return cache


def fill_cache(
    cache: VisionCache, keys: ImageKeys, accelerator, model: nn.Module, ds, batch_size: int, progress_bar: bool
) -> None:
    """Computes the features of a dataset's images that the cache lacks (main process; the others wait)."""
    from tqdm.auto import tqdm

    base = inner_model(model)
    if accelerator.is_main_process:
        todo, found = missing_images(ds, keys, cache)
        vision = base.config.vision_config
        width = getattr(vision, "embed_dim", None) or vision.hidden_size  # the tower's output = the projector's input
        size = sum(patches for _, _, patches in todo.values()) * width * next(base.parameters()).element_size()
        echo(f"vision cache: {len(todo)} image(s) to compute (about {size / 2**20:.1f} MiB), {found} already cached")
        if cache.damaged:
            echo(
                f"vision cache: {len(cache.damaged)} damaged entr(y/ies) removed and computed again, e.g. {cache.damaged[0]}"
            )

        def pixels():
            for key, (path, max_pixels, _) in todo.items():
                yield key, process_images(ds.processor, [load_image(path, path)], ds.data.image_min_pixels, max_pixels)

        was_training = cache.inner.training
        cache.inner.eval()
        bar = tqdm(
            pixels(), total=len(todo), desc="vision cache", dynamic_ncols=True, disable=not progress_bar or not todo
        )
        computed = fill(cache, cache.inner, cache.projector, bar, accelerator.device, images_per_pass=batch_size)
        cache.inner.train(was_training)
        if todo:
            echo(f"vision cache: {computed} image(s) computed")
    accelerator.wait_for_everyone()
