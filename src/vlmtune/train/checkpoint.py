"""Checkpoint folders: written atomically (temporary folder, fsync, rename), recovered after a crash, pruned.

A checkpoint holds a peft adapter (or a full model when no group uses LoRA), the processor and the resolved
config, so it loads on its own; a resumable one also holds ``trainer_state/`` (see ``vlmtune.train.resume``).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from vlmtune.config.load import config_to_yaml
from vlmtune.config.schema import Config
from vlmtune.model.adapters import ADAPTER_WEIGHTS, adapter_folders, save_adapters
from vlmtune.paths import begin, commit

STEP_FOLDER = re.compile(r"^checkpoint-(\d+)$")


def write_model(
    model, processor, cfg: Config, folder: Path, state_dict: dict | None = None, initial: dict | None = None
) -> None:
    """The loadable part: ``adapter_config.json`` + ``adapter_model.safetensors`` for a PeftModel (LoRA weights
    and the fully-trained groups' modules_to_save; a run with one adapter per group has the others in sub-folders),
    ``config.json`` + ``model.safetensors`` for a plain model; the processor (tokenizer, chat template); and the
    run's resolved ``config.yaml``. ``state_dict``: weights gathered from processes that each hold a shard (FSDP,
    ZeRO-3), written instead of the local ones. ``initial``: PiSSA/OLoRA adapters' initial weights, to save those
    adapters converted for the original base (``vlmtune.model.adapters``)."""
    if hasattr(model, "peft_config"):
        save_adapters(model, folder, initial or {}, state_dict)
    elif state_dict is None:
        model.save_pretrained(folder, safe_serialization=True)
    else:
        model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    processor.save_pretrained(folder)
    (folder / "config.yaml").write_text(config_to_yaml(cfg), encoding="utf-8")


def save_checkpoint(
    model, processor, cfg: Config, out: Path, state_dict: dict | None = None, initial: dict | None = None
) -> Path:
    """Writes a loadable checkpoint folder atomically (no resume state)."""
    tmp = begin(out)
    write_model(model, processor, cfg, tmp, state_dict, initial)
    return commit(tmp, out)


def step_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """``checkpoint-STEP`` folders, oldest first."""
    found = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            m = STEP_FOLDER.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found)


def prune(run_dir: Path, keep: int | None) -> list[Path]:
    """Removes all but the newest ``keep`` checkpoint-STEP folders; returns the removed ones."""
    if not keep:
        return []
    removed = [p for _, p in step_folders(run_dir)[:-keep]]
    for p in removed:
        shutil.rmtree(p)
    return removed


def adapter_size(folder: Path) -> int:
    """Bytes of the weight files in a checkpoint folder (an adapter per group included)."""
    files = [*folder.glob("*.safetensors"), *(p / ADAPTER_WEIGHTS for p in adapter_folders(folder))]
    return sum(p.stat().st_size for p in files)
