"""`vlmtune train CONFIG [key.path=value ...] [--resume] [--force-resume]`: the training recipe on a config."""

from __future__ import annotations

import argparse
import sys

from vlmtune.builtin.base import model_folder
from vlmtune.config.load import load_config
from vlmtune.config.schema import Config
from vlmtune.tracking import echo
from vlmtune.train.output_dir import OutputDirBusy
from vlmtune.train.recipe import train
from vlmtune.train.run import RunResult
from vlmtune.train.stopping import RunStopped


def run_training(cfg: Config) -> RunResult:
    """Trains ``cfg`` with ``model.path: builtin:...`` resolved (and the builtin base built on first use)."""
    return train(cfg, model_folder)


def command(args: argparse.Namespace) -> int:
    """Loads the config (file, overrides, resume flags), trains; a stopped run prints how to resume."""
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("train.resume=auto")
    if args.force_resume:
        overrides += ["train.resume=auto", "train.force_resume=true"]
    cfg = load_config(args.config, overrides, echo=echo)
    try:
        run_training(cfg)
    except OutputDirBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except RunStopped as e:
        print(f"{e}\n  resume: vlmtune train {' '.join([args.config, *args.overrides])} --resume", file=sys.stderr)
        return e.exit_code
    return 0
