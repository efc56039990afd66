"""Frozen / LoRA / full per component group, applied in one place through peft; the plan table."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from vlmtune.config.checks import LOFTQ_BITS
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
    dora: bool = False  # LoRA variants (groups.<g>.dora, rslora, init, lr_ratio_b)
    rslora: bool = False
    init: str = "default"
    lr_ratio_b: float | None = None  # LoRA+: the rate of the B matrices is lr x this
    loftq_bits: int = 0  # with init loftq: what LoftQ quantizes to (4: NF4, 8: int8), from model.quantize


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
            plan.dora, plan.rslora, plan.init, plan.lr_ratio_b = s.dora, s.rslora, s.init, s.lr_ratio_b
            plan.loftq_bits = LOFTQ_BITS.get(cfg.model.quantize, 0) if s.init == "loftq" else 0
            problems += _rewrites_quantized(model, group, plan)
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


def _rewrites_quantized(model: nn.Module, group: str, plan: GroupPlan) -> list[str]:
    """PiSSA and OLoRA rewrite the base weights of their layers; peft does that in full precision only."""
    if not plan.init.startswith(("pissa", "olora")):
        return []
    modules = dict(model.named_modules())
    if all(modules[m].weight.dtype.is_floating_point for m in plan.modules):
        return []
    return [
        f"groups.{group}.init is {plan.init}, which rewrites the base weights of the group's layers, but model.quantize "
        f"holds them quantized; set groups.{group}.quantize: false, or init default, gaussian or loftq"
    ]


def variant(plan: GroupPlan) -> tuple:
    """What peft holds per LoraConfig, not per layer: groups that differ in it need adapters of their own."""
    key: tuple = (plan.dora, plan.rslora, plan.init, plan.loftq_bits)
    if plan.rslora and plan.init.startswith(("pissa", "olora")):
        # peft cannot convert an rsLoRA PiSSA/OLoRA adapter with rank or alpha patterns for saving
        key += (plan.rank, plan.alpha)
    return key


def adapter_plans(plans: list[GroupPlan]) -> dict[str, list[GroupPlan]]:
    """The peft adapters of a plan and the LoRA groups each holds, every adapter active at once.

    One adapter, ``default``, when every LoRA group has the same variant (dora, rslora, init); otherwise one per
    group: ``default`` for the first, ``<group>_lora`` for the others (peft saves them in sub-folders so named). Not
    the group's bare name: peft tells adapters apart by their name as a part of a parameter's dotted name, and
    ``language_model`` or ``vision_tower`` are parts of module paths too.
    """
    lora = [p for p in plans if p.mode == "lora"]
    if len({variant(p) for p in lora}) <= 1:
        return {ADAPTER: lora}
    return {(ADAPTER if i == 0 else f"{p.group}_lora"): [p] for i, p in enumerate(lora)}


def peft_init(init: str) -> bool | str:
    """groups.<g>.init as peft's init_lora_weights."""
    return True if init == "default" else init


def lora_config(plans: list[GroupPlan], full: list[str] | None = None):
    """One peft LoraConfig for LoRA groups of one variant: exact module names, per-group rank/alpha as patterns;
    ``full``: the modules of fully trained groups (peft modules_to_save)."""
    from peft import LoftQConfig, LoraConfig

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
    return LoraConfig(
        r=base.rank,
        lora_alpha=base.alpha,
        lora_dropout=base.dropout,
        target_modules=[m for p in lora for m in p.modules],
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        modules_to_save=full or None,
        bias="none",
        use_dora=base.dora,
        use_rslora=base.rslora,
        init_lora_weights=peft_init(base.init),
        loftq_config=LoftQConfig(loftq_bits=base.loftq_bits) if base.init == "loftq" else {},
    )


def apply_plan(model: nn.Module, gmap: GroupMap, plans: list[GroupPlan]) -> nn.Module:
    """Wraps the model for the plan and sets what trains; returns a PeftModel if any group uses LoRA."""
    model = wrap(model, plans)
    activate(model, gmap, plans)
    return model


def wrap(model: nn.Module, plans: list[GroupPlan]) -> nn.Module:
    """Injects LoRA into every LoRA group's layers and copies full groups' modules (peft modules_to_save), in one
    adapter or, when the groups' variants differ, one per group (``adapter_plans``), all active.

    For a run with stages, ``plans`` is the union over stages (see ``union_plans``): a LoRA that only trains
    in a later stage exists from the start as the identity (B = 0, or PiSSA/OLoRA's split of the base weight), so
    it changes nothing until it trains.
    """
    if not any(p.mode == "lora" for p in plans):
        return model
    from peft import get_peft_model

    full = [m for p in plans if p.mode == "full" for m in p.modules]
    (first, first_plans), *others = adapter_plans(plans).items()
    model = get_peft_model(model, lora_config(first_plans, full), adapter_name=first)
    for name, group_plans in others:
        model.add_adapter(name, lora_config(group_plans))
    if others:
        model.base_model.set_adapter([first, *(name for name, _ in others)])
    return model


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
    # peft has one dropout per adapter; give each group its own (and a frozen group none: it costs time).
    for name, module in model.named_modules():
        drop = getattr(module, "lora_dropout", None)
        if isinstance(drop, nn.ModuleDict):
            plan = by_group[gmap.group_of(name)]
            rate = plan.dropout if plan.mode == "lora" else 0.0
            for adapter in drop:
                drop[adapter] = nn.Dropout(rate) if rate > 0 else nn.Identity()


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
        lra = f"{p.rank}/{p.alpha:g}/{p.dropout:g}{_variant_words(p)}" if p.mode == "lora" else "-"
        lr = f"{p.lr:.2e}" if p.mode != "frozen" else "-"
        wd = f"{p.weight_decay:g}" if p.mode != "frozen" else "-"
        rows.append((p.group, p.mode, mods, lra, f"{p.trainable_params:,}", f"{p.total_params:,}", lr, wd))
    return rows


def _variant_words(p: GroupPlan) -> str:
    """' dora rslora pissa B x16' for a LoRA group's variants; empty for plain LoRA."""
    words = [w for w, on in (("dora", p.dora), ("rslora", p.rslora), (p.init, p.init != "default")) if on]
    if p.lr_ratio_b:
        words.append(f"B x{p.lr_ratio_b:g}")
    return "".join(f" {w}" for w in words)


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
