"""Rank-0 printing, text tables, metrics as JSON lines (and accelerate trackers), and the loss plot."""

from __future__ import annotations

import json
import os
from pathlib import Path


def text_table(rows: list[tuple]) -> list[str]:
    """Rows of cells as aligned text lines: the first row is the header, a rule of dashes under it."""
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def is_main_process() -> bool:
    """True on the process that prints and writes (rank 0 under torchrun/accelerate, or alone)."""
    return int(os.environ.get("RANK", "0")) == 0


def echo(*args, **kwargs) -> None:
    """print() on the main process only; every user-facing line goes through here."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


class MetricsLog:
    """Appends one JSON object per logging step to ``metrics.jsonl`` and forwards to accelerate's trackers."""

    def __init__(self, path: Path, accelerator=None, keep: int = 0):
        """Starts ``path`` afresh, or keeps its first ``keep`` lines (a resumed run drops what came after its checkpoint)."""
        self.path = path
        self.accelerator = accelerator
        old = path.read_text(encoding="utf-8").splitlines()[:keep] if keep and path.is_file() else []
        self.records: list[dict] = [json.loads(line) for line in old]
        if is_main_process():
            path.write_text("".join(line + "\n" for line in old), encoding="utf-8")

    def log(self, record: dict) -> None:
        self.records.append(record)
        if not is_main_process():
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            values = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log(values, step=record["step"])


def plot_loss(records: list[dict], out: Path) -> Path:
    """Training loss (and eval loss where logged) against step, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    for r in records:
        if "stage_start" in r:  # stage boundaries of a progressive run
            ax.axvline(r["step"], color="grey", linestyle="--", linewidth=0.8)
            ax.annotate(
                r["stage_start"],
                (r["step"], 1),
                xycoords=("data", "axes fraction"),
                xytext=(3, -12),
                textcoords="offset points",
                fontsize=8,
                color="grey",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
