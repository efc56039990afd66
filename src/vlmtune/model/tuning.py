"""Frozen / LoRA / full per component group, applied in one place through peft; the plan table."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from vlmtune.config.errors import ConfigError
from vlmtune.config.schema import Config, GroupConfig
from vlmtune.model.archs import GROUPS
from vlmtune.model.groups import GroupMap, linear_modules, matches_target_name, module_kind, owner_modules
from vlmtune.tracking import text_table

ADAPTER = "default"


@dataclass
class GroupPlan:
    """What one group does in a run."""

    group: str
    mode: str
    modules: list[str] = field(default_factory=list)  # LoRA targets, or modules saved whole for `full`
    rank: int = 0
    alpha: float = 0.0
    dropout: float = 0.0
    lr: float = 0.0
    weight_decay: float = 0.0
    total_params: int = 0
    trainable_params: int = 0


def _lora_targets(model: nn.Module, gmap: GroupMap, group: str, settings: GroupConfig) -> tuple[list[str], list[str]]:
    """Linear layers of a group selected by its ``targets``; returns (selected, explicit names matching nothing)."""
    linears = linear_modules(model, gmap, group)
    t = settings.targets
    if t == "all-linear":
        return linears, []
    if t in ("attention", "mlp"):
        return [n for n in linears if module_kind(n, gmap.arch) == t], []
    names = [t] if isinstance(t, str) else list(t)
    selected = [n for n in linears if any(matches_target_name(n, x) for x in names)]
    unmatched = [x for x in names if not any(matches_target_name(n, x) for n in linears)]
    return selected, unmatched


def linear_names_by_group(model: nn.Module, gmap: GroupMap) -> str:
    """'group: leaf names' for every group, to show in errors."""
    parts = []
    for g in GROUPS:
        leaves = sorted(
            {
                n.split(".")[-1] if not n.split(".")[-1].isdigit() else ".".join(n.split(".")[-2:])
                for n in linear_modules(model, gmap, g)
            }
        )
        parts.append(f"{g}: {', '.join(leaves) or '(no linear layers)'}")
    return "; ".join(parts)


def build_plan(model: nn.Module, gmap: GroupMap, cfg: Config) -> list[GroupPlan]:
    """Resolves each group's mode and settings to concrete module names.

    Raises:
        ConfigError: every problem at once, e.g. a LoRA group without linear layers or a target name
            that exists nowhere (listing each group's linear layer names).
    """
    problems: list[str] = []
    plans: list[GroupPlan] = []
    unmatched_by_name: dict[str, list[str]] = {}
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    for group in GROUPS:
        s = cfg.group(group)
        names = gmap.params_in(group)
        plan = GroupPlan(
            group=group,
            mode=s.mode,
            lr=cfg.group_lr(group),
            weight_decay=cfg.group_weight_decay(group),
            total_params=sum(sizes[n] for n in names),
        )
        if s.mode == "lora":
            plan.modules, unmatched = _lora_targets(model, gmap, group, s)
            plan.rank, plan.alpha, plan.dropout = s.rank, s.lora_alpha, s.dropout
            for x in unmatched:
                unmatched_by_name.setdefault(x, []).append(group)
            if not plan.modules:
                contents = sorted({n.rsplit(".", 1)[0] for n in names})[:12]
                problems.append(
                    f"groups.{group}: mode lora with targets {s.targets!r} resolves to no nn.Linear layer; "
                    f"the group contains {', '.join(contents) or 'no parameters'} ({linear_names_by_group(model, gmap)})"
                )
        elif s.mode == "full":
            plan.modules = owner_modules(model, gmap, group) if names else []
            if not plan.modules:
                problems.append(
                    f"groups.{group}: mode full but the group has no parameters of its own "
                    "(e.g. an lm_head tied to the input embeddings)"
                )
        plans.append(plan)
    lora_groups = {p.group for p in plans if p.mode == "lora"}
    for name, groups in unmatched_by_name.items():
        # A name listed for several groups must exist in at least one of them.
        if set(groups) >= {g for g in lora_groups if name in _names_of(cfg.group(g))}:
            problems.append(
                f"LoRA target '{name}' matches no linear layer in {', '.join(groups)}. "
                f"Linear layers by group: {linear_names_by_group(model, gmap)}"
            )
    if problems:
        raise ConfigError(problems, "the tuning plan")
    return plans


def _names_of(s: GroupConfig) -> list[str]:
    return [s.targets] if isinstance(s.targets, str) else list(s.targets)


def lora_config(plans: list[GroupPlan]):
    """One peft LoraConfig for all LoRA groups: exact module names, per-group rank/alpha as patterns."""
    from peft import LoraConfig

    lora = [p for p in plans if p.mode == "lora"]
    base = max(lora, key=lambda p: len(p.modules))  # the biggest group sets the defaults; others use patterns
    rank_pattern, alpha_pattern = {}, {}
    for p in lora:
        for name in p.modules:
            # peft matches pattern keys as regexes against the module path (anchored at the end);
            # full escaped paths make each key name exactly one module.
            if p.rank != base.rank:
                rank_pattern[re.escape(name)] = p.rank
            if p.alpha != base.alpha:
                alpha_pattern[re.escape(name)] = p.alpha
    full = [m for p in plans if p.mode == "full" for m in p.modules]
    return LoraConfig(
        r=base.rank,
        lora_alpha=base.alpha,
        lora_dropout=base.dropout,
        target_modules=[m for p in lora for m in p.modules],
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        modules_to_save=full or None,
        bias="none",
    )


def apply_plan(model: nn.Module, gmap: GroupMap, plans: list[GroupPlan]) -> nn.Module:
    """Wraps the model for the plan and sets what trains; returns a PeftModel if any group uses LoRA."""
    model = wrap(model, plans)
    activate(model, gmap, plans)
    return model


def wrap(model: nn.Module, plans: list[GroupPlan]) -> nn.Module:
    """Injects LoRA into every LoRA group's layers and copies full groups' modules (peft modules_to_save).

    For a run with stages, ``plans`` is the union over stages (see ``union_plans``): a LoRA that only trains
    in a later stage exists from the start with B = 0, so it changes nothing until it trains.
    """
    if not any(p.mode == "lora" for p in plans):
        return model
    from peft import get_peft_model

    return get_peft_model(model, lora_config(plans))


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or ".lora_embedding_" in name or ".lora_magnitude_vector" in name


def activate(model: nn.Module, gmap: GroupMap, plans: list[GroupPlan]) -> None:
    """Sets requires_grad and LoRA dropout per group for one stage's plan; counts each group's trainable parameters.

    On a PeftModel, a LoRA group trains its lora_A/lora_B only and a full group its modules_to_save copy;
    on a plain model a full group trains its own weights. Everything else is frozen.
    """
    by_group = {p.group: p for p in plans}
    peft = hasattr(model, "peft_config")
    for p in plans:
        p.trainable_params = 0
    for name, param in model.named_parameters():
        plan = by_group[gmap.group_of(name)]
        if peft:
            train = (plan.mode == "lora" and is_lora_param(name)) or (
                plan.mode == "full" and ".modules_to_save." in name
            )
        else:
            train = plan.mode == "full"
        param.requires_grad_(train)
        if train:
            plan.trainable_params += param.numel()
    # peft has one dropout for all LoRA layers; give each group its own (and a frozen group none: it costs time).
    for name, module in model.named_modules():
        drop = getattr(module, "lora_dropout", None)
        if isinstance(drop, nn.ModuleDict) and ADAPTER in drop:
            plan = by_group[gmap.group_of(name)]
            rate = plan.dropout if plan.mode == "lora" else 0.0
            drop[ADAPTER] = nn.Dropout(rate) if rate > 0 else nn.Identity()


def union_plans(stage_plans: list[list[GroupPlan]]) -> list[GroupPlan]:
    """One plan covering every stage: a group is LoRA (or full) if it is in any stage, with that stage's modules.

    Stage checks (``vlmtune.config.stages.stage_problems``) guarantee a group never switches between lora and
    full and keeps its LoRA rank, alpha and targets in every stage where it is LoRA.
    """
    union = []
    for i, first in enumerate(stage_plans[0]):
        candidates = [plans[i] for plans in stage_plans]
        chosen = next((p for p in candidates if p.mode == "lora"), None) or next(
            (p for p in candidates if p.mode == "full"), first
        )
        union.append(chosen)
    return union


def plan_rows(plans: list[GroupPlan]) -> list[tuple[str, ...]]:
    """The resolved plan as rows of text, header first: group, mode, modules wrapped, LoRA settings, trainable
    parameters, learning rate, weight decay."""
    rows = [("group", "mode", "modules", "rank/alpha/dropout", "trainable", "of total", "lr", "wd")]
    for p in plans:
        mods = f"{len(p.modules)}: {_summarise(p.modules)}" if p.modules else "-"
        lra = f"{p.rank}/{p.alpha:g}/{p.dropout:g}" if p.mode == "lora" else "-"
        lr = f"{p.lr:.2e}" if p.mode != "frozen" else "-"
        wd = f"{p.weight_decay:g}" if p.mode != "frozen" else "-"
        rows.append((p.group, p.mode, mods, lra, f"{p.trainable_params:,}", f"{p.total_params:,}", lr, wd))
    return rows


def plan_table(plans: list[GroupPlan]) -> str:
    """The resolved plan as a text table (``plan_rows``)."""
    return "\n".join(text_table(plan_rows(plans)))


def _summarise(modules: list[str], limit: int = 60) -> str:
    """Leaf names of the wrapped modules, e.g. 'q_proj, k_proj, v_proj, o_proj' or 'mlp.0, mlp.2'."""
    leaves: list[str] = []
    for m in modules:
        parts = m.split(".")
        leaf = ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]
        if leaf not in leaves:
            leaves.append(leaf)
    text = ", ".join(leaves)
    return text if len(text) <= limit else text[: limit - 3] + "..."
