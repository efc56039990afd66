"""The model a run trains: loaded, grouped, planned per stage and wrapped once for every stage.

``train`` and ``doctor`` both start here, so doctor checks exactly the plan the stages run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vlmtune.config.errors import ConfigError
from vlmtune.config.schema import GROUPS, Config
from vlmtune.config.stages import Stage
from vlmtune.model.adapters import initial_weights
from vlmtune.model.archs import family_problems
from vlmtune.model.groups import GroupMap, assign_groups
from vlmtune.model.load import arch_for, empty_model, load_model
from vlmtune.model.tuning import GroupPlan, activate, build_plan, union_plans, wrap


@dataclass
class BuiltModel:
    """A model ready for its stages, and what was decided about it."""

    model: nn.Module  # a PeftModel when any stage uses LoRA
    processor: object
    gmap: GroupMap  # every parameter's component group
    stage_plans: list[list[GroupPlan]]  # per stage: each group's mode, modules, rate
    union: list[GroupPlan]  # what any stage trains: the adapters injected at the start
    trained_params: set[str]  # parameters some stage trains: the weights a resume state holds
    initial: dict = field(default_factory=dict)  # PiSSA/OLoRA adapters' initial weights, to save them converted


DEFAULT_QUANTIZED = ("vision_tower", "language_model")
"""Groups whose linear layers ``model.quantize`` quantizes unless told otherwise (and unless they train fully)."""


def quantized_groups(cfg: Config, stage_cfgs: list[Config]) -> list[str]:
    """The groups ``model.quantize`` applies to: ``groups.<g>.quantize``, or by default the vision tower and the
    language model, never a group trained fully in some stage nor one whose LoRA starts with LoftQ (peft's LoftQ
    quantizes the full-precision weights itself)."""
    if cfg.model.quantize == "none":
        return []
    out = []
    for g in GROUPS:
        full = any(s.group(g).mode == "full" for s in stage_cfgs)
        if any(s.group(g).mode == "lora" and s.group(g).init == "loftq" for s in stage_cfgs):
            continue
        wanted = cfg.group(g).quantize
        if (g in DEFAULT_QUANTIZED and not full) if wanted is None else wanted:
            out.append(g)
    return out


def precise_modules(cfg: Config, stage_cfgs: list[Config], folder: Path) -> list[str]:
    """With ``model.quantize``: the linear modules that stay in full precision (those of the groups it does not
    apply to), found on the model without weights; empty without quantization."""
    if cfg.model.quantize == "none":
        return []
    quantized = quantized_groups(cfg, stage_cfgs)
    shell = empty_model(cfg.model, folder)
    gmap = assign_groups([n for n, _ in shell.named_parameters()], arch_for(shell, cfg.model))
    return [
        n
        for n, m in shell.named_modules()
        if isinstance(m, nn.Linear) and gmap.group_of(f"{n}.weight") not in quantized
    ]


def build_model(cfg: Config, stages: list[Stage], folder: Path, device: torch.device, echo=print) -> BuiltModel:
    """Loads the model, checks the family supports the config, plans every stage and injects LoRA once.

    LoRA that trains in any stage is injected now with B = 0 (so adapters carry over between stages and one that
    first trains later changes nothing until then); the first stage's plan is active on return.

    Raises:
        ConfigError: a setting the model's family cannot honour, or a group plan that matches no module.
    """
    stage_cfgs = [s.cfg for s in stages]
    model, processor = load_model(cfg.model, device, folder, precise_modules(cfg, stage_cfgs, folder))
    if cfg.model.quantize != "none":
        groups = ", ".join(quantized_groups(cfg, stage_cfgs)) or "none"
        loftq = [g for g in GROUPS if any(s.group(g).mode == "lora" and s.group(g).init == "loftq" for s in stage_cfgs)]
        by_loftq = f"; LoftQ quantizes those of {', '.join(loftq)} (peft)" if loftq else ""
        echo(
            f"quantized ({cfg.model.quantize}, bitsandbytes): the linear layers of {groups}{by_loftq}; "
            "the rest in full precision"
        )
    gmap = assign_groups([n for n, _ in model.named_parameters()], arch_for(model, cfg.model))
    problems = [p for s in stages for p in family_problems(gmap.arch, model.config.model_type, s.cfg.train)]
    if problems:
        raise ConfigError(sorted(set(problems)), str(folder))
    if cfg.train.gradient_checkpointing:  # non-reentrant: correct with frozen inputs, no need for input gradients
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        echo("gradient checkpointing: on (layer activations are recomputed in the backward)")
    stage_plans = [build_plan(model, gmap, s.cfg) for s in stages]
    union = union_plans(stage_plans)
    loftq = [p.group for p in union if p.init == "loftq"]
    if loftq and not torch.cuda.is_available():
        raise ConfigError(
            [
                f"groups.{g}.init is loftq, which quantizes on a GPU only (peft's LoftQ computes in CUDA) and this "
                "machine has none: choose another init (default, gaussian, pissa, olora) or train on a GPU"
                for g in loftq
            ],
            str(folder),
        )
    torch.manual_seed(cfg.train.seed)  # new LoRA weights depend on the seed only
    model = wrap(model, union)
    activate(model, gmap, union)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    return BuiltModel(model, processor, gmap, stage_plans, union, trained, initial_weights(model))
