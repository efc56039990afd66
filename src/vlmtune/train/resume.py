"""Resume state in safetensors and JSON (never pickles): where the run is, trainable weights, optimizer,
scheduler and RNG states, written into a checkpoint's ``trainer_state/`` folder.

A resumed run continues exactly where the checkpoint was taken: same stage, step, data position and
random streams, so its final weights equal those of a run that was never stopped.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from vlmtune.config.errors import ConfigError

STATE_DIR = "trainer_state"
DAMAGED = ".damaged"  # the suffix of a checkpoint a resume found damaged and set aside

# Config keys whose change makes a checkpoint's weights or data position meaningless for the new run.
MATTERS = ("model", "groups", "data", "stages", "train.seed", "train.batch_size", "train.grad_accum")


@dataclass
class Progress:
    """Where a run is. Saved as ``trainer_state/trainer.json``."""

    stage_index: int = 0  # the stage to run next (or being run)
    stage_name: str = ""
    stage_step: int = 0  # optimizer steps done in that stage
    global_step: int = 0  # optimizer steps done in the run, all stages together
    epoch: int = 0  # epoch of the stage's data being read
    batch_in_epoch: int = 0  # micro-batches of that epoch already consumed (per process)
    nonfinite_skips: int = 0
    metrics_lines: int = 0  # lines of metrics.jsonl written up to this point
    stage_start_step: dict[str, int] = field(default_factory=dict)  # global step at which each stage began


@dataclass
class TrainerState:
    """What ``read_state`` returns."""

    folder: Path
    progress: Progress
    weights: dict[str, torch.Tensor]
    optimizer: dict | None
    scheduler: dict | None
    rng_file: Path | None
    objective: tuple[dict[str, torch.Tensor], dict] | None = None  # this process's objective state, if any


def _optimizer_to_files(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"scalars": {}, "param_groups": state["param_groups"]}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                meta["scalars"][f"{idx}.{key}"] = value
    return tensors, meta


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """torch (CPU and CUDA), Python and NumPy random states as tensors + JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    version, internal, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(internal), gauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def write_rng(folder: Path, rank: int) -> None:
    """This process's RNG states (every process writes its own)."""
    state = folder / STATE_DIR
    state.mkdir(exist_ok=True)
    tensors, meta = rng_state()
    save_file(tensors, str(state / f"rng-{rank}.safetensors"), metadata={"meta": json.dumps(meta)})


def write_objective(folder: Path, rank: int, state: tuple[dict[str, torch.Tensor], dict]) -> None:
    """This process's objective state (a reference's starting weights, cached reference log-probabilities,
    buffered rollouts), when it has any."""
    tensors, meta = state
    if not tensors and not meta:
        return
    out = folder / STATE_DIR
    out.mkdir(exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
        str(out / f"objective-{rank}.safetensors"),
        metadata={k: str(v) for k, v in meta.items()},
    )


def _read_objective(path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return load_file(str(path)), meta


def restore_rng(path: Path | None) -> None:
    if path is None or not path.is_file():
        return
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    set_rng_state(load_file(str(path)), meta)


def write_state(
    folder: Path, progress: Progress, weights: dict[str, torch.Tensor], optimizer=None, scheduler=None
) -> None:
    """The main process's part of the resume state; ``trainer.json`` is written last."""
    state = folder / STATE_DIR
    state.mkdir(exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(state / "weights.safetensors"))
    if optimizer is not None:
        tensors, meta = _optimizer_to_files(optimizer.state_dict())
        save_file(tensors, str(state / "optimizer.safetensors"))
        (state / "optimizer.json").write_text(json.dumps(meta), encoding="utf-8")
    if scheduler is not None:
        (state / "scheduler.json").write_text(json.dumps(scheduler.state_dict()), encoding="utf-8")
    (state / "trainer.json").write_text(json.dumps(asdict(progress), indent=1), encoding="utf-8")


def read_state(folder: Path, rank: int = 0) -> TrainerState:
    """Reads ``folder/trainer_state``; errors name the missing file."""
    state = folder / STATE_DIR
    for name in ("trainer.json", "weights.safetensors"):
        if not (state / name).is_file():
            raise FileNotFoundError(f"{folder}: not a resumable checkpoint, {STATE_DIR}/{name} is missing")
    progress = Progress(**json.loads((state / "trainer.json").read_text(encoding="utf-8")))
    optimizer = None
    if (state / "optimizer.safetensors").is_file():
        meta = json.loads((state / "optimizer.json").read_text(encoding="utf-8"))
        optimizer = _optimizer_from_files(load_file(str(state / "optimizer.safetensors")), meta)
    scheduler = None
    if (state / "scheduler.json").is_file():
        scheduler = json.loads((state / "scheduler.json").read_text(encoding="utf-8"))
    rng = state / f"rng-{rank}.safetensors"
    return TrainerState(
        folder,
        progress,
        load_file(str(state / "weights.safetensors")),
        optimizer,
        scheduler,
        rng if rng.is_file() else None,
        _read_objective(state / f"objective-{rank}.safetensors"),
    )


def progress_key(folder: Path) -> tuple | None:
    """How far into the run a checkpoint is (run step, stage, stage boundary), or None when its trainer.json is
    missing or unreadable."""
    try:
        pr = json.loads((folder / STATE_DIR / "trainer.json").read_text(encoding="utf-8"))
        return (pr["global_step"], pr["stage_index"], pr["stage_step"] == 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resumable(run_dir: Path) -> list[Path]:
    """Resumable checkpoints (checkpoint-STEP or stage folders with resume state), furthest first; those whose
    progress cannot be read come last."""
    found = []
    if not run_dir.is_dir():
        return []
    for p in run_dir.iterdir():
        if not p.is_dir() or not (p / STATE_DIR).is_dir() or DAMAGED in p.name:
            continue
        found.append((progress_key(p) or (-1, -1, False), p))
    return [p for _, p in sorted(found, key=lambda kp: kp[0], reverse=True)]


def latest(run_dir: Path) -> Path | None:
    """The resumable checkpoint furthest into the run, or None."""
    found = resumable(run_dir)
    return found[0] if found else None


def damage(folder: Path) -> str | None:
    """What is wrong with a resumable checkpoint's files (the first damaged one, named), or None when every file a
    resume reads opens and parses: the weights, the resume state, every process's RNG state and the config."""
    from safetensors import SafetensorError

    state = folder / STATE_DIR
    weights = [folder / n for n in ("adapter_model.safetensors", "model.safetensors") if (folder / n).is_file()]
    tensors = [*weights, *sorted(state.glob("*.safetensors"))]
    try:
        for name in ("trainer.json", "weights.safetensors"):
            if not (state / name).is_file():
                return f"{STATE_DIR}/{name} is missing"
        Progress(**json.loads((state / "trainer.json").read_text(encoding="utf-8")))
        for name in ("optimizer.json", "scheduler.json"):
            if (state / name).is_file():
                json.loads((state / name).read_text(encoding="utf-8"))
        yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError, yaml.YAMLError) as e:
        return f"{type(e).__name__}: {e}"
    for path in tensors:
        try:
            load_file(str(path))
        except (OSError, SafetensorError, ValueError) as e:
            return f"{path.relative_to(folder)}: {type(e).__name__}: {e}"
    return None


def _flatten(node, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    if isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
        out = {}
        for i, v in enumerate(node):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: node}


def config_changes(saved_yaml: Path, current: dict) -> list[str]:
    """Keys that matter for resuming (model, groups, data, stages, seed, batch) whose values differ, as
    'key: old -> new' lines."""
    old = _flatten(yaml.safe_load(saved_yaml.read_text(encoding="utf-8")) or {})
    new = _flatten(json.loads(json.dumps(current)))
    changes = []
    for key in sorted(set(old) | set(new)):
        if not any(key == m or key.startswith(m + ".") for m in MATTERS):
            continue
        if old.get(key) != new.get(key):
            changes.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return changes


def load_trainable(model, state: TrainerState, run_params: set[str]) -> None:
    """Copies a checkpoint's trainable weights into the model; they must be exactly the plan's."""
    missing, unexpected = run_params - set(state.weights), set(state.weights) - run_params
    if missing or unexpected:
        raise ConfigError(
            [
                f"{state.folder}: its trainable weights do not match this config's plan "
                f"(missing: {sorted(missing)[:5]}, unexpected: {sorted(unexpected)[:5]})"
            ],
            "resume",
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.weights.items():
            params[name].copy_(value)
