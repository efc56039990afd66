"""The two sides of the benchmark as child processes: vlmtune's train command and the plain reference loop,
and the data orders and per-epoch figures both are compared on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from vlmtune.bench.setup import Preset, vlmtune_config
from vlmtune.commands.train import run_training
from vlmtune.config.load import load_config
from vlmtune.data.sampler import EpochSampler
from vlmtune.tracking import echo

SIDES = ("vlmtune", "reference")


_TRAINER = "import sys; from vlmtune.bench.runs import trainer_child; sys.exit(trainer_child(sys.argv[1:]))"


def trainer_child(argv: list[str]) -> int:
    """``vlmtune train CONFIG`` in this process (the train command's recipe), then its peak GPU memory written to
    ``argv[1]``."""
    run_training(load_config(argv[0], [], echo=echo))
    rc = 0
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    Path(argv[1]).write_text(json.dumps({"rc": rc, "cuda_peak_bytes": peak}), encoding="utf-8")
    return rc


def spawn(cmd: list[str], log: Path) -> tuple[float, int]:
    """Runs a child with its output in ``log``; returns (wall seconds, peak RSS bytes) or raises with the log's end."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as f:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"benchmark child failed (exit {child.returncode}): {' '.join(cmd)}\n{tail}")
    return wall, usage.ru_maxrss * 1024  # Linux reports KiB


def adapter_modules(path: Path) -> list[str]:
    """Names of the modules a saved peft adapter holds LoRA weights for (its adapter_config.json may shorten them)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sorted(
            {k.removeprefix("base_model.model.").rsplit(".lora_A.", 1)[0] for k in f.keys() if ".lora_A." in k}
        )


def run_vlmtune(
    preset: Preset,
    model: Path,
    data: Path,
    steps: int,
    folder: Path,
    timed: bool = False,
    overrides: tuple[str, ...] = (),
) -> dict:
    """One vlmtune run in a child process (``timed``: with the phase timers of ``vlmtune.bench.profile``;
    ``overrides``: ``key.path=value`` changes to its config)."""
    folder.mkdir(parents=True)
    config = folder / "config.yaml"
    config.write_text(
        yaml.safe_dump(vlmtune_config(preset, model, data, folder / "run", steps, overrides)), encoding="utf-8"
    )
    start = [sys.executable, "-m", "vlmtune.bench.profile", "vlmtune"] if timed else [sys.executable, "-c", _TRAINER]
    wall, rss = spawn(start + [str(config), str(folder / "child.json")], folder / "log.txt")
    records = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    steps_done = [r for r in records if "loss" in r]
    child = json.loads((folder / "child.json").read_text())
    return {
        "step_s": [preset.batch_size / r["samples_per_s"] for r in steps_done],
        "loss": [r["loss"] for r in steps_done],
        "counts": [{"tokens": r["tokens"], "label_tokens": r["answer_tokens"]} for r in steps_done],
        "lora_modules": adapter_modules(folder / "run" / "final" / "adapter_model.safetensors"),
        "wall_s": wall,
        "peak_rss_bytes": rss,
        "cuda_peak_bytes": child.get("cuda_peak_bytes"),
        "folder": str(folder),
    }


def run_reference(
    preset: Preset, model: Path, data: Path, order: list[int], steps: int, folder: Path, timed: bool = False
) -> dict:
    """One reference run in a child process (``timed``: with the phase timers of ``vlmtune.bench.profile``)."""
    folder.mkdir(parents=True)
    spec = {
        "model": str(model),
        "data": str(data),
        "order": order,
        "steps": steps,
        "batch_size": preset.batch_size,
        "dtype": preset.dtype,
        "lr": preset.learning_rate,
        "rank": preset.lora_rank,
        "alpha": preset.lora_alpha,
        "seed": preset.seed,
        "out": str(folder / "result.json"),
    }
    (folder / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    start = (
        [sys.executable, "-m", "vlmtune.bench.profile", "reference"]
        if timed
        else [sys.executable, "-m", "vlmtune.bench.reference"]
    )
    wall, rss = spawn(start + [str(folder / "spec.json")], folder / "log.txt")
    result = json.loads((folder / "result.json").read_text())
    return {
        "step_s": [s["s"] for s in result["steps"]],
        "loss": [s["loss"] for s in result["steps"]],
        "counts": [{k: s[k] for k in ("tokens", "image_tokens", "label_tokens")} for s in result["steps"]],
        "lora_modules": result["lora_modules"],
        "wall_s": wall,
        "peak_rss_bytes": rss,
        "cuda_peak_bytes": result["cuda_peak_bytes"],
        "folder": str(folder),
    }


def epoch_orders(samples: int, seed: int, epochs: int) -> list[int]:
    """The plain shuffled order of every epoch, one after the other (the reference's order; vlmtune's trainer
    draws the same permutations before grouping them by length)."""
    sampler = EpochSampler(samples, seed)
    order = []
    for e in range(epochs):
        sampler.set_epoch(e)
        order += sampler.order()
    return order


def last_epoch(run: dict, steps: int) -> list[float]:
    return run["step_s"][-steps:]
