"""`vlmtune lr-find CONFIG [--steps N] [--min 1e-6] [--max 1e-1]`: a learning-rate range test per component group.

Leslie N. Smith's LR range test ("Cyclical Learning Rates for Training Neural Networks", WACV 2017, section 3.3),
once per trained group: from the same starting weights, the group's rate rises exponentially from ``--min`` to
``--max`` over ``--steps`` optimizer steps while the loss is recorded; the suggested rate is where the smoothed
loss falls fastest (``commands/lr_range.py``).

The other trained groups stay frozen during a group's test, rather than training at their configured rates: then
every change of the loss comes from the group under test, so the curves of the projector and of the language
model can be compared and "the projector takes a higher rate than the language model" is a statement about the
projector. With the others training too, their own progress would fall on every curve and the steepest point
would mostly say where the other groups' schedule was. Each group starts from the config's starting weights
(LoRA B = 0), its LoRA or full-training settings as configured; the model files are only read.

Reads top to bottom: the config and its first stage, the data, then per trained group: the model built with the
others frozen, the rising rate, the loss per step; then the table, ``lr_find.csv`` and ``lr_find.png`` in --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from accelerate.utils import set_seed

from vlmtune.builtin.base import model_folder
from vlmtune.commands.fitting import resolve_batch_size
from vlmtune.commands.lr_range import Curve, Suggestion, rates, suggest, table_rows, write_csv, write_plot
from vlmtune.config.errors import ConfigError
from vlmtune.config.load import load_config
from vlmtune.config.schema import GROUPS, Config
from vlmtune.config.stages import resolve_stages
from vlmtune.model.build import build_model
from vlmtune.tracking import echo, text_table
from vlmtune.train.distributed import make_accelerator
from vlmtune.train.loader import load_stage_data, make_loader
from vlmtune.train.optim import build_optimizer, param_groups
from vlmtune.train.sft import SFT


def _quiet(*args, **kwargs) -> None:
    """The model build's lines, once per group, are left out (``vlmtune doctor`` prints the plan)."""


def alone(cfg: Config, group: str) -> Config:
    """The stage's config with every other group frozen (and no stages of its own)."""
    one = cfg.model_copy(deep=True)
    one.stages = []
    for g in GROUPS:
        if g != group:
            one.group(g).mode = "frozen"
    return one


def _batches(loader):
    """The loader's batches, epoch after epoch."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch) if hasattr(loader.sampler, "set_epoch") else None
        yield from loader
        epoch += 1


def range_test(cfg: Config, group: str, built, train_ds, device: torch.device, lrs: list[float], acc) -> Curve:
    """One group's test on its model (built with the others frozen): its rate rising step by step, the loss of
    each step (training mode, as in a run)."""
    t = cfg.train
    model = built.model
    groups = param_groups(model, built.gmap, built.stage_plans[0])
    base = [g["lr"] / cfg.group_lr(group) for g in groups]  # LoRA+ keeps its ratio of B's rate to A's
    optimizer = build_optimizer(groups, t.adam_betas)
    loader = make_loader(train_ds, built.processor, t.batch_size, True, t.seed, 0)
    trainable = [p for g in groups for p in g["params"]]
    objective = SFT(t.label_only_logits)
    curve = Curve(group, cfg.group_lr(group))
    model.train()
    for lr, batch in zip(lrs, _batches(loader)):
        for scale, og in zip(base, optimizer.param_groups):
            og["lr"] = lr * scale
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        step = objective.loss(model, batch, acc)
        if not curve.add(lr, step.value.item()):
            break
        step.loss.backward()
        if t.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return curve


def lr_find(
    config: str,
    overrides: list[str] | None = None,
    steps: int = 100,
    min_lr: float = 1e-6,
    max_lr: float = 1e-1,
    out: str | None = None,
) -> list[Suggestion]:
    """Runs the range test of every trained group of the config's first stage; prints the table and writes
    ``lr_find.csv`` and ``lr_find.png`` to ``out`` (default: ``train.output_dir`` + ``-lr-find``).

    Raises:
        ConfigError: a bad config or range, a method other than sft, or no trained group.
    """
    cfg = load_config(config, overrides or [], echo=echo)
    problems = []
    if not 0 < min_lr < max_lr:
        problems.append(f"--min ({min_lr:g}) must be above 0 and below --max ({max_lr:g})")
    if steps < 3:
        problems.append(f"--steps ({steps}) must be at least 3")
    stages = resolve_stages(cfg)
    stage = stages[0].cfg
    if stage.train.method != "sft":
        problems.append(f"train.method is {stage.train.method}: lr-find measures the sft loss (answer tokens)")
    trained = [g for g in GROUPS if stage.group(g).mode != "frozen"]
    if not trained:
        problems.append("every group is frozen: nothing to test (groups.<group>.mode: lora or full)")
    if problems:
        raise ConfigError(problems, "lr-find")
    if len(stages) > 1:
        echo(f"lr-find: the first stage, '{stages[0].name}' ({len(stages)} stages)")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    folder = model_folder(cfg.model, echo=echo)
    stage = resolve_batch_size(stage, folder, device, echo=echo)
    out_dir = Path(out) if out else Path(f"{cfg.train.output_dir.rstrip('/')}-lr-find")
    out_dir.mkdir(parents=True, exist_ok=True)
    acc = make_accelerator(1, [], str(out_dir))

    lrs = rates(min_lr, max_lr, steps)
    echo(
        f"lr-find: {', '.join(trained)}, each alone (the others frozen), rate {min_lr:.0e} -> {max_lr:.0e} "
        f"over {steps} steps of {stage.train.batch_size} samples"
    )
    curves, suggestions = [], []
    data = None
    for group in trained:
        one = alone(stage, group)
        set_seed(stage.train.seed)  # every group's test starts from the same weights and LoRA initialisation
        built = build_model(one, resolve_stages(one), folder, device, echo=_quiet)
        if data is None:  # the data once: the processor is the model folder's, the same for every build
            train_only = stage.model_copy(deep=True)
            train_only.stages, train_only.data.eval = [], None  # the test reads the training loss only
            data = load_stage_data(resolve_stages(train_only)[:1], built.processor)[0]
        curve = range_test(stage, group, built, data.train, device, lrs, acc)
        del built
        if not curve.lrs:
            raise ConfigError([f"groups.{group}: the loss was not finite at the first step ({min_lr:g})"], "lr-find")
        curves.append(curve)
        suggestions.append(suggest(curve))
        stopped = f", stopped at {curve.lrs[-1]:.1e} (the loss diverged)" if len(curve.lrs) < steps else ""
        echo(f"  {group}: suggested {suggestions[-1].suggested:.2e}{stopped}")
    for line in text_table(table_rows(suggestions)):
        echo(line)
    csv_path = write_csv(curves, out_dir / "lr_find.csv")
    png = write_plot(curves, suggestions, out_dir / "lr_find.png")
    echo(f"wrote {png}, {csv_path}")
    return suggestions


def command(args: argparse.Namespace) -> int:
    lr_find(args.config, args.overrides, args.steps, args.min_lr, args.max_lr, args.out)
    return 0
