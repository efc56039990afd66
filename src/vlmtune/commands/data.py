"""`vlmtune data check` and `vlmtune data preview`: the data as training will read it, before training."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlmtune.builtin.base import builtin_processor
from vlmtune.config.load import load_config
from vlmtune.config.schema import BUILTIN_MODEL, Config, ModelConfig
from vlmtune.data.check import check_data, summary_lines
from vlmtune.data.preview import preview
from vlmtune.tracking import echo

CONFIG_SUFFIXES = (".yaml", ".yml")


def load_processor(mcfg: ModelConfig):
    """The model's processor without loading its weights (the builtin base's is built from code if not cached)."""
    from transformers import AutoProcessor

    if mcfg.path == BUILTIN_MODEL:
        return builtin_processor()
    return AutoProcessor.from_pretrained(Path(mcfg.path), trust_remote_code=mcfg.trust_remote_code)


def resolve_target(target: str, overrides: list[str]) -> Config:
    """A config file, or a data file checked as ``data.train`` with the default (or overridden) settings."""
    if Path(target).suffix in CONFIG_SUFFIXES:
        return load_config(target, overrides)
    cfg = load_config(None, overrides)
    cfg.data.train = target
    cfg.data.eval = None
    return cfg


def run_check(target: str, overrides: list[str] | None = None, progress: bool = True, echo=print) -> int:
    """The command: prints every problem (``place: what``), then the summary. Returns 1 on any error, else 0."""
    cfg = resolve_target(target, overrides or [])
    processor = load_processor(cfg.model)
    checks = check_data(cfg, processor, progress)
    for c in checks:
        if c.problems:
            echo(f"{c.split}: {len(c.errors)} error(s), {len(c.problems) - len(c.errors)} warning(s)")
            for p in c.problems:
                echo(f"  {p}{'' if p.is_error else '  (warning)'}")
    echo("\n".join(summary_lines(checks, cfg)))
    errors = sum(len(c.errors) for c in checks)
    if errors:
        bad = sum(len({p.where for p in c.errors if not p.whole_file}) for c in checks)
        echo(
            f"\n{errors} error(s) in {bad} sample(s): training stops on them (data.on_bad_sample: error) "
            f"or leaves those samples out and reports them (data.on_bad_sample: skip)"
        )
        return 1
    echo("\nno errors")
    return 0


def check_command(args: argparse.Namespace) -> int:
    """``vlmtune data check TARGET [overrides]``."""
    return run_check(args.target, args.overrides, progress=not args.no_progress, echo=echo)


def preview_command(args: argparse.Namespace) -> int:
    """``vlmtune data preview CONFIG [overrides]``: a PNG grid of augmented training samples."""
    out = preview(load_config(args.config, args.overrides, echo=echo), args.out, args.samples, args.views)
    echo(f"wrote {out}")
    return 0
