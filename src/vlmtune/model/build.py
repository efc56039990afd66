"""The model a run trains: loaded, grouped, planned per stage and wrapped once for every stage.

``train`` and ``doctor`` both start here, so doctor checks exactly the plan the stages run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlmtune.config.errors import ConfigError
from vlmtune.config.schema import Config
from vlmtune.config.stages import Stage
from vlmtune.model.archs import family_problems
from vlmtune.model.groups import GroupMap, assign_groups
from vlmtune.model.load import arch_for, load_model
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


def build_model(cfg: Config, stages: list[Stage], folder: Path, device: torch.device, echo=print) -> BuiltModel:
    """Loads the model, checks the family supports the config, plans every stage and injects LoRA once.

    LoRA that trains in any stage is injected now with B = 0 (so adapters carry over between stages and one that
    first trains later changes nothing until then); the first stage's plan is active on return.

    Raises:
        ConfigError: a setting the model's family cannot honour, or a group plan that matches no module.
    """
    model, processor = load_model(cfg.model, device, folder)
    gmap = assign_groups([n for n, _ in model.named_parameters()], arch_for(model, cfg.model))
    problems = [p for s in stages for p in family_problems(gmap.arch, model.config.model_type, s.cfg.train)]
    if problems:
        raise ConfigError(sorted(set(problems)), str(folder))
    if cfg.train.gradient_checkpointing:  # non-reentrant: correct with frozen inputs, no need for input gradients
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        echo("gradient checkpointing: on (layer activations are recomputed in the backward)")
    stage_plans = [build_plan(model, gmap, s.cfg) for s in stages]
    union = union_plans(stage_plans)
    torch.manual_seed(cfg.train.seed)  # new LoRA weights depend on the seed only
    model = wrap(model, union)
    activate(model, gmap, union)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    return BuiltModel(model, processor, gmap, stage_plans, union, trained)
