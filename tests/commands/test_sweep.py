"""`vlmtune sweep` (vlmtune.commands.sweep): the space is checked against the config before anything trains,
trials are real runs of the tiny random Qwen2-VL (a few steps each), a sweep cut short by a signal resumes
without re-running finished trials, a hopeless trial is pruned and stops early, best.yaml loads."""

from __future__ import annotations

import csv
import json
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from vlmtune.cli import main
from vlmtune.commands.space import override, read_space
from vlmtune.commands.sweep import sweep
from vlmtune.config.errors import ConfigError
from vlmtune.config.load import load_config

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "examples" / "quickstart.yaml")
SPACE = {
    "groups.projector.lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
    "groups.language_model.lr": {"type": "float", "low": "1e-4", "high": 3e-2, "log": True},  # YAML's 1e-4
}


def _small(tiny_dir, steps: int) -> list[str]:
    """A few steps of the quickstart recipe on the tiny random model, evaluated every 2 steps (loss only)."""
    return [
        f"model.path={tiny_dir}",
        f"train.max_steps={steps}",
        "train.batch_size=2",
        "train.eval_steps=2",
        "train.logging_steps=1",
        "train.warmup_steps=0",
        "data.builtin_train_samples=16",
        "data.builtin_eval_samples=4",
        "eval.generate_in_training=false",
        "eval.alignment=false",
        "eval.max_new_tokens=2",  # the run report's gallery of answers
    ]


def _space(tmp_path: Path, space: dict) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return str(path)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "name, entry, expected",
    [
        (
            "misspelt group",
            {"groups.projecter.lr": {"type": "float", "low": 1e-4, "high": 1e-2}},
            "did you mean 'projector'",
        ),
        (
            "unknown key",
            {"train.learning_rte": {"type": "float", "low": 1e-4, "high": 1e-2}},
            "did you mean 'learning_rate'",
        ),
        ("low above high", {"groups.projector.lr": {"type": "float", "low": 1e-2, "high": 1e-4}}, "must be below high"),
        (
            "log from zero",
            {"groups.projector.lr": {"type": "float", "low": 0, "high": 1e-2, "log": True}},
            "needs low > 0",
        ),
        (
            "value the config refuses",
            {"train.max_steps": {"type": "int", "low": 0, "high": 10}},
            "'train.max_steps' = 0",
        ),
        (
            "choice the config refuses",
            {"train.scheduler": {"type": "categorical", "choices": ["cosine", "cos"]}},
            "'cos'",
        ),
        (
            "unknown type",
            {"groups.projector.lr": {"type": "uniform", "low": 1e-4, "high": 1e-2}},
            "float, int, categorical",
        ),
        ("unknown setting", {"groups.projector.lr": {"type": "float", "low": 1e-4, "hi": 1e-2}}, "valid: high, log"),
        ("int needs whole bounds", {"groups.projector.rank": {"type": "int", "low": 2.5, "high": 8}}, "whole bounds"),
    ],
)
def test_space_problems_name_the_key_and_what_is_valid(tmp_path, name, entry, expected):
    with pytest.raises(ConfigError) as e:
        read_space(_space(tmp_path, entry), QUICKSTART)
    assert list(entry)[0] in str(e.value) and expected in str(e.value), str(e.value)


def test_every_problem_at_once_through_the_cli(tmp_path, capsys):
    space = _space(
        tmp_path, {"groups.projecter.lr": {"type": "float", "low": 1, "high": 2}, "train.seed": {"type": "int"}}
    )
    assert main(["sweep", QUICKSTART, "--space", space, "--trials", "2", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s) in search space" in err and "groups.projecter.lr" in err and "'train.seed'" in err
    assert not (tmp_path / "s").exists()  # nothing written before the space is valid


def test_override_values_read_back_as_numbers():
    assert override("groups.projector.lr", 1e-5) == "groups.projector.lr=1.0e-05"
    cfg = load_config(QUICKSTART, [override("groups.projector.lr", 1e-5), override("train.scheduler", "linear")])
    assert cfg.groups.projector.lr == 1e-5 and cfg.train.scheduler == "linear"


def _check_best(out: Path, rows: list[dict]) -> None:
    """best.yaml is a complete config that the loader accepts, with the values of the best finished trial."""
    best = load_config(out / "best.yaml")
    row = min((r for r in rows if r["state"] == "complete"), key=lambda r: float(r["eval_loss"]))
    assert f"trial {row['trial']} ({row['folder']})" in (out / "best.yaml").read_text().splitlines()[0]
    assert best.groups.projector.lr == pytest.approx(float(row["groups.projector.lr"]), rel=1e-3)
    assert best.groups.language_model.lr == pytest.approx(float(row["groups.language_model.lr"]), rel=1e-3)
    assert best.train.output_dir == "runs/quickstart"  # the config's own, not a trial's folder


def _interrupt_when_training(run: Path) -> threading.Thread:
    """Sends SIGTERM to the main thread once the run in ``run`` has logged its second training step (as a
    scheduler preempting the job would)."""
    main_id = threading.main_thread().ident

    def watch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                trained = max((r["step"] for r in _records(run) if "loss" in r), default=0)
            except (OSError, ValueError):  # not written yet, or a line being written
                trained = 0
            if trained >= 2:
                signal.pthread_kill(main_id, signal.SIGTERM)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_where_it_stopped(tiny_dir, tmp_path, capsys):
    out, space = tmp_path / "sweep", _space(tmp_path, SPACE)
    args = [QUICKSTART, *_small(tiny_dir, 6)]

    # First invocation: trial 0 finishes, trial 1 is stopped by a signal after its second step.
    watcher = _interrupt_when_training(out / "trial-001")
    code = sweep(args[0], space, 2, args[1:], out=str(out))
    watcher.join()
    assert code == 128 + signal.SIGTERM
    assert "continue it with: vlmtune sweep" in capsys.readouterr().out
    assert (out / "trial-000" / "final").is_dir() and not (out / "trial-001" / "final").exists()
    assert list((out / "trial-001").glob("checkpoint-*")), "a stopped trial saves a checkpoint to resume from"
    finished = (out / "trial-000" / "metrics.jsonl").stat().st_mtime_ns

    # The same command again: trial 0 is kept, trial 1 continues in its folder from its checkpoint.
    assert sweep(args[0], space, 2, args[1:], out=str(out)) == 0
    printed = capsys.readouterr().out
    assert "2 trials (1 done, 1 to resume)" in printed and "(trial-001, resumed)" in printed
    assert (out / "trial-000" / "metrics.jsonl").stat().st_mtime_ns == finished, "a finished trial ran again"
    assert "resuming from" in (out / "trial-001" / "train.log").read_text()
    assert (out / "trial-001" / "final").is_dir()

    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [(r["folder"], r["state"]) for r in rows] == [
        ("trial-000", "complete"),
        ("trial-001", "interrupted"),
        ("trial-001", "complete"),
    ]
    assert (out / "trials.md").read_text().startswith("| trial | folder | state | eval_loss |")
    assert (out / "sweep.png").stat().st_size > 10_000 and (out / "study.db").is_file()

    _check_best(out, rows)

    # Asking for more trials of another space in the same folder is refused, naming what changed.
    other = _space(tmp_path, {"groups.projector.lr": SPACE["groups.projector.lr"]})
    with pytest.raises(ConfigError, match="another space"):
        sweep(args[0], other, 3, args[1:], out=str(out))


@pytest.mark.slow
def test_three_trials_a_hopeless_one_pruned_early_and_best_yaml(tiny_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    good = {"groups.projector.lr": 3e-3, "groups.language_model.lr": 1e-2}  # eval loss 6.02 -> about 5.1 at step 2
    hopeless = {"groups.projector.lr": 1e-4, "groups.language_model.lr": 1e-4}  # about 5.96 there
    code = sweep(
        QUICKSTART, _space(tmp_path, SPACE), 3, _small(tiny_dir, 8), out=str(out), startup=1, first=[good, hopeless]
    )
    assert code == 0
    assert "pruned at step 2" in capsys.readouterr().out
    rows = {r["folder"]: r for r in csv.DictReader((out / "trials.csv").open())}
    assert rows["trial-000"]["state"] == "complete" and rows["trial-001"]["state"] == "pruned"
    assert rows["trial-002"]["state"] in ("complete", "pruned") and len(rows) == 3  # sampled by TPE (seeded)
    steps = [r["step"] for r in _records(out / "trial-001") if "loss" in r]
    assert max(steps) < 8, f"the pruned trial trained {max(steps)} of 8 steps"
    assert not (out / "trial-001" / "final").exists()
    _check_best(out, list(rows.values()))
    assert load_config(out / "best.yaml").train.max_steps == 8
