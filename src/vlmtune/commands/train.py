"""`vlmtune train CONFIG [key.path=value ...] [--resume] [--force-resume]`: the training recipe on a config."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from vlmtune.builtin.base import model_folder
from vlmtune.commands.fitting import resolve_batch_size
from vlmtune.config.batch import auto_target
from vlmtune.config.load import load_config
from vlmtune.config.schema import Config
from vlmtune.tracking import echo
from vlmtune.train.output_dir import OutputDirBusy
from vlmtune.train.recipe import train
from vlmtune.train.run import RunResult
from vlmtune.train.stopping import RunStopped


def run_training(cfg: Config) -> RunResult:
    """Trains ``cfg`` with ``model.path: builtin:...`` resolved (and the builtin base built on first use), and
    ``train.batch_size: auto`` resolved by the memory planner (``vlmtune.commands.fitting``) in each process."""
    if auto_target(cfg.train.batch_size)[0]:
        alone = int(os.environ.get("WORLD_SIZE", "1")) > 1
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
        cfg = resolve_batch_size(cfg, model_folder(cfg.model, echo=echo, alone=alone), device, echo=echo)
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
