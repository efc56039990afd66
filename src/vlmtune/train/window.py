"""The logging window: what the optimizer steps since the last log line trained on, summed across processes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class Window:
    """Sums over the micro-batches since the last logging step (and per optimizer step: a bad value, an image)."""

    loss: float = 0.0
    losses: int = 0  # micro-batches whose loss was finite
    samples: int = 0  # over every process
    tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(3))  # real, padded-to and answer tokens
    start: float = field(default_factory=time.perf_counter)
    step_images: int = 0  # micro-batches with images and a learning signal in the current optimizer step
    step_bad: bool = False  # the current optimizer step met a non-finite value
    grad_norms: dict = field(default_factory=dict)  # per component group, at the last logging step
    names: list[str] = field(default_factory=list)  # the objective's own metrics (``StepLoss.metrics``)
    metrics: dict = field(default_factory=dict)  # name -> [sum, micro-batches that had it]

    def add_batch(self, counts: torch.Tensor, rows: int, has_image: bool, processes: int, signal: bool = True) -> None:
        """Counts one micro-batch: its (real, padded-to, answer) token counts and its rows; ``signal``: its loss
        can move the weights at all (a GRPO batch whose every group scored alike cannot)."""
        self.tokens += counts
        self.samples += rows * processes
        self.step_images += int(has_image and signal)

    def add_loss(self, value: float) -> None:
        self.loss += value
        self.losses += 1

    def add_metrics(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            total = self.metrics.setdefault(name, [0.0, 0])
            total[0] += float(value)
            total[1] += 1

    def end_step(self) -> None:
        self.step_images, self.step_bad = 0, False

    def record(self, accelerator) -> dict | None:
        """Loss, throughput and token counts of the window (every process's micro-batches), then a fresh window;
        None when no micro-batch had a finite loss."""
        own = [x for name in self.names for x in self.metrics.get(name, [0.0, 0])]
        sums = torch.tensor(
            [self.loss, self.losses, *self.tokens.tolist(), *own], dtype=torch.float64, device=accelerator.device
        )
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, reduction="sum")
        elapsed = time.perf_counter() - self.start
        record = None
        if sums[1] > 0:
            record = {
                "loss": float(sums[0] / sums[1]),
                "samples_per_s": self.samples / max(elapsed, 1e-9),
                "tokens": int(sums[2]),
                "answer_tokens": int(sums[4]),
                "padding": 1.0 - float(sums[2] / sums[3].clamp(min=1)),
            }
            for k, name in enumerate(self.names):  # means over the micro-batches (of every process) that had it
                total, n = sums[5 + 2 * k], sums[6 + 2 * k]
                if n > 0:
                    record[name] = float(total / n)
            if "time/rollout_s" in record:  # the share of the window's time spent sampling (this process)
                record["time/rollout_share"] = min(
                    1.0, self.metrics.get("time/rollout_s", [0.0])[0] / max(elapsed, 1e-9)
                )
        self.metrics = {}
        self.loss, self.losses, self.samples, self.start = 0.0, 0, 0, time.perf_counter()
        self.tokens.zero_()
        return record
