"""Multi-process training on CPU: torchrun starts two processes, accelerate joins them in a gloo group.

The same global batch split over two processes must give the weights one process gives, including when one
process's batch has no image at all (it never runs the vision path; other tools hang there).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import write_jsonl

CONFIG = """
model: {path: builtin:tiny-qwen2-vl}
groups:
  projector: {mode: lora, rank: 8, lr: 3.0e-3}
  language_model: {mode: lora, rank: 8, targets: attention, lr: 1.0e-3}
data: {train: builtin:shapes:color, max_length: 256, builtin_train_samples: 32}
train: {max_steps: 6, batch_size: 8, logging_steps: 1, seed: 3, progress_bar: false}
"""


def _run(args: list[str], processes: int, timeout: int = 300) -> subprocess.CompletedProcess:
    """``vlmtune train`` in one process, or under torchrun with several; a hang fails the test (and is killed)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd = [*(launcher if processes > 1 else [sys.executable]), "-m", "vlmtune", "train", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{processes}-process run did not finish in {timeout} s (hung?)")
    assert proc.returncode == 0, err[-4000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _max_rel_diff(a: Path, b: Path) -> float:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    return max(((x[k] - y[k]).abs().max() / x[k].abs().max().clamp(min=1e-12)).item() for k in x)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def _steps(run: Path) -> list[dict]:
    """Per optimizer step: the logged loss and each group's gradient norm (taken before the optimizer step)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    return [{k: v for k, v in r.items() if k == "loss" or k.startswith("grad_norm/")} for r in records]


# What must agree between one process and two with the same global batch, step by step: the gradient of every
# group (its norm, logged before the optimizer step) and the loss (the mean over every answer token). A process
# weighted wrongly (e.g. one whose batch has no image, or fewer answer tokens) changes them by the ratio of the
# processes' answer tokens, 2x or more in these data. Float summation order (thread counts, BLAS kernels, one
# padded batch against two unpadded ones) moves them by about 1e-6 here; 1e-3 leaves a wide margin for other
# machines. The final weights are compared loosely only: Adam divides each element's step by the running RMS of
# its gradient, so float-order noise in gradients near Adam's eps becomes a visible difference in small LoRA B
# entries (measured here: 3.6e-5 relative between two one-process runs that differ only in their thread count, the
# same as one process against two; 1e-2 on another machine), which says nothing about the weighting.
STEP_RTOL = 1e-3
WEIGHTS_RTOL = 5e-2


def _assert_same_steps(one: Path, two: Path, steps: int) -> None:
    a, b = _steps(one), _steps(two)
    assert len(a) == len(b) == steps
    for i, (x, y) in enumerate(zip(a, b), start=1):
        assert x.keys() == y.keys(), i
        for key in x:
            assert y[key] == pytest.approx(x[key], rel=STEP_RTOL, abs=1e-9), f"step {i}: {key}"


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(base_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    one, two = tmp_path / "one", tmp_path / "two"
    _run([str(config), f"train.output_dir={one}"], 1)
    done = _run([str(config), f"train.output_dir={two}", "train.batch_size=4"], 2)
    # One process writes: each step logged once, the loss is the mean over both processes' batches.
    _assert_same_steps(one, two, 6)
    assert _max_rel_diff(one / "final", two / "final") <= WEIGHTS_RTOL
    assert done.stdout.count("wrote ") == 2  # loss.png and report.html, by the main process only
    assert done.stdout.count(f"wrote {two / 'report.html'}") == 1


@pytest.mark.slow
def test_a_process_whose_batch_has_no_image_does_not_hang(base_dir, shapes_dir, tmp_path):
    # 2 samples with an image, 10 text-only: with one sample per process, most steps give one process
    # (and some steps both) a batch without any image.
    with_image = [json.loads(line) for line in (shapes_dir / "train.jsonl").read_text().splitlines()[:2]]
    for record in with_image:
        record["images"] = [str(shapes_dir / p) for p in record["images"]]
    text_only = [
        {"messages": [{"role": "user", "content": f"Say the number {i}."}, {"role": "assistant", "content": f"{i}"}]}
        for i in range(10)
    ]
    data = write_jsonl(tmp_path / "mixed.jsonl", with_image + text_only)
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.replace("builtin:shapes:color", str(data)), encoding="utf-8")
    one, two = tmp_path / "one", tmp_path / "two"
    _run([str(config), f"train.output_dir={one}", "train.batch_size=2", "train.max_steps=8"], 1)
    _run([str(config), f"train.output_dir={two}", "train.batch_size=1", "train.max_steps=8"], 2)
    steps = _steps(one)
    # The data make the case: steps where no process has an image (no projector gradient at all), and steps where
    # one process has an image and the other has not, with answers of different lengths.
    projector = [s.get("grad_norm/projector", 0.0) for s in steps]  # not logged where no process ran the projector
    assert 0.0 in projector and any(g > 0 for g in projector)
    _assert_same_steps(one, two, 8)
    assert _max_rel_diff(one / "final", two / "final") <= WEIGHTS_RTOL


@pytest.mark.parametrize(
    "name, kind",
    [
        ("ddp", "MULTI_GPU"),
        ("fsdp", "FSDP"),
        ("deepspeed_zero2", "DEEPSPEED"),
        ("deepspeed_zero3", "DEEPSPEED"),
        ("multi_node", "MULTI_GPU"),
    ],
)
def test_example_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(Path(__file__).parents[2] / "examples" / "accelerate" / f"{name}.yaml"))
    assert str(cfg.distributed_type).endswith(kind)
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == int(name[-1])


def _lazy_data(shapes_dir: Path, tmp_path: Path) -> Path:
    """12 good samples, a line that is not JSON (line 5) and a sample whose image is missing (line 10)."""
    records = [json.loads(line) for line in (shapes_dir / "train.jsonl").read_text().splitlines()[:12]]
    lines = []
    for record in records:
        record["images"] = [str(shapes_dir / p) for p in record["images"]]
        lines.append(json.dumps(record))
    lines.insert(4, "{not json")
    missing = dict(records[0], images=[str(tmp_path / "nope.png")])
    lines.insert(9, json.dumps(missing))
    path = tmp_path / "lazy.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.slow
def test_two_processes_reading_lazily_skip_and_count_bad_samples_once(base_dir, shapes_dir, tmp_path):
    data = _lazy_data(shapes_dir, tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.replace("builtin:shapes:color", str(data)), encoding="utf-8")
    two = tmp_path / "two"
    done = _run(
        [str(config), f"train.output_dir={two}", "data.load=lazy", "data.on_bad_sample=skip", "train.batch_size=2"],
        2,
    )
    # one epoch of 14 records at a global batch of 4: every record read once, by one process or the other
    report = json.loads((two / "data_report.json").read_text())["train"]
    assert report["skipped_by_kind"] == {"bad JSON": 1, "image missing": 1}, report
    assert report["kept"] == 12, report
    # each named once as it is found (by the main process, whichever process read it), then counted at the end
    for line in (5, 10):
        assert done.stdout.count(f"skipped (data.on_bad_sample: skip) {data}:{line}:") == 1, done.stdout
    assert "2 bad sample(s) skipped (data.on_bad_sample: skip): bad JSON 1, image missing 1" in done.stdout


@pytest.mark.slow
def test_a_bad_sample_read_by_one_process_stops_both_naming_its_line(base_dir, shapes_dir, tmp_path):
    data = _lazy_data(shapes_dir, tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.replace("builtin:shapes:color", str(data)), encoding="utf-8")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [*launcher, "-m", "vlmtune", "train", str(config), f"train.output_dir={tmp_path / 'run'}"]
    cmd += ["data.load=lazy", "train.batch_size=2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("a bad sample on one process left the other waiting (hung)")
    assert proc.returncode != 0
    assert f"{data}:5" in out + err or f"{data}:10" in out + err, (out + err)[-3000:]
