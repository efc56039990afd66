"""Supervised fine-tuning, the objective of ``train.method: sft``: the mean cross-entropy over answer tokens.

An objective turns a batch into the loss to backpropagate and what to count; the recipe's loop is the same for
every objective. With several processes each one's mean is weighted by its share of the global batch's answer
tokens, so the gradient equals one process's over the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vlmtune.data.collate import IGNORE
from vlmtune.train.distributed import token_share
from vlmtune.train.loss import answer_loss, answer_tokens
from vlmtune.train.objective import StepLoss
from vlmtune.train.packing import pack


class SFT:
    """Next-token cross-entropy on the answer tokens (labels), optionally on packed rows."""

    name = "sft"
    metric_names: list[str] = []

    def __init__(self, label_only_logits: bool = True, rope_index: Callable[[dict], torch.Tensor] | None = None):
        self.label_only_logits = label_only_logits
        self.rope_index = rope_index  # the model's M-RoPE positions: set when the stage packs its batches

    def loss(self, model, batch: dict, accelerator, packing: bool = False) -> StepLoss:
        inputs = pack(batch, self.rope_index) if packing else batch
        counts = torch.tensor(
            [
                batch["attention_mask"].sum().item(),
                inputs["input_ids"].numel(),
                (batch["labels"] != IGNORE).sum().item(),
            ]
        )
        loss = answer_loss(model, inputs, self.label_only_logits)
        value = loss.detach().float()
        logged = value
        if accelerator.num_processes > 1:
            share = token_share(batch, accelerator)
            loss, logged = loss * share, value * share
        return StepLoss(loss, value, logged, counts)

    def start(self, model, trained: list[str], state: tuple[dict, dict] | None = None) -> None:
        """Nothing to prepare: SFT needs no reference."""

    def state(self) -> tuple[dict, dict]:
        return {}, {}

    def evaluate(self, model, loader, accelerator) -> dict[str, float]:
        return {"eval_loss": self.eval_loss(model, loader, accelerator)}

    @torch.no_grad()
    def eval_loss(self, model, loader, accelerator) -> float:
        """Mean answer-token loss over the loader (weighted by answer tokens, gathered across processes)."""
        model.eval()
        total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
        for batch in loader:
            loss = answer_loss(model, batch)
            n = answer_tokens(batch["labels"])
            total += torch.stack([loss.double() * n, n.double()])
        model.train()
        total = accelerator.reduce(total, reduction="sum")
        return float(total[0] / total[1].clamp(min=1))
