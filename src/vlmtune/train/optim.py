"""Optimizer parameter groups per component group, and the learning-rate schedule."""

from __future__ import annotations

import torch
from torch import nn

from vlmtune.model.groups import GroupMap
from vlmtune.model.tuning import GroupPlan


def param_groups(model: nn.Module, gmap: GroupMap, plans: list[GroupPlan]) -> list[dict]:
    """One AdamW group per (component group, decay or not), each with the component's rate.

    LoRA A/B matrices and fully-trained weights of a component share its learning rate (the
    projector's LoRA gets the projector's rate). Biases, norms and other 1-D parameters never decay.
    With LoRA+ (``groups.<g>.lr_ratio_b``) the group's B matrices are a group of their own, ``<g> (lora B)``, at
    the rate x the ratio (Hayou et al. 2024, LoRA+: B learns at a higher rate than A).

    Raises:
        ValueError: a trainable parameter in a group the stage keeps frozen (the plan was not applied).
    """
    by_group = {p.group: p for p in plans}
    buckets: dict[tuple[str, bool, bool], list[tuple[str, nn.Parameter]]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = gmap.group_of(name)
        decay = param.ndim >= 2
        lora_b = bool(by_group[group].lr_ratio_b) and ".lora_B." in name
        buckets.setdefault((group, decay, lora_b), []).append((name, param))
    wrong = [(n, g) for (g, _, _), items in buckets.items() for n, _ in items if by_group[g].mode == "frozen"]
    if wrong:
        names = ", ".join(f"{n} ({g})" for n, g in wrong[:5])
        raise ValueError(f"{len(wrong)} trainable parameter(s) in groups this stage keeps frozen: {names}")
    groups = []
    for (group, decay, lora_b), items in buckets.items():
        plan = by_group[group]
        groups.append(
            {
                "name": f"{group}{' (lora B)' if lora_b else ''}{'' if decay else ' (no decay)'}",
                "params": [p for _, p in items],
                "param_names": [n for n, _ in items],
                "lr": plan.lr * (plan.lr_ratio_b or 1.0) if lora_b else plan.lr,
                "weight_decay": plan.weight_decay if decay else 0.0,
                "component": group,
            }
        )
    return groups


def build_optimizer(groups: list[dict], betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW over the groups (names kept for logging; torch ignores unknown keys)."""
    return torch.optim.AdamW([{k: v for k, v in g.items() if k != "param_names"} for g in groups], betas=betas)


def build_scheduler(optimizer, kind: str, warmup: int, total: int):
    """transformers' warmup + cosine/linear/constant schedule; one multiplier for all groups keeps their ratios."""
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[kind]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def describe(groups: list[dict]) -> list[str]:
    """One line per optimizer group: name, rate, weight decay, tensors and parameters."""
    return [
        f"optimizer group {g['name']:<28} lr={g['lr']:.2e} wd={g['weight_decay']:g} "
        f"tensors={len(g['params'])} params={sum(p.numel() for p in g['params']):,}"
        for g in groups
    ]
