"""Loading a run's config: YAML, then overrides, then LLaMA-Factory keys, validated with every problem at once;
the resolved config as YAML, and the ``--help`` config reference."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from vlmtune.config.checks import raw_problems, semantic_problems
from vlmtune.config.errors import ConfigError, format_validation_error
from vlmtune.config.llamafactory import LLAMA_FACTORY_KEYS, translate, without_shadowed
from vlmtune.config.overrides import apply_overrides, deep_merge, parse_override, read_yaml
from vlmtune.config.schema import DEFAULT_GROUPS, GROUPS, LORA_SETTINGS, Config, GroupConfig, StageConfig
from vlmtune.config.stages import stage_problems


def load_config(path: str | Path | None, overrides: list[str] | None = None, echo=print) -> Config:
    """Reads a YAML config, applies overrides and LLaMA-Factory keys, and validates it all at once.

    Args:
        path: the YAML file, or None for the defaults.
        overrides: ``key.path=value`` strings applied after the file.
        echo: where the LLaMA-Factory translation is printed.

    Raises:
        ConfigError: every problem found, each naming its key.
    """
    source = str(path) if path else "defaults"
    raw = read_yaml(path) if path else {}
    keys = [parse_override(o)[0] for o in overrides or []]
    raw = without_shadowed(raw, [".".join(k) for k in keys])
    raw = apply_overrides(raw, overrides or [])
    native, lines, problems = translate(raw)
    for line in lines:
        echo(line)
    for line in lora_by_its_settings(native):
        echo(line)
    merged = deep_merge({"groups": DEFAULT_GROUPS}, native)
    problems += raw_problems(merged)
    try:
        cfg = Config.model_validate(merged)
    except ValidationError as e:
        schema = _where_in_stages(format_validation_error(e, sorted(LLAMA_FACTORY_KEYS)), merged)
        raise ConfigError(problems + schema, source) from None
    problems += semantic_problems(cfg)
    if not problems and cfg.stages:
        problems += stage_problems(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def lora_by_its_settings(native: dict) -> list[str]:
    """A top-level group given LoRA settings but no ``mode`` is LoRA, whatever its default mode (``projector: {rank:
    4}`` meant LoRA when the projector's default was LoRA, and still does now that it trains fully by default).
    Sets the mode in ``native`` and returns a line per group it set."""
    groups = native.get("groups") if isinstance(native.get("groups"), dict) else {}
    lines = []
    for name, given in groups.items():
        if not isinstance(given, dict) or "mode" in given:
            continue
        default = DEFAULT_GROUPS.get(name, {}).get("mode", "frozen")
        keys = [k for k in LORA_SETTINGS if k in given]
        if keys and default != "lora":
            given["mode"] = "lora"
            lines.append(f"groups.{name}: {', '.join(keys)} given without a mode -> mode lora (default: {default})")
    return lines


def _where_in_stages(problems: list[str], raw: dict) -> list[str]:
    """Prefixes a problem inside ``stages.N`` with the stage it is in, as the stage checks name it: 'stages[N] (NAME): '."""
    stages = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    out = []
    for problem in problems:
        for i, stage in enumerate(stages):
            if f"'stages.{i}." in problem:
                name = stage.get("name", "?") if isinstance(stage, dict) else "?"
                problem = f"stages[{i}] ({name}): {problem}"
                break
        out.append(problem)
    return out


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (saved beside every checkpoint)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def reference(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """One line per config key with its type default and description: the `--help` config reference."""
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if name == "groups" and model is Config:
            lines.append(f"{key}.<{'|'.join(GROUPS)}>:  {field.description}")
            lines += reference(GroupConfig, f"{key}.<group>.")
        elif name == "stages" and model is Config:
            lines.append(f"{key}[]:  {field.description}")
            lines += reference(StageConfig, f"{key}[].")
        elif model is StageConfig and name in ("groups", "data"):  # overrides of the sections above, keys as there
            lines.append(f"  {key} = {{}}\n      {field.description}")
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.append(f"{key}:  {field.description}")
            lines += reference(ann, key + ".")
        else:
            default = field.get_default(call_default_factory=True)
            lines.append(f"  {key} = {default!r}\n      {field.description}")
    return lines
