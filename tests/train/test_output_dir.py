"""The run folder: nothing of an earlier run is removed before the new run is known to be valid, and one run at a
time uses a folder. Runs go through the real CLI on the builtin base."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from vlmtune.cli import main
from vlmtune.paths import LOCK_NAME
from vlmtune.train.output_dir import BUSY_EXIT

CONFIG = """
model: {path: builtin:tiny-qwen2-vl}
data: {train: builtin:shapes:color, max_length: 256, builtin_train_samples: 8}
train: {batch_size: 4, logging_steps: 1, seed: 1, progress_bar: false}
stages:
  - {name: align, steps: 1, groups: {language_model: {mode: frozen}}}
  - {name: joint, steps: 1}
"""


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def earlier_run(base_dir, tmp_path) -> tuple[Path, Path]:
    """A finished run (stage folders, a checkpoint, final/, metrics) in tmp_path/run, and its config."""
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", str(config), f"train.output_dir={out}", "train.save_steps=1", "stages.0.steps=2"]) == 0
    assert (out / "checkpoint-1").is_dir() and (out / "final").is_dir()
    return config, out


@pytest.mark.slow
@pytest.mark.parametrize(
    "why, overrides, message",
    [
        ("bad data file", ["data.train=MISSING.jsonl"], "MISSING.jsonl"),
        ("bad data in the second stage only", ["stages.1.data.train=MISSING2.jsonl"], "MISSING2.jsonl"),
        ("every sample too long", ["data.max_length=8"], "over data.max_length=8"),
        ("a plan that matches nothing", ["groups.projector.targets=[nope]"], "nope"),
    ],
)
def test_a_fresh_start_that_fails_before_training_leaves_the_earlier_run_as_it_was(
    earlier_run, capsys, why, overrides, message
):
    config, out = earlier_run
    before = _snapshot(out)
    rc = main(["train", str(config), f"train.output_dir={out}", *overrides])
    captured = capsys.readouterr()
    assert rc != 0, why
    assert message in captured.err + captured.out, why
    assert "holds checkpoints of an earlier run" not in captured.out
    assert _snapshot(out) == before, why  # not one file removed or rewritten


def test_a_stage_whose_every_sample_was_skipped_says_so(base_dir, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 3)
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    rc = main(
        ["train", str(config), f"train.output_dir={tmp_path / 'out'}", f"data.train={bad}", "data.on_bad_sample=skip"]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "stage 'align' no training sample left: 3 sample(s) skipped as bad" in err
    assert "max_length" not in err


HOLD = """
import sys, time
from accelerate import Accelerator
from vlmtune.train.output_dir import OutputLock
with OutputLock(__import__("pathlib").Path(sys.argv[1]), Accelerator(cpu=True)):
    print("holding", flush=True)
    time.sleep(120)
"""


def test_a_second_run_in_a_busy_folder_is_refused_naming_the_running_pid(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        (out / "final").mkdir()
        (out / "final" / "keep.txt").write_text("the first run's", encoding="utf-8")
        before = _snapshot(out)
        config = tmp_path / "run.yaml"
        config.write_text(CONFIG, encoding="utf-8")
        rc = main(["train", str(config), f"train.output_dir={out}"])
        err = capsys.readouterr().err
        assert rc == BUSY_EXIT
        assert f"is in use by another vlmtune run (PID {holder.pid} on {socket.gethostname()}" in err
        assert _snapshot(out) == before  # the running job's folder is not touched
        assert holder.poll() is None  # nor the job
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_process_that_is_gone_is_taken_over(base_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = {"pid": gone.pid, "host": socket.gethostname(), "start": None, "since": 0}
    (out / LOCK_NAME).write_text(json.dumps(lock), encoding="utf-8")
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    assert main(["train", str(config), f"train.output_dir={out}"]) == 0
    assert f"taking over the lock of a run that is gone ({lock}" in capsys.readouterr().out
    assert not (out / LOCK_NAME).exists()  # released at the end
    assert os.path.isdir(out / "final")


@pytest.mark.slow
def test_a_full_disk_during_a_save_leaves_nothing_half_written_and_names_the_last_good_checkpoint(
    base_dir, tmp_path, capsys, monkeypatch
):
    import errno

    import vlmtune.train.resume as resume

    config = tmp_path / "run.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    out = tmp_path / "run"
    args = ["train", str(config), f"train.output_dir={out}", "stages.0.steps=3", "train.save_steps=1"]
    original, calls = resume.save_file, []

    def disk_fills_up(tensors, path, *rest, **kwargs):  # the second checkpoint's optimizer state finds no space
        calls.append(path)
        if path.endswith("optimizer.safetensors") and sum(p.endswith("optimizer.safetensors") for p in calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return original(tensors, path, *rest, **kwargs)

    monkeypatch.setattr(resume, "save_file", disk_fills_up)
    assert main(args) == 6
    err = capsys.readouterr().err
    assert f"could not write {out / 'checkpoint-2'}: No space left on device" in err
    assert f"Last good checkpoint: {out / 'checkpoint-1'}" in err and "--resume" in err
    assert not list(out.glob("*.tmp")) and not (out / "checkpoint-2").exists()
    assert resume.damage(out / "checkpoint-1") is None
    monkeypatch.setattr(resume, "save_file", original)  # space again: the run resumes and finishes
    assert main([*args, "--resume"]) == 0
    assert (out / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("fault", ["file-in-place", "read-only-file-system"])
def test_an_output_dir_that_cannot_be_written_is_a_config_error(tmp_path, capsys, monkeypatch, fault):
    import errno

    config = tmp_path / "run.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    if fault == "file-in-place":
        (tmp_path / "taken").write_text("a file where the run folder's parent should be", encoding="utf-8")
        out, reason = tmp_path / "taken" / "run", "Not a directory"
    else:  # root ignores permission bits, so a read-only mount is simulated at the write
        out, reason = tmp_path / "run", "Read-only file system"
        real = Path.write_text

        def read_only(self, *args, **kwargs):
            if self.parent == out:
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", read_only)
    assert main(["train", str(config), f"train.output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert f"'train.output_dir': cannot write into '{out}': {reason}" in err and "Traceback" not in err
