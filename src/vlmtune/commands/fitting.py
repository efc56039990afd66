"""Settings that fit the device with the best throughput: ``vlmtune doctor --fit [SIZE]``, and the micro-batch of
``train.batch_size: auto`` (resolved here before ``vlmtune train`` starts).

``--fit`` keeps what the run computes where it can. It tries, in this order, and stops at the first step with a
setting that fits: the global batch (batch_size x grad_accum) split into micro-batches (same gradients); the same
with gradient checkpointing (same gradients, one more forward); with ``model.quantize: nf4`` (other weights); and
last with ``data.image_max_pixels`` halved, up to four times (other data). Within a step the best throughput wins,
by a stated model of time per sample, not a measurement: 1 + 1/micro-batch (a micro-batch's fixed cost taken as one
sample's), x 4/3 with checkpointing (a second forward in a step of one forward and two backward's worth), x 1.25
with 4-bit weights (dequantizing in every matmul).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlmtune.commands.planner import (
    StagePlan,
    device_memory,
    host_share,
    model_plan,
    plan_run,
    predict,
    settings_of,
)
from vlmtune.config.batch import auto_target
from vlmtune.config.errors import ConfigError
from vlmtune.config.schema import Config
from vlmtune.config.stages import resolve_stages
from vlmtune.model.peak import Host, Prediction, gib

HEADROOM = 0.9  # a plan fits when its peak stays under 90% of the capacity (the rest: fragmentation we do not model)
UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """``24GiB``, ``24G``, ``500MiB``, ``1.5TB`` or plain bytes -> bytes (every unit read as a power of 1024).

    Raises:
        ValueError: not a size.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise ValueError(f"{text!r} is not a memory size (e.g. 24GiB, 500MiB, 80G)")
    return int(float(m.group(1)) * UNITS[m.group(2)])


@dataclass
class Option:
    """A setting and its predicted peak over the stages."""

    batch_size: int
    grad_accum: int
    checkpointing: bool
    quantize: str
    max_pixels: int | None
    predictions: list[Prediction] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(p.total for p in self.predictions)

    @property
    def cost(self) -> float:
        """Relative time per sample (see the module's docstring)."""
        return (
            (1 + 1 / self.batch_size)
            * (4 / 3 if self.checkpointing else 1)
            * (1.25 if self.quantize in ("nf4", "fp4") else 1)
        )

    def overrides(self, cfg: Config) -> list[str]:
        """``key=value`` overrides that turn ``cfg`` into this option."""
        t, out = cfg.train, []
        if t.batch_size != self.batch_size:
            out.append(f"train.batch_size={self.batch_size}")
        if t.grad_accum != self.grad_accum:
            out.append(f"train.grad_accum={self.grad_accum}")
        if t.gradient_checkpointing != self.checkpointing:
            out.append(f"train.gradient_checkpointing={str(self.checkpointing).lower()}")
        if cfg.model.quantize != self.quantize:
            out.append(f"model.quantize={self.quantize}")
        if self.max_pixels != cfg.data.image_max_pixels:
            out.append(f"data.image_max_pixels={self.max_pixels}")
        return out


def divisors(n: int) -> list[int]:
    """Every divisor of n, largest first."""
    return [d for d in range(n, 0, -1) if n % d == 0]


def _with(cfg: Config, checkpointing: bool, quantize: str) -> Config:
    train = cfg.train.model_copy(update={"gradient_checkpointing": checkpointing})
    return cfg.model_copy(update={"train": train, "model": cfg.model.model_copy(update={"quantize": quantize})})


def _options(
    cfg: Config, folder: Path, device: torch.device, plans: list[StagePlan], host: Host, capacity: int, sizes: list[int],
    checkpointing: bool, quantize: str, pixels: list[int | None], per_step: int | None, echo,
) -> list[Option]:  # fmt: skip
    """Every (micro-batch, pixel bound) option of one checkpointing and quantization setting."""
    changed = _with(cfg, checkpointing, quantize)
    stages = resolve_stages(changed)
    mp = model_plan(changed, stages, folder, device)
    if (checkpointing, quantize) != (cfg.train.gradient_checkpointing, cfg.model.quantize):  # measured so
        host = host_share(changed, mp, device, echo=echo)
    out = []
    for px in pixels:
        for b in sizes:
            o = Option(b, per_step // b if per_step else cfg.train.grad_accum, checkpointing, quantize, px)
            for stage, facts, sp in zip(stages, mp.stage_facts, plans):
                st = settings_of(stage.cfg, mp, device)
                o.predictions.append(predict(mp, facts, sp.work, st, host, b, px, capacity))
            out.append(o)
    return out


def fit(
    cfg: Config, folder: Path, device: torch.device, capacity: int, host: Host | None = None, echo=print
) -> tuple[Option | None, list[Option]]:
    """The best option that fits ``capacity`` (None when nothing does), and the options tried.

    Raises:
        ConfigError, DataError: as ``vlmtune train`` would raise them for this config.
    """
    _, host, plans = plan_run(cfg, resolve_stages(cfg), folder, device, capacity, host, echo=echo)
    auto, per_step = auto_target(cfg.train.batch_size)
    if auto and per_step is None:
        sizes = list(range(min(len(sp.work.items) or 1 for sp in plans), 0, -1))
    else:
        per_step = per_step or cfg.train.batch_size * cfg.train.grad_accum
        sizes = divisors(per_step)
    t, quantize = cfg.train, cfg.model.quantize
    steps = [(t.gradient_checkpointing, quantize)]
    if not t.gradient_checkpointing:
        steps.append((True, quantize))
    quantizable = any(sp.facts[g].mode != "full" for sp in plans for g in ("vision_tower", "language_model"))
    if quantize == "none" and quantizable:
        steps.append((True, "nf4"))
    tried: list[Option] = []
    for ckpt, q in steps:
        got = _options(
            cfg, folder, device, plans, host, capacity, sizes, ckpt, q, [cfg.data.image_max_pixels], per_step, echo
        )
        tried += got
        fitting = [o for o in got if o.peak <= HEADROOM * capacity]
        if fitting:
            return min(fitting, key=lambda o: (o.cost, -o.batch_size)), tried
    processor_max = plans[0].work.processor.image_processor.size.get("longest_edge") if plans[0].work.items else None
    top = cfg.data.image_max_pixels or processor_max
    if top:
        pixels = [top // 2**k for k in range(1, 5)]
        ckpt, q = steps[-1]
        got = _options(cfg, folder, device, plans, host, capacity, sizes, ckpt, q, pixels, per_step, echo)
        tried += got
        fitting = [o for o in got if o.peak <= HEADROOM * capacity]
        if fitting:
            return min(fitting, key=lambda o: (-(o.max_pixels or 0), o.cost)), tried
    return None, tried


def resolve_batch_size(
    cfg: Config,
    folder: Path,
    device: torch.device,
    echo=print,
    capacity: int | None = None,
    host: Host | None = None,
) -> Config:
    """``cfg`` with ``train.batch_size: auto`` or ``auto:N`` replaced by the largest micro-batch predicted to fit
    ``capacity`` (by default the device's memory; and, for auto:N, grad_accum = N / micro-batch); other configs
    unchanged. ``host``: the CPU process's share (measured when None).

    Raises:
        ConfigError: auto:N with train.grad_accum set too, or not even one sample per micro-batch fits.
    """
    auto, per_step = auto_target(cfg.train.batch_size)
    if not auto:
        return cfg
    if per_step is not None and cfg.train.grad_accum != 1:
        raise ConfigError(
            [
                f"'train.batch_size': {cfg.train.batch_size} sets the samples per optimizer step, so it chooses "
                f"train.grad_accum itself; remove train.grad_accum ({cfg.train.grad_accum}) or give batch_size: auto"
            ]
        )
    capacity = capacity or device_memory(device)
    mp, host, plans = plan_run(cfg, resolve_stages(cfg), folder, device, capacity, host, echo=echo)
    n = min(len(sp.work.items) or 1 for sp in plans)
    sizes = divisors(per_step) if per_step else list(range(min(n, 1024), 0, -1))
    for b in sizes:
        preds = [predict(mp, sp.facts, sp.work, sp.settings, host, b, None, capacity) for sp in plans]
        peak = max(p.total for p in preds)
        if peak <= HEADROOM * capacity:
            accum = per_step // b if per_step else cfg.train.grad_accum
            echo(
                f"train.batch_size: {cfg.train.batch_size} -> {b} (grad_accum {accum}: {b * accum} samples per "
                f"optimizer step); predicted peak {gib(peak)} of {gib(capacity)} on {device}"
            )
            train = cfg.train.model_copy(update={"batch_size": b, "grad_accum": accum})
            return cfg.model_copy(update={"train": train})
    raise ConfigError(
        [
            f"'train.batch_size': {cfg.train.batch_size}: not even {sizes[-1]} sample(s) per micro-batch fit "
            f"(predicted {gib(peak)} against {gib(HEADROOM * capacity)}, 90% of {device}'s {gib(capacity)}); run "
            "`vlmtune doctor CONFIG --fit` for settings that do"
        ]
    )
