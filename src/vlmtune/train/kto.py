"""Kahneman-Tversky optimisation, the objective of ``train.method: kto``: answers labelled desirable or undesirable,
no pairs needed (Ethayarajh et al. 2024; the formula is in ``vlmtune.train.preference``).

A batch of n samples holds 2n rows (``vlmtune.data.pairs.collate_kto``): the samples, then each prompt with the next
sample's answer. The mismatched rows' policy-over-reference log-ratio, averaged over every process and clamped at
zero, is the reference point z0 that each labelled answer's reward is measured against (detached, as in the paper).
Logged: ``rewards/desirable``, ``rewards/undesirable`` (means over the samples with that label), ``kl``.
"""

from __future__ import annotations

import torch

from vlmtune.data.pairs import KTO_LABEL
from vlmtune.train.logps import sequence_logps
from vlmtune.train.objective import StepLoss, model_inputs, reduce_sums, share, token_counts
from vlmtune.train.preference import SeqLogps, kto_loss, kto_reference_point
from vlmtune.train.reference import Reference


class KTO:
    """KTO on labelled answers, against the stage's starting model."""

    name = "kto"
    metric_names = ["kl", "rewards/desirable", "rewards/undesirable"]

    def __init__(self, cfg):
        self.cfg = cfg
        self.reference: Reference | None = None
        self.unwrapped = None

    def start(self, model, trained: list[str], state: tuple[dict, dict] | None = None) -> None:
        self.unwrapped = model
        if state is not None and state[1].get("reference"):
            self.reference = Reference.from_state(model, *state)
        else:
            self.reference = Reference.at_stage_start(model, trained)

    def state(self) -> tuple[dict, dict]:
        return self.reference.state() if self.reference is not None else ({}, {})

    def _terms(self, model, batch: dict, accelerator):
        desirable = batch[KTO_LABEL].to(torch.bool)
        n = len(desirable)
        inputs = model_inputs(batch)
        sums, tokens = sequence_logps(model, inputs)
        with self.reference.active(), torch.no_grad():
            ref_sums, _ = sequence_logps(self.unwrapped, inputs)
        policy, ref = SeqLogps(sums[:n], tokens[:n]), SeqLogps(ref_sums[:n], tokens[:n])
        mismatched = SeqLogps(sums[n:].detach(), tokens[n:])
        kl = kto_reference_point(mismatched, SeqLogps(ref_sums[n:], tokens[n:]))
        if accelerator.num_processes > 1:  # one reference point for the global batch
            kl = accelerator.reduce(kl.detach().clone(), reduction="mean").clamp(min=0)
        c = self.cfg
        losses, rewards = kto_loss(c.beta, policy, ref, kl, desirable, c.desirable_weight, c.undesirable_weight)
        return n, losses, rewards, desirable, kl

    def loss(self, model, batch: dict, accelerator, packing: bool = False) -> StepLoss:
        n, losses, rewards, desirable, kl = self._terms(model, batch, accelerator)
        loss = losses.mean()
        value = loss.detach().float()
        weight = share(n, accelerator, loss.device)
        metrics = {"kl": float(kl)}
        if desirable.any():
            metrics["rewards/desirable"] = rewards[desirable].mean().item()
        if (~desirable).any():
            metrics["rewards/undesirable"] = rewards[~desirable].mean().item()
        return StepLoss(loss * weight, value, value * weight, token_counts(batch, n), metrics)

    @torch.no_grad()
    def evaluate(self, model, loader, accelerator) -> dict[str, float]:
        """Loss, and the share of answers whose reward has the sign of their label (desirable above z0)."""
        model.eval()
        sums = [0.0, 0.0, 0.0]
        for batch in loader:
            n, losses, rewards, desirable, kl = self._terms(model, batch, accelerator)
            right = torch.where(desirable, rewards > 0, rewards < 0)
            sums = [sums[0] + losses.sum().item(), sums[1] + right.sum().item(), sums[2] + n]
        model.train()
        loss, right, count = reduce_sums(sums, accelerator)
        return {"eval_loss": loss / max(count, 1), "eval/rewards/accuracy": right / max(count, 1)}
