"""What every training method gives the recipe: the loss of a micro-batch and its evaluation.

An objective turns a batch into ``StepLoss`` (the loss to backpropagate, what to log and count) and an eval loader
into metrics (``eval_loss`` and the method's own, e.g. ``eval/preference_accuracy``). It may hold state that a
resumed stage needs (the reference's starting weights, cached reference log-probabilities, buffered rollouts):
``state`` and ``restore`` carry it through each process's resume file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmtune.data.collate import IGNORE
from vlmtune.data.pairs import ANSWER_START, KTO_LABEL, SAMPLE_INDEX


@dataclass
class StepLoss:
    """One micro-batch's loss: ``loss`` to backpropagate, ``value`` (this process's mean, detached) to check,
    ``logged`` to log (``value`` weighted by this process's share of the global batch, so that the mean over
    processes is what one process with the whole batch would log), ``counts``: real, padded-to and answer tokens;
    ``metrics``: the method's own figures for this micro-batch (means over its samples), logged per window;
    ``signal``: False when the loss has no gradient by construction (GRPO groups that all scored alike), so the
    first step's gradient-flow check waits for a step that has one."""

    loss: torch.Tensor
    value: torch.Tensor
    logged: torch.Tensor
    counts: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    signal: bool = True


BOOKKEEPING = (SAMPLE_INDEX, KTO_LABEL, ANSWER_START)
"""Batch keys that are for the objective, not the model."""


def model_inputs(batch: dict) -> dict:
    """The batch without the objective's own keys."""
    return {k: v for k, v in batch.items() if k not in BOOKKEEPING}


def token_counts(batch: dict, rows: int | None = None) -> torch.Tensor:
    """(real, padded-to, answer) tokens of a batch's first ``rows`` rows (all when None)."""
    mask, labels, ids = batch["attention_mask"][:rows], batch["labels"][:rows], batch["input_ids"][:rows]
    return torch.tensor([mask.sum().item(), ids.numel(), (labels[:, 1:] != IGNORE).sum().item()])


def share(n: int, accelerator, device=None) -> torch.Tensor:
    """This process's weight so that DDP's average of per-process means is the mean over every process's ``n``
    items (1 with one process, or with equal counts)."""
    count = torch.tensor(float(n), device=device or accelerator.device)
    if accelerator.num_processes == 1:
        return torch.ones((), device=count.device)
    total = accelerator.reduce(count.clone(), reduction="sum")
    return count * accelerator.num_processes / total.clamp(min=1)


def reduce_sums(values: list[float], accelerator) -> list[float]:
    """Element-wise sums over processes."""
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t.tolist()
