"""Stages as data: each stage is the top-level config with its own overrides applied.

A run without ``stages:`` is one stage named ``train``. LoRA and fully-trained weights carry over from
stage to stage, so a group keeps one kind of training (lora or full) and, as LoRA, one rank, alpha, set of
targets and variant (dora, rslora, init) across the stages where it trains; only its mode, rates and dropout may
change.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from vlmtune.config.checks import semantic_problems
from vlmtune.config.errors import format_validation_error
from vlmtune.config.overrides import deep_merge
from vlmtune.config.schema import GROUPS, Config, StageConfig
from vlmtune.paths import GALLERY_FILE, LOCK_NAME, OLD_SUFFIX, PLAN_FILE, REPORT_FILE, TMP_SUFFIX

RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "loss.png",
    "metrics.png",
    "data_report.json",
    PLAN_FILE,
    GALLERY_FILE,
    REPORT_FILE,
    LOCK_NAME,
)
"""Files a run folder holds beside its checkpoint folders (``data_report-STAGE.json`` too, one per stage)."""
RESERVED_NAMES = ("final", "trainer_state", "vlmtune", *RUN_FILES)
"""Names a stage folder cannot take: run outputs, resume state, the tensorboard folder (``vlmtune``), run files."""
RESERVED_SUFFIXES = (TMP_SUFFIX, OLD_SUFFIX)  # an atomic save's temporary and swapped-out folders


def reserved_name(name: str) -> bool:
    """True where a stage named ``name`` would write over, or be mistaken for, something the run folder holds."""
    return name in RESERVED_NAMES or name.startswith(("checkpoint-", "data_report")) or name.endswith(RESERVED_SUFFIXES)


@dataclass
class Stage:
    """One stage as the recipe runs it."""

    index: int
    name: str
    cfg: Config  # the run's config as this stage sees it: groups, rates, length and data
    named: bool  # False for the implicit single stage of a run without ``stages:``


def _overrides(stage: StageConfig) -> dict:
    train: dict = {}
    if stage.steps is not None:
        train["max_steps"] = stage.steps
    elif stage.epochs is not None:
        train.update(max_steps=None, epochs=stage.epochs)
    if stage.learning_rate is not None:
        train["learning_rate"] = stage.learning_rate
    if stage.warmup_steps is not None:
        train["warmup_steps"] = stage.warmup_steps
    if stage.scheduler is not None:
        train["scheduler"] = stage.scheduler
    if stage.method is not None:
        train["method"] = stage.method
    for method in ("dpo", "kto", "grpo"):
        train[method] = getattr(stage, method).model_dump(exclude_none=True)
    # The stage's typed overrides, without the keys it leaves empty (those come from the top level).
    return {
        "groups": stage.groups.model_dump(exclude_none=True),
        "data": stage.data.model_dump(exclude_none=True),
        "train": train,
    }


def stage_config(cfg: Config, stage: StageConfig) -> Config:
    """The config a stage runs with: top-level settings, then the stage's own."""
    base = cfg.model_dump(mode="python", exclude={"stages"})
    return Config.model_validate(deep_merge(base, _overrides(stage)))


def resolve_stages(cfg: Config) -> list[Stage]:
    """The stages to run, in order."""
    if not cfg.stages:
        return [Stage(0, "train", cfg, named=False)]
    return [Stage(i, s.name, stage_config(cfg, s), named=True) for i, s in enumerate(cfg.stages)]


def _lora_key(g) -> tuple:
    targets = g.targets if isinstance(g.targets, str) else tuple(g.targets)
    return g.rank, g.lora_alpha, targets, g.dora, g.rslora, g.init


def stage_problems(cfg: Config) -> list[str]:
    """Every problem with ``stages:``, each naming the stage and key."""
    problems: list[str] = []
    seen: dict[str, int] = {}
    resolved: list[tuple[str, Config]] = []
    for i, stage in enumerate(cfg.stages):
        where = f"stages[{i}] ({stage.name})"
        if stage.name in seen:
            problems.append(
                f"{where}: the name is already used by stages[{seen[stage.name]}]; stage names must be unique (each names a folder)"
            )
        seen.setdefault(stage.name, i)
        if reserved_name(stage.name):
            problems.append(
                f"{where}: '{stage.name}' is reserved for what a run folder holds (final, checkpoint-N, trainer_state, "
                f"*.tmp, *.old, {', '.join(RUN_FILES)}, data_report*); pick another name"
            )
        try:
            scfg = stage_config(cfg, stage)
        except ValidationError as e:
            problems += [f"{where}: {p}" for p in format_validation_error(e)]
            continue
        problems += [f"{where}: {p}" for p in semantic_problems(scfg)]
        resolved.append((where, scfg))
    for group in GROUPS:
        changed = [w for w, scfg in resolved if scfg.group(group).quantize != cfg.group(group).quantize]
        if changed:
            problems.append(
                f"groups.{group}.quantize differs in {', '.join(changed)}: weights are quantized once, when the model "
                "is loaded, for the whole run; set it at the top level only"
            )
        modes = [(where, scfg.group(group)) for where, scfg in resolved if scfg.group(group).mode != "frozen"]
        kinds = {g.mode for _, g in modes}
        if len(kinds) > 1:
            detail = ", ".join(f"{w}: {g.mode}" for w, g in modes)
            problems.append(
                f"groups.{group} is lora in one stage and full in another ({detail}); a group's trained "
                "weights carry over between stages, so it must keep one of the two (or stay frozen)"
            )
        lora = [(w, g) for w, g in modes if g.mode == "lora"]
        if len({_lora_key(g) for _, g in lora}) > 1:
            detail = "; ".join(
                f"{w}: rank {g.rank}, alpha {g.lora_alpha:g}, targets {g.targets}, dora {g.dora}, rslora {g.rslora}, "
                f"init {g.init}"
                for w, g in lora
            )
            problems.append(
                f"groups.{group}: LoRA weights carry over between stages, so rank, alpha, targets, dora, rslora and "
                f"init must be the same in every stage where it is lora ({detail})"
            )
    return problems
