"""A run killed at any point and resumed ends with the weights of a run never stopped.

Runs go through the real CLI in subprocesses that are killed with real signals (SIGKILL, SIGTERM).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from vlmtune.cli import main

# Two stages of 8 steps, 3 optimizer steps per epoch (24 samples, batch 4, grad_accum 2), a checkpoint every
# 3 steps, LoRA dropout on the projector: resume must restore weights, optimizer, schedule, data position
# across epochs, stage and the dropout RNG.
CONFIG = """
model: {path: builtin:tiny-qwen2-vl}
groups:
  projector: {mode: lora, rank: 8, dropout: 0.1, lr: 3.0e-3}
  language_model: {mode: lora, rank: 8, targets: attention, lr: 1.0e-3}
data: {train: builtin:shapes:color, max_length: 256, builtin_train_samples: 24}
train: {batch_size: 4, grad_accum: 2, logging_steps: 1, save_steps: 3, warmup_steps: 2, seed: 7, progress_bar: false}
stages:
  - {name: align, steps: 8, groups: {language_model: {mode: frozen}}}
  - {name: joint, steps: 8}
"""

# A script that dies by SIGKILL while writing the second checkpoint's resume state (after its weights,
# before its optimizer state), leaving a half-written checkpoint-6.tmp behind.
DIE_DURING_SAVE = """
import os, signal, sys
import vlmtune.train.resume as resume
from vlmtune.cli import main
original, seen = resume.save_file, []
def save_file(tensors, path, *args, **kwargs):
    if path.endswith("optimizer.safetensors"):
        seen.append(path)
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return original(tensors, path, *args, **kwargs)
resume.save_file = save_file
sys.exit(main(sys.argv[1:]))
"""


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


def _cmd(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vlmtune", "train", str(config), f"train.output_dir={out}", *extra]


def _logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line being written
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps


def _run_until(cmd: list[str], out: Path, step: int, sig: int) -> subprocess.CompletedProcess:
    """Starts the run, sends ``sig`` once it has logged ``step``, waits; fails if the run ended first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while max(_logged_steps(out), default=0) < step:
        assert proc.poll() is None, f"the run ended before step {step}:\n{proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "the run did not reach the step in time"
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _finish(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _max_rel_diff(a: Path, b: Path) -> float:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    return max(((x[k] - y[k]).abs().max() / x[k].abs().max().clamp(min=1e-12)).item() for k in x)


@pytest.fixture(scope="module")
def reference(base_dir, tmp_path_factory) -> Path:
    """The same run, never stopped."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "run"
    _finish(_cmd(_config(tmp), out, "train.save_total_limit=2"))
    return out


@pytest.mark.slow
def test_uninterrupted_run_keeps_the_newest_checkpoints_and_stage_folders(reference):
    names = sorted(p.name for p in reference.iterdir() if p.is_dir())
    assert names == ["align", "checkpoint-11", "checkpoint-14", "final", "joint"]  # save_total_limit=2
    state = json.loads((reference / "checkpoint-14" / "trainer_state" / "trainer.json").read_text())
    assert (state["stage_name"], state["stage_step"], state["global_step"]) == ("joint", 6, 14)


@pytest.mark.slow
def test_killed_and_stopped_runs_resume_to_the_same_weights(reference, tmp_path):
    config, out = _config(tmp_path), tmp_path / "run"
    # SIGKILL mid-stage 1: the newest complete checkpoint is checkpoint-3 (or -6).
    killed = _run_until(_cmd(config, out), out, 5, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL and not (out / "final").exists()
    # Resume, then SIGTERM in stage 2: a checkpoint at that step, a message saying how to resume.
    stopped = _run_until(_cmd(config, out, "--resume"), out, 10, signal.SIGTERM)
    assert "resuming from" in stopped.stdout and "checkpoint-" in stopped.stdout
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert "stopped by SIGTERM at stage 'joint'" in stopped.stderr and "--resume" in stopped.stderr
    at = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert (out / f"checkpoint-{at}" / "trainer_state" / "trainer.json").is_file()
    # Resume, then SIGKILL later in stage 2, then resume to the end.
    _run_until(_cmd(config, out, "--resume"), out, 14, signal.SIGKILL)
    done = _finish(_cmd(config, out, "--resume"))
    assert "stage 2/2, " in done.stdout
    assert _max_rel_diff(reference / "final", out / "final") <= 1e-5
    assert _max_rel_diff(reference / "align", out / "align") <= 1e-5
    # The metrics read as one run: each step logged once, in order.
    assert _logged_steps(out) == list(range(1, 17))


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_resumes_from_the_previous_one(reference, tmp_path):
    config, out = _config(tmp_path), tmp_path / "run"
    died = subprocess.run(
        [sys.executable, "-c", DIE_DURING_SAVE, "train", str(config), f"train.output_dir={out}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert died.returncode == -signal.SIGKILL
    assert (out / "checkpoint-6.tmp").is_dir() and not (out / "checkpoint-6").exists()
    done = _finish(_cmd(config, out, "--resume"))
    assert "removed the half-written checkpoint-6.tmp" in done.stdout
    assert f"resuming from {out / 'checkpoint-3'}" in done.stdout
    assert not (out / "checkpoint-6.tmp").exists()
    assert _max_rel_diff(reference / "final", out / "final") <= 1e-5


def test_resume_refuses_a_changed_config_naming_the_keys(reference, tmp_path, capsys):
    config = _config(tmp_path)
    rc = main(
        [
            "train",
            str(config),
            f"train.output_dir={reference}",
            "groups.projector.rank=4",
            "data.max_length=300",
            "train.logging_steps=5",
            "--resume",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "groups.projector.rank: 8 -> 4" in err and "data.max_length: 256 -> 300" in err
    assert "logging_steps" not in err and "--force-resume" in err


def test_resume_without_a_checkpoint_starts_afresh(base_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            str(_config(tmp_path)),
            f"train.output_dir={out}",
            "stages.0.steps=1",
            "stages.1.steps=1",
            "train.save_steps=null",
            "--resume",
        ]
    )
    assert rc == 0
    assert "no complete checkpoint" in capsys.readouterr().out
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_starting_afresh_removes_an_earlier_runs_checkpoints(base_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        str(_config(tmp_path)),
        f"train.output_dir={out}",
        "stages.0.steps=2",
        "stages.1.steps=1",
        "train.save_steps=1",
    ]
    assert main(args) == 0
    assert (out / "checkpoint-1").is_dir()
    assert main([*args[:-1], "train.save_steps=null"]) == 0
    assert "holds checkpoints of an earlier run" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["align", "final", "joint"]


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss_stops_naming_the_place_or_is_skipped_and_counted(base_dir, tmp_path, capsys, policy):
    out = tmp_path / "run"
    # A learning rate of 1e30 blows the weights up within a step or two.
    rc = main(
        [
            "train",
            str(_config(tmp_path)),
            f"train.output_dir={out}",
            "stages.0.steps=6",
            "stages.1.steps=1",
            "train.save_steps=1",
            "groups.projector.lr=1e30",
            f"train.on_nonfinite={policy}",
            "train.max_nonfinite_skips=2",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 3
    assert "non-finite" in captured.err and "stage 'align', step" in captured.err
    assert f"last good checkpoint: {out / 'checkpoint-'}" in captured.err
    if policy == "skip":
        assert "step skipped (1 of at most 2" in captured.out and "after 2 skipped steps" in captured.err
    # Nothing after the last good checkpoint: its step is the newest on disk.
    last = re.search(r"last good checkpoint: (\S+)", captured.err).group(1)
    newest = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert Path(last).name == f"checkpoint-{newest}" and not (out / "final").exists()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated-weights", "bad-trainer-json", "truncated-adapter"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(reference, tmp_path, capsys, damage):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns("final", "joint"))  # as if killed after step 14
    newest = out / "checkpoint-14"
    if damage == "truncated-weights":
        path = newest / "trainer_state" / "weights.safetensors"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "bad-trainer-json":
        (newest / "trainer_state" / "trainer.json").write_text("{not json", encoding="utf-8")
    else:
        path = newest / "adapter_model.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    assert main(["train", str(_config(tmp_path)), f"train.output_dir={out}", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"warning: {newest} is damaged (" in printed and "kept as checkpoint-14.damaged" in printed
    assert f"resuming from {out / 'checkpoint-11'}" in printed
    assert (out / "checkpoint-14.damaged").is_dir()  # kept, never deleted
    assert _max_rel_diff(reference / "final", out / "final") <= 1e-5
