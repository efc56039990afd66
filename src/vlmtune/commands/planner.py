"""The memory plan of a config: each stage's predicted peak (``vlmtune.model.memory``, ``vlmtune.model.peak``) from
the model's config and plan without its weights, the training data's real lengths (the longest batch, not the
average), the host's share measured on this machine (``vlmtune.commands.host``) and the device's capacity; then the
settings that fit (``vlmtune doctor --fit``, ``train.batch_size: auto``: ``vlmtune.commands.fitting``).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field, replace
from itertools import accumulate
from pathlib import Path

import torch

from vlmtune.commands.host import measure_host
from vlmtune.config.schema import Config
from vlmtune.config.stages import Stage
from vlmtune.data.counted import counts_image_tokens, image_token_counts, video_token_counts
from vlmtune.data.dataset import build_dataset
from vlmtune.model.build import quantized_groups
from vlmtune.model.groups import assign_groups
from vlmtune.model.load import arch_for, empty_model, resolve_dtype
from vlmtune.model.memory import (
    DTYPE_BYTES,
    Batch,
    GroupFacts,
    Settings,
    TextShape,
    VisionShape,
    activations,
    group_facts,
    text_shape,
    vision_shape,
)
from vlmtune.model.peak import Host, Prediction, assemble
from vlmtune.model.tuning import build_plan
from vlmtune.train.reading import read_lazily
from vlmtune.train.vision_cache import unavailable

FILE_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1}


def device_memory(device: torch.device) -> int:
    """Bytes of memory on the device (GPU total, or the machine's RAM for the CPU, shared by the processes that
    ``LOCAL_WORLD_SIZE`` says run on it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        pass
    return total // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


# ---------------------------------------------------------------------------------------------
# The data: each sample's length, answers and images, and the longest batch of a size
# ---------------------------------------------------------------------------------------------


@dataclass
class Item:
    text: int  # tokens that are not image tokens (video tokens included)
    answers: int
    sizes: list[tuple[int, int]]  # (height, width) of its images
    max_pixels: int | None  # its images' pixel bound (lowered where data.too_long downscaled it)
    video_tokens: int = 0


@dataclass
class Workload:
    """A stage's training split as the planner sees it: counts only, no pixel."""

    items: list[Item]
    processor: object
    min_pixels: int | None
    rows_per_sample: int = 1  # dpo: a pair is a chosen and a rejected row
    lazy_length: int | None = None  # a lazily read split: every row assumed data.max_length long
    merge: int = 4
    _cache: dict = field(default_factory=dict, repr=False)

    def image_tokens(self, item: Item, max_pixels: int | None) -> list[int]:
        bound = min(p for p in (max_pixels, item.max_pixels) if p) if (max_pixels or item.max_pixels) else None
        return image_token_counts(self.processor, item.sizes, self.min_pixels, bound) if item.sizes else []

    def _columns(self, max_pixels: int | None, tower_runs: bool) -> tuple:
        """(longest length, any padding, running sums of the answers, tower patches and vision tokens, largest
        first), once per pixel bound."""
        key = (max_pixels, tower_runs)
        if key not in self._cache:
            lengths, answers, patches, vision = [], [], [], []
            for it in self.items:
                images = sum(self.image_tokens(it, max_pixels))
                lengths.append(it.text + images)
                answers.append(it.answers)
                patches.append(self.merge * ((images if tower_runs else 0) + it.video_tokens))
                vision.append(images + it.video_tokens)
            sums = [list(accumulate(sorted(xs, reverse=True))) for xs in (answers, patches, vision)]
            self._cache[key] = (max(lengths), len(set(lengths)) > 1, *sums)
        return self._cache[key]

    def batch(self, batch_size: int, max_pixels: int | None = None, tower_runs: bool = True) -> Batch:
        """The longest batch of ``batch_size`` samples: rows padded to the longest sample, the largest answer and
        image counts of any ``batch_size`` samples (what grouping by length or an unlucky draw can bring together)."""
        rows = batch_size * self.rows_per_sample
        if self.lazy_length is not None or not self.items:
            n = self.lazy_length or 0
            return Batch(rows, n, rows * n, 0, True)
        length, mixed, answers, patches, vision = self._columns(max_pixels, tower_runs)
        k = min(batch_size, len(answers)) - 1
        padded = mixed and batch_size > 1
        return Batch(rows, length, answers[k] * self.rows_per_sample, patches[k], padded, vision[k])


def workload(scfg: Config, processor) -> Workload:
    """Reads a stage's training split for its counts (image headers only, nothing decoded)."""
    data, method = scfg.data, scfg.train.method
    merge = getattr(getattr(processor, "image_processor", None), "merge_size", 1) ** 2
    lazy = read_lazily(data, scfg.train.group_by_length)[0] if method == "sft" else False
    rows = 2 if method == "dpo" else 1
    if lazy:
        return Workload([], processor, data.image_min_pixels, rows, data.max_length, merge)
    ds = build_dataset(data.train, data.model_copy(update={"decode_images": False}), processor, "train", method)
    counted = counts_image_tokens(processor)
    items = []
    for it in ds.items:
        images = image_token_counts(processor, it.sizes, data.image_min_pixels, it.max_pixels) if counted else []
        videos = (
            video_token_counts(
                processor, it.videos, data.video_fps, data.video_max_frames, data.video_min_pixels, it.video_max_pixels
            )
            if counted and it.videos
            else []
        )
        sizes = it.sizes if counted else []  # other families: image tokens stay in the text count
        items.append(Item(it.length - sum(images), it.answers, sizes, it.max_pixels, sum(videos)))
    return Workload(items, processor, data.image_min_pixels, rows, None, merge if counted else 1)


# ---------------------------------------------------------------------------------------------
# The model without weights; the host; a stage's prediction
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelPlan:
    """What the planner knows of the model: its shapes, each stage's group facts, where its weights are."""

    text: TextShape
    vision: VisionShape | None
    stage_facts: list[dict[str, GroupFacts]]
    itemsize: int
    file_bytes: int  # the safetensors files
    file_itemsize: int  # bytes per weight in the files
    quantized_elements: int  # weights model.quantize holds quantized
    vision_cached: bool  # the vision-feature cache applies: the tower does not run at each step
    arch: str


def _file_facts(folder: Path) -> tuple[int, int]:
    """The safetensors files' total size and their weights' most common bytes per element (from the headers)."""
    total, counts = 0, {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        total += path.stat().st_size
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, t in header.items():
            if name != "__metadata__":
                counts[t["dtype"]] = counts.get(t["dtype"], 0) + t["data_offsets"][1] - t["data_offsets"][0]
    common = max(counts, key=counts.get) if counts else "F32"
    return total, FILE_BYTES.get(common, 4)


def model_plan(cfg: Config, stages: list[Stage], folder: Path, device: torch.device) -> ModelPlan:
    """Shapes, plans and group facts of every stage from the model built on the meta device (no weights read).

    Raises:
        ConfigError: a plan that matches no module (as ``vlmtune train`` would).
    """
    from torch import nn

    shell = empty_model(cfg.model, folder)
    gmap = assign_groups([n for n, _ in shell.named_parameters()], arch_for(shell, cfg.model))
    stage_cfgs = [s.cfg for s in stages]
    qgroups = set(quantized_groups(cfg, stage_cfgs))
    head = shell.get_output_embeddings()
    quantized = {
        n
        for n, m in shell.named_modules()
        if isinstance(m, nn.Linear) and m is not head and gmap.group_of(f"{n}.weight") in qgroups
    }
    itemsize = DTYPE_BYTES[str(resolve_dtype(cfg.model.dtype, device)).removeprefix("torch.")]
    m, plans = cfg.model, [build_plan(shell, gmap, s) for s in stage_cfgs]
    wrapped = any(p.mode == "lora" for stage_plans in plans for p in stage_plans)
    facts = [group_facts(shell, gmap, p, itemsize, quantized, m.quantize, m.double_quant, wrapped) for p in plans]
    vision_trains = any(f["vision_tower"].trainable for f in facts)
    augment = any(s.data.augment.enabled for s in stage_cfgs)
    cached = unavailable(gmap.arch, vision_trains, augment, cfg.train.vision_cache) is None
    cached = cached and all(s.train.method != "grpo" for s in stage_cfgs)
    q_elems = sum(dict(shell.named_modules())[n].weight.numel() for n in quantized)
    file_bytes, file_itemsize = _file_facts(folder)
    config = shell.config
    return ModelPlan(
        text_shape(config),
        vision_shape(config),
        facts,
        itemsize,
        file_bytes,
        file_itemsize,
        q_elems,
        cached,
        gmap.arch.name,
    )


def host_share(cfg: Config, mp: ModelPlan, device: torch.device, echo=print) -> Host:
    """The CPU process's baseline and heap retention (measured once per machine setup), and the weight-file pages it
    maps beside the weights: the files' quantized weights' originals (read through the mapping, which the other
    weights keep alive), or every page where the weights were converted to another dtype. None on a GPU."""
    if device.type != "cpu":
        return Host(how="a GPU's max_memory_allocated: no host share")
    dtype = str(resolve_dtype(cfg.model.dtype, device)).removeprefix("torch.")
    m, ckpt = cfg.model, cfg.train.gradient_checkpointing
    host = measure_host(dtype, m.attn_implementation, m.quantize, ckpt, echo=echo)
    if mp.file_itemsize != mp.itemsize:
        mapped = mp.file_bytes
    else:
        mapped = mp.quantized_elements * mp.file_itemsize
    return replace(host, mapped=mapped)


def settings_of(scfg: Config, mp: ModelPlan, device: torch.device) -> Settings:
    """What of a stage's config the activations depend on."""
    t = scfg.train
    return Settings(
        device.type,
        mp.itemsize,
        t.grad_accum,
        t.gradient_checkpointing,
        t.label_only_logits,
        vision_runs=not mp.vision_cached,
    )


def predict(
    mp: ModelPlan,
    facts: dict[str, GroupFacts],
    work: Workload,
    st: Settings,
    host: Host,
    batch_size: int,
    max_pixels: int | None = None,
    capacity: int | None = None,
) -> Prediction:
    """One stage's prediction at a micro-batch size and image pixel bound."""
    batch = work.batch(batch_size, max_pixels, st.vision_runs)
    p = assemble(facts, activations(mp.text, mp.vision, facts, batch, st), batch, st, host, capacity)
    if work.lazy_length is not None:
        p.notes.append("the split is read lazily: every row is assumed data.max_length long, answers included")
    if work.rows_per_sample > 1:
        p.notes.append("dpo: each sample is two rows (chosen, rejected)")
    return p


@dataclass
class StagePlan:
    """One stage's inputs to the planner and its prediction at the configured batch size."""

    stage: Stage
    facts: dict[str, GroupFacts]
    work: Workload
    settings: Settings
    prediction: Prediction


def plan_run(
    cfg: Config,
    stages: list[Stage],
    folder: Path,
    device: torch.device,
    capacity: int | None = None,
    host: Host | None = None,
    echo=print,
) -> tuple[ModelPlan, Host, list[StagePlan]]:
    """Every stage's prediction at its configured batch size (``train.batch_size: auto`` counts as 1 here).

    Raises:
        ConfigError, DataError: as ``vlmtune train`` would raise them for this config.
    """
    from transformers import AutoProcessor

    mp = model_plan(cfg, stages, folder, device)
    host = host if host is not None else host_share(cfg, mp, device, echo=echo)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code)
    capacity = capacity if capacity is not None else device_memory(device)
    out = []
    for stage, facts in zip(stages, mp.stage_facts):
        work = workload(stage.cfg, processor)
        st = settings_of(stage.cfg, mp, device)
        b = stage.cfg.train.batch_size
        b = b if isinstance(b, int) else 1
        out.append(StagePlan(stage, facts, work, st, predict(mp, facts, work, st, host, b, None, capacity)))
    return mp, host, out
