"""What a stage does and did, in the user's terms: which groups it trains, what each epoch draws from weighted
sources, and how many of the groups' tensors it changed."""

from __future__ import annotations

import json

import torch

from vlmtune.model.tuning import GroupPlan, plan_rows, plan_table
from vlmtune.paths import PLAN_FILE, write_atomic
from vlmtune.tracking import echo
from vlmtune.train.loader import realised_mix
from vlmtune.train.optim import describe
from vlmtune.train.run import Run, StageRun
from vlmtune.train.sharding import full


def announce(run: Run, sr: StageRun) -> None:
    """The stage's header: what trains, what is frozen, the plan table and the optimizer groups."""
    stage, plans = sr.stage, sr.plans
    trained = [f"{p.group} ({p.mode})" for p in plans if p.mode != "frozen"]
    frozen = [p.group for p in plans if p.mode == "frozen"]
    echo(
        f"\nstage {stage.index + 1}/{run.n_stages} '{stage.name}': trains {', '.join(trained)}; "
        f"frozen: {', '.join(frozen) or '-'}"
    )
    echo(plan_table(plans))
    for line in describe(sr.param_groups):
        echo(line)
    if run.accelerator.is_main_process:
        save_plan(run, sr)


def save_plan(run: Run, sr: StageRun) -> None:
    """Adds the stage's plan table (rows of text) to the run folder's ``plan.json``, stages in run order."""
    path = run.out / PLAN_FILE
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() and sr.stage.index > 0 else {}
    saved[sr.stage.name] = [list(row) for row in plan_rows(sr.plans)]
    write_atomic(path, json.dumps(saved, indent=1) + "\n")


@torch.no_grad()
def fingerprints(model, names: set[str]) -> dict[str, tuple[float, float, int]]:
    """(sum, sum of squares, size) per parameter, in float64: enough to tell which tensors a stage changed (sharded
    weights are gathered: every process must call)."""
    out = {}
    for n, p in model.named_parameters():
        if n in names:
            whole = full(p).double()
            out[n] = (whole.sum().item(), whole.square().sum().item(), p.numel())
    return out


def report_changes(run: Run, sr: StageRun, plans: list[GroupPlan], after: dict) -> None:
    """Logs, per group, how many of the run's trainable tensors and parameters this stage changed."""
    before, stage = sr.before, sr.stage
    record = {"step": run.progress.global_step, "stage_end": stage.name}
    for plan in plans:
        names = [n for n in before if run.gmap.group_of(n) == plan.group]
        if not names:
            continue
        changed = [n for n in names if before[n] != after[n]]
        n_params = sum(after[n][2] for n in changed)
        record[f"changed_params/{plan.group}"] = n_params
        echo(
            f"stage '{stage.name}': {plan.group} ({plan.mode}) changed {len(changed)} of {len(names)} tensors "
            f"({n_params:,} parameters)"
        )
    run.metrics.log(record)


def announce_mix(run: Run, sr: StageRun) -> None:
    """At an epoch's start, with weighted sources: what this epoch draws from each, printed and in metrics.jsonl."""
    if run.progress.batch_in_epoch:  # a run resumed mid-epoch said this epoch's mix already
        return
    mix = realised_mix(sr.sampler, sr.stage.cfg.data)
    if mix is None:
        return
    echo(f"epoch {run.progress.epoch} mix (data.train weights):")
    for path, r in mix.items():
        echo(f"  {path}: {r['drawn']} drawn ({r['distinct']} distinct of {r['held']}, weight {r['weight']})")
    run.metrics.log({"step": run.progress.global_step, "epoch": run.progress.epoch, "mix": mix})
