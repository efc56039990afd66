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
    step_images: int = 0  # micro-batches with images in the current optimizer step
    step_bad: bool = False  # the current optimizer step met a non-finite value
    grad_norms: dict = field(default_factory=dict)  # per component group, at the last logging step

    def add_batch(self, counts: torch.Tensor, rows: int, has_image: bool, processes: int) -> None:
        """Counts one micro-batch: its (real, padded-to, answer) token counts and its rows."""
        self.tokens += counts
        self.samples += rows * processes
        self.step_images += int(has_image)

    def add_loss(self, value: float) -> None:
        self.loss += value
        self.losses += 1

    def end_step(self) -> None:
        self.step_images, self.step_bad = 0, False

    def record(self, accelerator) -> dict | None:
        """Loss, throughput and token counts of the window (every process's micro-batches), then a fresh window;
        None when no micro-batch had a finite loss."""
        sums = torch.tensor(
            [self.loss, self.losses, *self.tokens.tolist()], dtype=torch.float64, device=accelerator.device
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
        self.loss, self.losses, self.samples, self.start = 0.0, 0, 0, time.perf_counter()
        self.tokens.zero_()
        return record
