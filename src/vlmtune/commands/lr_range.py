"""The learning-rate range test's arithmetic and its outputs: the rates of each step, the smoothed loss, the
suggested rate, and the table, CSV and plot of ``vlmtune lr-find``.

Leslie N. Smith, "Cyclical Learning Rates for Training Neural Networks" (WACV 2017, arXiv:1506.01186), section
3.3: raise the rate each step and watch the loss; a good rate is where the loss falls fastest. The running
average (bias-corrected), the stop at 4 x its lowest value and the "lowest loss / 10" rule follow fastai's
``lr_find`` (fastai ``callback/schedule.py``). The suggestion reads a centred average instead of the running one:
a running average lags by about beta / (1 - beta) steps, which would move the steepest point to higher rates.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SMOOTHING = 0.9
"""Weight of the running average (bias-corrected) that decides when the loss has diverged; fastai uses 0.98
over its 100 steps, and shorter tests need less memory in the average to react at all."""
DIVERGED = 4.0
"""The test of a group stops once its smoothed loss exceeds this many times its lowest (fastai's rule)."""


def rates(low: float, high: float, steps: int) -> list[float]:
    """``steps`` rates rising exponentially from ``low`` to ``high`` (both included)."""
    return [low * (high / low) ** (i / max(1, steps - 1)) for i in range(steps)]


@dataclass
class Curve:
    """One group's test: the rate and the loss of every step, smoothed as it goes."""

    group: str
    configured: float  # the group's rate in the config
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    _average: float = 0.0

    def add(self, lr: float, loss: float) -> bool:
        """Records a step; False once the loss is not finite or has diverged (the test of the group stops)."""
        if not math.isfinite(loss):
            return False
        self._average = SMOOTHING * self._average + (1 - SMOOTHING) * loss
        value = self._average / (1 - SMOOTHING ** (len(self.losses) + 1))
        self.lrs.append(lr)
        self.losses.append(loss)
        self.smoothed.append(value)
        return value <= DIVERGED * min(self.smoothed)


@dataclass
class Suggestion:
    group: str
    configured: float
    suggested: float  # the steepest descent point, or the lowest loss's rate / 10 where the descent is too short
    steepest: float | None
    min_over_10: float
    lowest_at: float  # the rate of the lowest loss: past it the group's updates start to hurt
    steps: int
    lowest: float  # the lowest loss (centred average)


def centred(losses: list[float]) -> np.ndarray:
    """The losses averaged over a centred window of about a tenth of the steps (at least 3, odd), the ends
    padded with their edge values, so the curve keeps its place on the rate axis."""
    width = max(3, len(losses) // 10) | 1
    padded = np.pad(np.asarray(losses, dtype=float), width // 2, mode="edge")
    return np.convolve(padded, np.ones(width) / width, mode="valid")


def suggest(curve: Curve) -> Suggestion:
    """The rate where the loss (centred average) falls fastest against log(rate), looked for between the first
    tenth of the steps and the lowest loss; where that stretch is under three steps, the lowest loss's rate / 10.
    Both lie within the tested range."""
    lrs, smoothed = np.array(curve.lrs), centred(curve.losses)
    best = int(np.argmin(smoothed))
    skip = max(1, len(lrs) // 10)
    steepest = None
    if best - skip >= 2:
        slopes = np.gradient(smoothed, np.log(lrs))
        steepest = float(lrs[skip + int(np.argmin(slopes[skip : best + 1]))])
    min_over_10 = max(float(lrs[0]), float(lrs[best]) / 10)
    return Suggestion(
        curve.group,
        curve.configured,
        steepest if steepest is not None else min_over_10,
        steepest,
        min_over_10,
        float(lrs[best]),
        len(lrs),
        float(smoothed[best]),
    )


def table_rows(suggestions: list[Suggestion]) -> list[tuple]:
    """The printed table: one row per group."""
    rows = [
        (
            "group",
            "configured lr",
            "suggested lr",
            "steepest",
            "lowest loss at",
            "min loss / 10",
            "steps",
            "lowest loss",
        )
    ]
    for s in suggestions:
        steepest = f"{s.steepest:.2e}" if s.steepest is not None else "-"
        ratio = s.suggested / s.configured
        rows.append(
            (
                s.group,
                f"{s.configured:.2e}",
                f"{s.suggested:.2e} ({ratio:.2g}x)",
                steepest,
                f"{s.lowest_at:.2e}",
                f"{s.min_over_10:.2e}",
                s.steps,
                f"{s.lowest:.4f}",
            )
        )
    return rows


def write_csv(curves: list[Curve], path: Path) -> Path:
    """Every step of every group: group, step, rate, loss, and the centred average the suggestion reads."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "step", "lr", "loss", "smoothed_loss"])
        for c in curves:
            for i, (lr, loss, sm) in enumerate(zip(c.lrs, c.losses, centred(c.losses))):
                writer.writerow([c.group, i, f"{lr:.6g}", f"{loss:.6g}", f"{sm:.6g}"])
    return path


def write_plot(curves: list[Curve], suggestions: list[Suggestion], path: Path) -> Path:
    """Each group's loss against its rate (log scale; the centred average, the raw loss faint), a dot at the
    suggested rate and a dotted line at the configured one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for c, s in zip(curves, suggestions):
        smoothed = centred(c.losses)
        (line,) = ax.plot(c.lrs, smoothed, label=f"{c.group}: suggested {s.suggested:.1e}")
        ax.plot(c.lrs, c.losses, color=line.get_color(), alpha=0.25, linewidth=0.8)
        at = int(np.argmin(np.abs(np.log(c.lrs) - math.log(s.suggested))))
        ax.plot([c.lrs[at]], [smoothed[at]], "o", color=line.get_color(), markersize=7)
        ax.axvline(c.configured, color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate of the group under test (the others frozen)")
    ax.set_ylabel("training loss (faint: per step)")
    ax.set_title("learning-rate range test (dotted: configured rate)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
