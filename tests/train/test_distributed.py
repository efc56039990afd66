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


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(base_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    one, two = tmp_path / "one", tmp_path / "two"
    _run([str(config), f"train.output_dir={one}"], 1)
    done = _run([str(config), f"train.output_dir={two}", "train.batch_size=4"], 2)
    assert _max_rel_diff(one / "final", two / "final") <= 1e-4
    # One process writes: each step logged once, the loss is the mean over both processes' batches.
    assert len(_losses(two)) == 6 and _losses(two) == pytest.approx(_losses(one), rel=1e-4)
    assert done.stdout.count("wrote ") == 1


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
    assert _max_rel_diff(one / "final", two / "final") <= 1e-4


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
