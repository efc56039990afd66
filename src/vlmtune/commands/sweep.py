"""`vlmtune sweep CONFIG --space SPACE.yaml --trials N`: a hyperparameter search over any config keys with Optuna.

Reads top to bottom: the space is checked against the config (``commands/space.py``), the study opens in an
SQLite file in the sweep folder (so the same command resumes it), each trial trains as a normal run in
``DIR/trial-NNN`` (``commands/trial.py`` reports its evals and stops it when the pruner says so), then the table,
the plot and the best config are written (``commands/sweep_results.py``).

Sampling is Optuna's TPE, seeded (Bergstra et al. 2011, "Algorithms for Hyper-Parameter Optimization"); pruning is
the median rule (a trial whose intermediate value is worse than the median of earlier trials at the same step
stops; Golovin et al. 2017, "Google Vizier"). A trial stopped by a signal is re-run on the next invocation from
its checkpoint, in its own folder; finished trials are kept.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from vlmtune.commands.space import Param, read_space, space_overrides
from vlmtune.commands.sweep_results import write_results
from vlmtune.commands.train import run_training
from vlmtune.commands.trial import SweepSignals, Watcher, eval_names, eval_records, steps_trained
from vlmtune.config.errors import ConfigError
from vlmtune.config.load import load_config
from vlmtune.tracking import echo
from vlmtune.train.stopping import RunStopped

STUDY = "vlmtune-sweep"
"""The study's name in ``DIR/study.db`` (``optuna-dashboard sqlite:///DIR/study.db`` shows it)."""
LOWER_IS_BETTER = ("eval_loss", "eval/loss", "eval/perplexity")


class TrialFailed(RuntimeError):
    """A trial that ended without a result (a non-finite loss, no gradient): recorded, and the sweep goes on."""


class SweepInterrupted(RuntimeError):
    """A signal stopped the sweep; the trial it stopped is re-run from its checkpoint next time."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.exit_code = 128 + signum


@dataclass
class Sweep:
    """What every trial of a sweep shares."""

    config: str
    overrides: list[str]
    params: list[Param]
    metric: str
    direction: str
    out: Path
    signals: SweepSignals


def default_direction(metric: str) -> str:
    return "minimize" if metric in LOWER_IS_BETTER or metric.endswith("loss") else "maximize"


def open_study(sw: Sweep, seed: int, startup: int):
    """Creates the study in ``DIR/study.db``, or loads it when the folder holds one of the same sweep; returns
    the study and its storage."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sw.out.mkdir(parents=True, exist_ok=True)
    what = {"config": sw.config, "overrides": sw.overrides, "metric": sw.metric, "direction": sw.direction}
    what["space"] = [p.__dict__ | {"choices": list(p.choices)} for p in sw.params]
    what = json.loads(json.dumps(what))
    storage = optuna.storages.RDBStorage(f"sqlite:///{sw.out.resolve() / 'study.db'}")
    try:
        study_id = storage.get_study_id_from_name(STUDY)
    except KeyError:
        study_id = None
    if study_id is not None and storage.get_study_user_attrs(study_id).get("sweep") != what:
        ended = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        before = storage.get_study_user_attrs(study_id).get("sweep") or {}
        if storage.get_all_trials(study_id, deepcopy=False, states=ended):
            changed = [k for k in what if before.get(k) != what[k]]
            raise ConfigError(
                [
                    f"{sw.out} holds a sweep with another {', '.join(changed)}; resuming would mix two searches. "
                    "Use another --out, or the same config, overrides, space, metric and direction"
                ],
                "sweep",
            )
        storage.delete_study(study_id)  # nothing finished in it: start the new sweep afresh
    study = optuna.create_study(
        storage=storage,
        study_name=STUDY,
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=startup),
        direction=sw.direction,
        load_if_exists=True,
    )
    study.set_user_attr("sweep", what)
    return study, storage


def folder_of(trial) -> str:
    """A trial's run folder: its own, or that of the interrupted trial it re-runs."""
    return trial.user_attrs.get("folder", f"trial-{trial.number:03d}")


def requeue_interrupted(study, storage) -> int:
    """Trials cut short (a signal, a crash, an error outside the run) are queued again, each to continue in its
    own folder from its checkpoint; returns how many. A trial still marked running belongs to a process that is
    gone (one sweep per folder at a time)."""
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(STUDY)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_state_values(
            storage.get_trial_id_from_study_id_trial_number(study_id, t.number), TrialState.FAIL
        )
    latest = {folder_of(t): t for t in study.get_trials(deepcopy=False)}
    queued = [t for t in latest.values() if t.state == TrialState.FAIL and "failed" not in t.user_attrs]
    for t in queued:
        study.enqueue_trial(t.params, user_attrs={"folder": folder_of(t)})
    return len(queued)


def trials_done(study) -> int:
    """Trials that count towards ``--trials``: finished, pruned, or failed in their run (a non-finite loss)."""
    from optuna.trial import TrialState

    return sum(
        1
        for t in study.get_trials(deepcopy=False)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or "failed" in t.user_attrs
    )


def run_trial(sw: Sweep, trial) -> float:
    """One trial: its values suggested, trained as a normal run in its folder, watched; returns the metric."""
    import optuna

    folder = folder_of(trial)
    trial.set_user_attr("folder", folder)
    values = {p.key: p.suggest(trial) for p in sw.params}
    run_dir = sw.out / folder
    resume = ["train.resume=auto"] if any(run_dir.glob("checkpoint-*")) else []
    sets = [
        *sw.overrides,
        *space_overrides(sw.params, values),
        f"train.output_dir={run_dir}",
        "train.progress_bar=false",
    ]
    cfg = load_config(sw.config, sets + resume, echo=lambda *a: None)
    run_dir.mkdir(parents=True, exist_ok=True)
    shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    echo(f"trial {trial.number} ({folder}{', resumed' if resume else ''}): {shown}")
    watcher = Watcher(trial, run_dir / "metrics.jsonl", sw.metric, sw.signals)
    start = time.monotonic()
    stopped: RunStopped | None = None
    with (run_dir / "train.log").open("a", encoding="utf-8") as log:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            watcher.start()
            try:
                run_training(cfg)
            except RunStopped as e:
                stopped = e
            finally:
                watcher.finish()
                sw.signals.expected = 0
    found = eval_records(run_dir / "metrics.jsonl", sw.metric)
    trial.set_user_attr("steps", steps_trained(run_dir / "metrics.jsonl"))
    trial.set_user_attr("seconds", round(time.monotonic() - start, 1))
    if watcher.pruned_at is not None and stopped is not None:
        echo(f"  pruned at step {watcher.pruned_at} ({sw.metric} {dict(found)[watcher.pruned_at]:.4g})")
        raise optuna.TrialPruned()
    if stopped is not None and stopped.exit_code >= 128:  # a signal: the run saved a checkpoint to resume from
        raise SweepInterrupted(stopped.exit_code - 128)
    if stopped is not None:
        echo(f"  failed: {str(stopped).splitlines()[0]}")
        trial.set_user_attr("failed", str(stopped).splitlines()[0])
        raise TrialFailed(str(stopped))
    if not found:
        names = ", ".join(eval_names(run_dir / "metrics.jsonl")) or "none (set data.eval)"
        raise ConfigError([f"--metric {sw.metric} was not logged by the run; its eval metrics: {names}"], "sweep")
    echo(f"  {sw.metric} = {found[-1][1]:.4g} after {found[-1][0]} steps")
    return found[-1][1]


def sweep(
    config: str,
    space: str,
    trials: int,
    overrides: list[str] | None = None,
    metric: str = "eval_loss",
    direction: str | None = None,
    out: str | None = None,
    seed: int | None = None,
    startup: int = 5,
    first: list[dict] | None = None,
) -> int:
    """Runs (or resumes) a sweep; writes ``DIR/study.db``, ``DIR/trial-NNN/``, ``trials.csv``, ``trials.md``,
    ``sweep.png`` and ``best.yaml``. Returns the exit code: 0, or 128 + the signal that stopped it.

    Args:
        first: values of the first trials (e.g. the config's own, as a baseline), run before any sampled one;
            queued only when the study is new.

    Raises:
        ConfigError: a bad space, config or metric, or a folder holding another sweep.
    """
    import optuna

    overrides = list(overrides or [])
    if trials < 1 or startup < 0:
        raise ConfigError(
            [f"--trials ({trials}) must be at least 1 and --startup-trials ({startup}) at least 0"], "sweep"
        )
    cfg = load_config(config, overrides, echo=echo)
    if not cfg.data.eval:
        raise ConfigError(["data.eval is empty: a sweep compares the runs' evaluations"], "sweep")
    params = read_space(space, config, overrides)
    folder = Path(out) if out else Path(f"{cfg.train.output_dir.rstrip('/')}-sweep")
    sw = Sweep(config, overrides, params, metric, direction or default_direction(metric), folder, SweepSignals())
    study, storage = open_study(sw, cfg.train.seed if seed is None else seed, startup)
    if not study.get_trials(deepcopy=False):
        for values in first or []:
            study.enqueue_trial(values)
    queued = requeue_interrupted(study, storage)
    todo = max(0, trials - trials_done(study))
    echo(
        f"sweep: {len(params)} parameter(s), {sw.direction} {metric}, {trials} trials "
        f"({trials - todo} done{f', {queued} to resume' if queued else ''}) in {folder}"
    )
    if not cfg.train.eval_steps:
        echo("  note: train.eval_steps is empty, so trials are evaluated only at their end and none is pruned")
    code = 0
    with sw.signals:
        try:
            study.optimize(
                lambda trial: run_trial(sw, trial),
                n_trials=todo,
                catch=(TrialFailed,),
                callbacks=[lambda study, _: study.stop() if sw.signals.signum is not None else None],
            )
        except SweepInterrupted as e:
            code = e.exit_code
    if sw.signals.signum is not None and not code:
        code = 128 + sw.signals.signum
    write_results(study, sw, cfg)
    if code:
        args = " ".join([config, *overrides, "--space", space, "--trials", str(trials), "--out", str(folder)])
        echo(f"sweep stopped by a signal; continue it with: vlmtune sweep {args}")
    if optuna.trial.TrialState.COMPLETE not in {t.state for t in study.get_trials(deepcopy=False)}:
        echo("no trial finished yet: no best.yaml")
    return code


def command(args: argparse.Namespace) -> int:
    return sweep(
        args.config,
        args.space,
        args.trials,
        args.overrides,
        args.metric,
        args.direction,
        args.out,
        args.seed,
        args.startup_trials,
    )
