"""Group relative policy optimisation, the objective of ``train.method: grpo`` (Shao et al. 2024; the variants'
formulas are in ``vlmtune.train.policy``).

Per micro-batch: ``train.grpo.group_size`` completions are sampled for each prompt (``vlmtune.train.rollout``),
scored by ``train.grpo.rewards`` against the sample's last answer, and each completion's advantage is its reward
relative to its group's. The clipped policy-ratio loss then trains on the completion tokens, with a KL penalty
towards the stage's starting model when ``beta`` > 0. With ``num_iterations`` > 1 the loader brings each optimizer
step's batches that many times in a row (``EpochSampler.repeat``) and the rollouts of the first pass are reused
(kept in resume state, so a resumed run reuses them too); the old policy's log-probabilities are those of the
first pass.

Logged: ``reward`` (mean), ``reward_std`` (mean over groups of the rewards' spread), ``rewards/<each>``, ``kl``,
``completion_length``, ``clip_ratio`` and ``time/rollout_s`` (seconds spent sampling, per micro-batch);
evaluated: the answer loss on the references, and greedy answers' mean ``eval/reward``.
"""

from __future__ import annotations

import time

import torch

from vlmtune.data.pairs import SAMPLE_INDEX
from vlmtune.eval.generate import GenerationSettings, generate
from vlmtune.train.logps import token_logps
from vlmtune.train.objective import StepLoss, share
from vlmtune.train.policy import aggregate, clipped_token_loss, group_advantages, masked_mean
from vlmtune.train.reference import Reference
from vlmtune.train.rewards import build_rewards, score
from vlmtune.train.rollout import Rollout, row_seeds, sample
from vlmtune.train.sft import SFT

_SAVED = ("advantages", "old", "ref", "rewards")


class GRPO:
    """GRPO (and Dr. GRPO, BNPO) with rollouts from the model itself."""

    name = "grpo"

    def __init__(self, cfg, processor, seed: int, eval_batch_size: int = 16):
        self.cfg = cfg
        self.processor = processor
        self.seed = seed
        self.rewards = build_rewards(cfg.rewards)
        self.eval_batch_size = eval_batch_size
        self.reference: Reference | None = None
        self.unwrapped = None
        self.step = 0  # the optimizer step being taken (set by the recipe before each micro-batch)
        self.buffer: dict[tuple, dict] = {}  # with num_iterations > 1: rollouts of the current optimizer step
        self.uses = 0  # passes made over the buffered rollouts
        self.metric_names = [
            "reward",
            "reward_std",
            *(f"rewards/{f.label}" for f in self.rewards),
            "kl",
            "completion_length",
            "clip_ratio",
            "time/rollout_s",
        ]

    def start(self, model, trained: list[str], state: tuple[dict, dict] | None = None) -> None:
        self.unwrapped = model
        self.buffer = {}
        tensors, meta = state if state is not None else ({}, {})
        if self.cfg.beta > 0:
            has = bool(meta.get("reference"))
            self.reference = (
                Reference.from_state(model, tensors, meta) if has else Reference.at_stage_start(model, trained)
            )
        if meta.get("buffer"):
            self._restore(tensors, meta)

    def state(self) -> tuple[dict, dict]:
        tensors, meta = self.reference.state() if self.reference is not None else ({}, {})
        if self.buffer:
            keys = list(self.buffer)
            meta["buffer"] = repr([list(k) for k in keys])
            for n, key in enumerate(keys):
                entry = self.buffer[key]
                for name, value in entry["rows"].items():
                    tensors[f"buffer.{n}.rows.{name}"] = value.detach().cpu().contiguous()
                for name in _SAVED:
                    if entry[name] is not None:
                        tensors[f"buffer.{n}.{name}"] = entry[name].detach().cpu().contiguous()
                tensors[f"buffer.{n}.lengths"] = entry["lengths"].cpu()
                meta[f"buffer.{n}.completions"] = repr(entry["completions"])
                meta[f"buffer.{n}.uses"] = str(entry["uses"])
                meta[f"buffer.{n}.metrics"] = repr(entry["metrics"])
        return tensors, meta

    def _restore(self, tensors: dict, meta: dict) -> None:
        import ast

        device = next(self.unwrapped.parameters()).device
        for n, key in enumerate(ast.literal_eval(meta["buffer"])):
            prefix = f"buffer.{n}."
            rows = {
                k.removeprefix(prefix + "rows."): v.to(device)
                for k, v in tensors.items()
                if k.startswith(prefix + "rows.")
            }
            entry = {name: tensors.get(prefix + name) for name in _SAVED}
            entry = {k: (v.to(device) if v is not None else None) for k, v in entry.items()}
            entry.update(
                rows=rows,
                lengths=tensors[prefix + "lengths"],
                completions=ast.literal_eval(meta[prefix + "completions"]),
                uses=int(meta[prefix + "uses"]),
                metrics=ast.literal_eval(meta[prefix + "metrics"]),
            )
            self.buffer[tuple(key)] = entry

    def _fresh(self, model, batch: dict, accelerator) -> dict:
        """Samples and scores a group per prompt: rows, advantages, old and reference log-probabilities."""
        t0 = time.perf_counter()
        index = batch[SAMPLE_INDEX].tolist()
        g = self.cfg.group_size
        seeds = row_seeds(self.seed, self.step, index, g)
        got: Rollout = sample(self.unwrapped, self.processor, batch, self.cfg, seeds)
        expand = lambda xs: [x for x in xs for _ in range(g)]  # noqa: E731
        total, each = score(
            self.rewards,
            expand(batch["prompts"]),
            got.completions,
            expand(batch["references"]),
            expand(batch["metadata"]),
        )
        total = total.to(got.rows["labels"].device)
        advantages = group_advantages(total, g, scale=self.cfg.loss != "dr_grpo")
        labels = got.rows["labels"]
        inputs = {k: v for k, v in got.rows.items() if k != "labels"}
        old = ref = None
        if self.cfg.num_iterations > 1:
            old, _ = token_logps(model, inputs, labels)
            old = old.detach()
        if self.reference is not None:
            with self.reference.active(), torch.no_grad():
                ref, _ = token_logps(self.unwrapped, inputs, labels)
        spread = total.view(-1, g).std(dim=1).mean().item() if g > 1 else 0.0
        metrics = {
            "reward": total.mean().item(),
            "reward_std": spread,
            **{f"rewards/{label}": v.mean().item() for label, v in each.items()},
            "completion_length": got.lengths.float().mean().item(),
            "time/rollout_s": time.perf_counter() - t0,
        }
        return {
            "rows": got.rows,
            "advantages": advantages,
            "old": old,
            "ref": ref,
            "rewards": total,
            "lengths": got.lengths,
            "completions": got.completions,
            "uses": 0,
            "metrics": metrics,
        }

    def _rollout(self, model, batch: dict, accelerator) -> dict:
        if self.cfg.num_iterations == 1:
            return self._fresh(model, batch, accelerator)
        key = tuple(batch[SAMPLE_INDEX].tolist())
        entry = self.buffer.get(key)
        if entry is None or entry["uses"] >= self.cfg.num_iterations:
            self.buffer = {k: v for k, v in self.buffer.items() if v["uses"] < self.cfg.num_iterations}
            entry = self.buffer[key] = self._fresh(model, batch, accelerator)
        entry["uses"] += 1
        return entry

    def loss(self, model, batch: dict, accelerator, packing: bool = False) -> StepLoss:
        c = self.cfg
        entry = self._rollout(model, batch, accelerator)
        rows = entry["rows"]
        labels = rows["labels"]
        logps, mask = token_logps(model, {k: v for k, v in rows.items() if k != "labels"}, labels)
        old = entry["old"] if entry["old"] is not None else logps.detach()
        high = c.epsilon_high if c.epsilon_high is not None else c.epsilon
        terms = clipped_token_loss(logps, old, entry["advantages"], mask, c.epsilon, high, c.beta, entry["ref"])
        loss = aggregate(terms.per_token, mask, c.loss, c.max_new_tokens)
        tokens = int(mask.sum())
        weight = share(tokens if c.loss == "bnpo" else mask.shape[0], accelerator, loss.device)
        value = loss.detach().float()
        metrics = dict(entry["metrics"])
        metrics["kl"] = masked_mean(terms.kl, mask).item() if terms.kl is not None else 0.0
        metrics["clip_ratio"] = masked_mean(terms.clipped.float(), mask).item()
        if entry["uses"] > 1:
            metrics["time/rollout_s"] = 0.0
        counts = torch.tensor([int(rows["attention_mask"].sum()), labels.numel(), tokens])
        signal = bool(entry["advantages"].abs().sum() > 0)
        return StepLoss(loss * weight, value, value * weight, counts, metrics, signal)

    def evaluate(self, model, loader, accelerator) -> dict[str, float]:
        """The answer loss on the references (the eval split is read as conversations); the rewards of greedy
        answers come from ``evaluate_rewards`` with the other generated metrics."""
        return {"eval_loss": SFT().eval_loss(model, loader, accelerator)}

    @torch.no_grad()
    def evaluate_rewards(self, model, items, max_new_tokens: int) -> dict[str, float]:
        """Greedy answers to eval prompts (``EvalItem``s), scored by the run's rewards: mean total and each."""
        from vlmtune.eval.generate import item_prompt, prompt_messages

        if not items:
            return {}
        features = [item_prompt(self.processor, it) for it in items]
        settings = GenerationSettings(max_new_tokens=max_new_tokens)
        answers = generate(model, self.processor, features, settings, self.eval_batch_size)
        prompts = [next((c for r, c in reversed(prompt_messages(it.sample)) if r == "user"), "") for it in items]
        meta = [{"where": it.sample.where, "images": [str(p) for p in it.sample.images]} for it in items]
        total, each = score(self.rewards, prompts, answers, [it.answer for it in items], meta)
        return {"eval/reward": total.mean().item(), **{f"eval/rewards/{k}": v.mean().item() for k, v in each.items()}}
