"""Preference optimisation on pairs, the objective of ``train.method: dpo`` (losses: ``train.dpo.loss``).

A batch holds n pairs as 2n rows (chosen answers, then rejected ones) that share each sample's image encoding
(``vlmtune.data.pairs``, ``vlmtune.train.logps``). The policy's summed log-probabilities of each answer are
compared with the reference's (the model as the stage found it, ``vlmtune.train.reference``), which are computed
once per training sample and kept when ``train.dpo.cache_reference`` is on; the formulas are in
``vlmtune.train.preference``. Logged per window: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margin``,
``rewards/accuracy``; evaluated: the loss, ``eval/preference_accuracy`` (the policy gives the chosen answer the
higher log-probability) and the reward accuracy and margin against the reference.
"""

from __future__ import annotations

import torch

from vlmtune.data.pairs import SAMPLE_INDEX
from vlmtune.train.logps import sequence_logps
from vlmtune.train.objective import StepLoss, model_inputs, reduce_sums, share, token_counts
from vlmtune.train.preference import REFERENCE_FREE, SeqLogps, dpo_family_loss
from vlmtune.train.reference import Reference

CACHE_INDEX, CACHE_VALUES = "cache.index", "cache.values"


class DPO:
    """DPO and its family (sigmoid, ipo, hinge, robust; reference-free orpo and simpo) on pairs."""

    name = "dpo"
    metric_names = [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margin",
        "rewards/accuracy",
        "logps/chosen",
        "logps/rejected",
    ]

    def __init__(self, cfg, cache_reference: bool):
        self.cfg = cfg
        self.uses_reference = cfg.loss not in REFERENCE_FREE
        self.cache_reference = cache_reference and self.uses_reference
        self.reference: Reference | None = None
        self.cache: dict[int, torch.Tensor] = {}  # sample index -> reference (chosen, rejected) summed logps
        self.unwrapped = None

    def start(self, model, trained: list[str], state: tuple[dict, dict] | None = None) -> None:
        """At the stage's start (or its resume): the reference and the cached reference log-probabilities."""
        self.unwrapped = model
        self.cache = {}
        if not self.uses_reference:
            return
        if state is not None and state[1].get("reference"):
            tensors, meta = state
            self.reference = Reference.from_state(model, tensors, meta)
            if CACHE_INDEX in tensors:
                for i, v in zip(tensors[CACHE_INDEX].tolist(), tensors[CACHE_VALUES]):
                    self.cache[int(i)] = v
        else:
            self.reference = Reference.at_stage_start(model, trained)

    def state(self) -> tuple[dict, dict]:
        if self.reference is None:
            return {}, {}
        tensors, meta = self.reference.state()
        if self.cache:
            keys = sorted(self.cache)
            tensors[CACHE_INDEX] = torch.tensor(keys)
            tensors[CACHE_VALUES] = torch.stack([self.cache[k].cpu() for k in keys])
        return tensors, meta

    def _reference_sums(self, batch: dict, n: int, training: bool) -> torch.Tensor:
        """(2n,) reference summed log-probabilities (chosen rows, then rejected rows); a training batch's are
        looked up in, or added to, the cache."""
        index = batch[SAMPLE_INDEX].tolist()
        cached = self.cache_reference and training
        if cached and all(i in self.cache for i in index):
            values = torch.stack([self.cache[i] for i in index]).to(batch["labels"].device)
            return torch.cat([values[:, 0], values[:, 1]])
        with self.reference.active(), torch.no_grad():
            sums, _ = sequence_logps(self.unwrapped, model_inputs(batch))
        if cached:
            for k, i in enumerate(index):
                self.cache[i] = torch.stack([sums[k], sums[n + k]]).detach().cpu()
        return sums

    def _pairs(self, model, batch: dict, training: bool = True):
        n = len(batch[SAMPLE_INDEX])
        sums, tokens = sequence_logps(model, model_inputs(batch))
        chosen, rejected = SeqLogps(sums[:n], tokens[:n]), SeqLogps(sums[n:], tokens[n:])
        ref_chosen = ref_rejected = None
        if self.uses_reference:
            ref = self._reference_sums(batch, n, training).to(sums.dtype)
            ref_chosen, ref_rejected = SeqLogps(ref[:n], tokens[:n]), SeqLogps(ref[n:], tokens[n:])
        c = self.cfg
        out = dpo_family_loss(
            c.loss, c.beta, chosen, rejected, ref_chosen, ref_rejected, c.label_smoothing, c.sft_weight, c.simpo_gamma
        )
        return n, out, chosen, rejected

    def loss(self, model, batch: dict, accelerator, packing: bool = False) -> StepLoss:
        n, out, chosen, rejected = self._pairs(model, batch)
        loss = out.losses.mean()
        value = loss.detach().float()
        weight = share(n, accelerator, loss.device)
        margin = out.chosen_rewards - out.rejected_rewards
        metrics = {
            "rewards/chosen": out.chosen_rewards.mean().item(),
            "rewards/rejected": out.rejected_rewards.mean().item(),
            "rewards/margin": margin.mean().item(),
            "rewards/accuracy": (margin > 0).float().mean().item(),
            "logps/chosen": chosen.sum.detach().mean().item(),
            "logps/rejected": rejected.sum.detach().mean().item(),
        }
        counts = token_counts(batch)
        return StepLoss(loss * weight, value, value * weight, counts, metrics)

    @torch.no_grad()
    def evaluate(self, model, loader, accelerator) -> dict[str, float]:
        """Loss, preference accuracy (policy log-probability of chosen > rejected), reward accuracy and margin,
        each a mean over every eval pair of every process."""
        model.eval()
        sums = [0.0] * 5
        for batch in loader:
            n, out, chosen, rejected = self._pairs(model, batch, training=False)
            margin = out.chosen_rewards - out.rejected_rewards
            sums = [
                a + b
                for a, b in zip(
                    sums,
                    [
                        out.losses.sum().item(),
                        (chosen.sum > rejected.sum).sum().item(),
                        (margin > 0).sum().item(),
                        margin.sum().item(),
                        n,
                    ],
                )
            ]
        model.train()
        loss, preferred, accurate, margin, pairs = reduce_sums(sums, accelerator)
        pairs = max(pairs, 1)
        return {
            "eval_loss": loss / pairs,
            "eval/preference_accuracy": preferred / pairs,
            "eval/rewards/accuracy": accurate / pairs,
            "eval/rewards/margin": margin / pairs,
        }
