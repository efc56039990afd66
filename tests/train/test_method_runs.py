"""DPO and GRPO runs through the real CLI: resumed after SIGKILL they end where an uninterrupted run ends, and two
processes match one with the same global batch."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.train.test_distributed import STEP_RTOL, WEIGHTS_RTOL, _run
from tests.train.test_resume import _cmd, _finish, _logged_steps, _run_until

# SFT then DPO on colour pairs: the DPO stage's reference is the SFT stage's result (kept in resume state with the
# cached reference log-probabilities); a checkpoint every 3 steps, killed inside the DPO stage.
SFT_DPO = """
model: {path: builtin:tiny-qwen2-vl}
groups:
  projector: {mode: lora, rank: 8, dropout: 0.1, lr: 3.0e-3}
  language_model: {mode: lora, rank: 8, targets: attention, lr: 1.0e-3}
data: {train: builtin:shapes:color-pairs, max_length: 256, builtin_train_samples: 16}
train: {batch_size: 4, logging_steps: 1, save_steps: 3, warmup_steps: 1, seed: 5, progress_bar: false}
stages:
  - {name: sft, steps: 4}
  - {name: dpo, method: dpo, steps: 8, dpo: {beta: 0.2}}
"""

# GRPO with two optimizer steps per batch of rollouts (num_iterations 2): the checkpoint at step 3 falls between
# the two passes over a batch's rollouts, so the resumed run must reuse the saved ones.
GRPO = """
model: {path: builtin:tiny-qwen2-vl}
groups:
  projector: {mode: lora, rank: 8, lr: 3.0e-3}
  language_model: {mode: lora, rank: 8, targets: attention, lr: 1.0e-3}
data: {train: builtin:shapes:shape, max_length: 256, builtin_train_samples: 16}
train:
  method: grpo
  grpo: {group_size: 4, max_new_tokens: 4, num_iterations: 2, beta: 0.04}
  max_steps: 6
  batch_size: 4
  logging_steps: 1
  save_steps: 3
  seed: 9
  progress_bar: false
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _adapters(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "adapter_model.safetensors")


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.slow
@pytest.mark.parametrize("config, kill_at", [(SFT_DPO, 8), (GRPO, 4)], ids=["sft-dpo", "grpo"])
def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(base_dir, tmp_path, config, kill_at):
    path = _write(tmp_path, config)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    _finish(_cmd(path, whole))
    died = _run_until(_cmd(path, killed), killed, kill_at, signal.SIGKILL)
    assert died.returncode == -signal.SIGKILL and not (killed / "final").exists()
    newest = max(killed.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert (newest / "trainer_state" / "objective-0.safetensors").is_file(), "the method's state is saved"
    done = _finish(_cmd(path, killed, "--resume"))
    assert "resuming from" in done.stdout
    a, b = _adapters(whole), _adapters(killed)
    assert a.keys() == b.keys()
    for key in a:  # CPU, fp32, the same operations in the same order: equal to the bit
        assert torch.equal(a[key], b[key]), key
    assert _logged_steps(killed) == _logged_steps(whole)
    if "grpo" in config:  # the same completions were drawn: the same rewards at every step
        assert [r["reward"] for r in _records(killed)] == [r["reward"] for r in _records(whole)]


DPO_TWO = """
model: {path: builtin:tiny-qwen2-vl}
groups:
  projector: {mode: lora, rank: 8, lr: 3.0e-3}
  language_model: {mode: lora, rank: 8, targets: attention, lr: 1.0e-3}
data: {train: builtin:shapes:color-pairs, max_length: 256, builtin_train_samples: 32}
train: {method: dpo, max_steps: 5, batch_size: 8, logging_steps: 1, seed: 3, progress_bar: false}
"""


def _grpo_two() -> str:
    """The GRPO run above with one pass over each batch of rollouts, 4 steps and no checkpoints."""
    cfg = yaml.safe_load(GRPO)
    cfg["train"]["grpo"].pop("num_iterations")
    cfg["train"].update(max_steps=4, seed=3)
    cfg["train"].pop("save_steps")
    return yaml.safe_dump(cfg)


GRPO_TWO = _grpo_two()


def _same_steps(one: Path, two: Path, keys: tuple[str, ...]) -> None:
    a, b = _records(one), _records(two)
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b), start=1):
        for key in [k for k in x if k in keys or k.startswith("grad_norm/")]:
            assert y[key] == pytest.approx(x[key], rel=STEP_RTOL, abs=1e-7), f"step {i}: {key}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, keys",
    [(DPO_TWO, ("loss", "rewards/margin")), (GRPO_TWO, ("loss", "reward", "completion_length"))],
    ids=["dpo", "grpo"],
)
def test_two_processes_equal_one_with_the_same_global_batch(base_dir, tmp_path, config, keys):
    # Two processes each take half of every batch. DPO's loss is a mean over pairs and GRPO's a mean over
    # completions, weighted by each process's share; GRPO's completions are drawn per completion from its own seed,
    # so both process counts draw the same ones. Tolerances as in test_distributed (float summation order only).
    path = _write(tmp_path, config)
    one, two = tmp_path / "one", tmp_path / "two"
    _run([str(path), f"train.output_dir={one}"], 1)
    half = 4 if "dpo" in config else 2
    _run([str(path), f"train.output_dir={two}", f"train.batch_size={half}"], 2)
    _same_steps(one, two, keys)
    x, y = _adapters(one), _adapters(two)
    for key in x:
        assert ((x[key] - y[key]).abs().max() / x[key].abs().max().clamp(min=1e-12)).item() <= WEIGHTS_RTOL, key


def test_kto_trains_labelled_answers_end_to_end(base_dir, tmp_path):
    path = _write(
        tmp_path,
        """
model: {path: builtin:tiny-qwen2-vl}
groups:
  projector: {mode: lora, rank: 8, lr: 3.0e-3}
  language_model: {mode: lora, rank: 8, targets: attention, lr: 1.0e-3}
data: {train: builtin:shapes:color-kto, eval: builtin:shapes:color-kto, max_length: 256, builtin_train_samples: 32,
       builtin_eval_samples: 16}
eval: {samples: 8, alignment: false}
train: {method: kto, max_steps: 6, batch_size: 8, logging_steps: 2, eval_steps: 3, seed: 1, progress_bar: false}
""",
    )
    out = tmp_path / "run"
    _finish(_cmd(path, out))
    records = _records(out)
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all({"kl", "rewards/desirable", "rewards/undesirable"} <= r.keys() for r in records)
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval_loss"' in x]
    assert evals[0]["eval_loss"] == pytest.approx(0.5, abs=1e-6)  # policy = reference, z0 = 0: 1 - sigmoid(0)
    assert "eval/rewards/accuracy" in evals[-1] and (out / "final" / "adapter_model.safetensors").is_file()
