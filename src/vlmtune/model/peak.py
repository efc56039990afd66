"""A training run's peak memory from its parts (``vlmtune.model.memory``): what stays for the whole run, what one
step adds, on which moment of the step the peak falls, and the host's share on a CPU.

The moments: loading (the process and the weights), the forward and backward of a micro-batch (kept activations,
the largest short-lived tensor, gradients: a backward frees a layer's activations while it makes its gradients, so
with one micro-batch per step the two add up only where the lm_head's gradients come first; with gradient
accumulation they add up), and the optimizer step (gradients, AdamW's two states, its temporaries: one tensor's worth
at a time on a CPU, where torch's AdamW loops over tensors, a whole group's with the foreach kernels of a GPU).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from vlmtune.config.schema import GROUPS
from vlmtune.model.memory import HEAP_MAX, Activations, Batch, GroupFacts, Settings, Tensor
from vlmtune.tracking import text_table


@dataclass(frozen=True)
class Host:
    """The process's own share of a CPU run, measured at run time (``vlmtune.commands.host``); none on a GPU."""

    baseline: int = 0  # the process before any model: interpreter, torch and the libraries, their warmed-up kernels
    retention: float = 1.0  # resident bytes per live byte of activations the heap serves (glibc keeps freed memory)
    mapped: int = 0  # weight-file pages mapped beside the weights (the originals of quantized or converted weights)
    how: str = ""


@dataclass
class GroupRow:
    """One group's bytes."""

    group: str
    mode: str
    weights: int
    trained: int  # LoRA adapters, or a full group's trainable copy
    gradients: int
    optimizer: int
    activations: int  # kept for the backward (resident: with the allocator's retention on a CPU)

    @property
    def total(self) -> int:
        return self.weights + self.trained + self.gradients + self.optimizer + self.activations


@dataclass
class Prediction:
    """The predicted peak of one stage's training on one device, by group and by moment."""

    device: str
    groups: list[GroupRow]
    batch: Batch
    settings: Settings
    host: Host
    transient: int  # the largest short-lived tensors at the peak moment
    transient_name: str
    allocator: int  # on a CPU: the heap's retention beyond the live activations
    moments: dict[str, int]  # load, forward/backward, optimizer step
    capacity: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return max(self.moments.values())

    @property
    def peak_moment(self) -> str:
        return max(self.moments, key=self.moments.get)

    def fits(self, capacity: int | None = None, headroom: float = 0.9) -> bool:
        """True when the peak stays under ``headroom`` of the capacity (by default the device's)."""
        cap = capacity if capacity is not None else self.capacity
        return cap is None or self.total <= headroom * cap

    def to_dict(self) -> dict:
        """The prediction as JSON-ready data (bytes)."""
        return {
            "device": self.device,
            "total_bytes": self.total,
            "capacity_bytes": self.capacity,
            "peak_moment": self.peak_moment,
            "moments": self.moments,
            "groups": {g.group: {**asdict(g), "total": g.total} for g in self.groups},
            "transient": {"name": self.transient_name, "bytes": self.transient},
            "allocator_retention_bytes": self.allocator,
            "host": asdict(self.host),
            "batch": {**asdict(self.batch), "tokens": self.batch.tokens},
            "settings": asdict(self.settings),
            "notes": self.notes,
        }


def _resident(t: Tensor, host: Host) -> int:
    """A tensor's resident bytes: heap-sized ones times the allocator's retention (CPU), others as they are."""
    return int(t.total * host.retention) if t.each <= HEAP_MAX else t.total


def assemble(
    facts: dict[str, GroupFacts], acts: Activations, batch: Batch, st: Settings, host: Host, capacity: int | None = None
) -> Prediction:
    """The prediction from the groups' facts and one micro-batch's activations."""
    kept_live = {g: sum(t.total for t in acts.kept if t.group == g) for g in GROUPS}
    kept = {g: sum(_resident(t, host) for t in acts.kept if t.group == g) for g in GROUPS}
    peak_t = acts.peak_transient()
    transient = _resident(peak_t, host) if peak_t is not None else 0
    live_transient = peak_t.total if peak_t is not None else 0
    rows = [
        GroupRow(
            g,
            facts[g].mode,
            facts[g].weight_bytes,
            facts[g].copy_bytes if facts[g].mode == "full" else facts[g].trainable_bytes,
            facts[g].trainable_bytes,
            2 * facts[g].trainable_bytes,
            kept[g],
        )
        for g in GROUPS
    ]
    weights = sum(r.weights + r.trained + r.optimizer for r in rows)
    grads = sum(r.gradients for r in rows)
    saved = sum(kept.values())
    resident = host.baseline + host.mapped + weights
    if st.grad_accum > 1:  # the previous micro-batches' gradients stay while this one's activations are kept
        step = saved + grads + transient
    else:
        step = max(saved + facts["lm_head"].trainable_bytes, grads) + transient
    per_tensor = [
        f.largest_trainable * (f.trainable_bytes // max(1, f.trainable)) for f in facts.values() if f.trainable
    ]
    if st.device == "cuda":  # foreach AdamW: a temporary as large as a whole optimizer group's states
        per_tensor = [f.trainable_bytes for f in facts.values()]
    moments = {
        "load": host.baseline + host.mapped + sum(r.weights for r in rows),
        "forward/backward": resident + step,
        "optimizer step": resident + grads + max(per_tensor, default=0),
    }
    allocator = (saved - sum(kept_live.values())) + (transient - live_transient)
    name = peak_t.name if peak_t is not None else ""
    return Prediction(st.device, rows, batch, st, host, transient, name, allocator, moments, capacity)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**28 else f"{n / 2**20:.1f} MiB"


def table(p: Prediction) -> list[str]:
    """The prediction as a table: a row per group, the host's and the step's shares, the total against capacity."""
    rows = [("group", "mode", "weights", "adapters/copy", "gradients", "AdamW", "activations", "total")]
    for g in p.groups:
        rows.append(
            (
                g.group,
                g.mode,
                gib(g.weights),
                gib(g.trained),
                gib(g.gradients),
                gib(g.optimizer),
                gib(g.activations),
                gib(g.total),
            )
        )
    lines = text_table(rows)
    b = p.batch
    lines.append(
        f"  longest batch: {b.rows} row(s) x {b.length} tokens{' (padded)' if b.padded else ''}: {b.vision_tokens} "
        f"image tokens, {b.patches} patches through the vision tower at each step, {b.answers} answer tokens; "
        f"short-lived peak: {p.transient_name} {gib(p.transient)}"
    )
    if p.host.baseline:
        lines.append(f"  process baseline {gib(p.host.baseline)} ({p.host.how})")
    if p.allocator:
        lines.append(
            f"  of the activations, {gib(p.allocator)} is freed memory the heap keeps "
            f"(retention x{p.host.retention:.2f}, measured at run time)"
        )
    if p.host.mapped:
        lines.append(f"  weight files mapped beside the weights: {gib(p.host.mapped)}")
    moments = ", ".join(f"{k} {gib(v)}" for k, v in p.moments.items())
    cap = f" of {gib(p.capacity)} ({p.total / p.capacity:.0%})" if p.capacity else ""
    lines.append(f"  peak {gib(p.total)}{cap} at the {p.peak_moment}; moments: {moments}")
    lines += [f"  note: {n}" for n in p.notes]
    return lines
