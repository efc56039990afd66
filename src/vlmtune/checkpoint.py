"""Checkpoint folders: written atomically (temporary folder, fsync, rename), recovered after a crash, pruned.

A checkpoint holds a peft adapter (or a full model when no group uses LoRA), the processor and the resolved
config, so it loads on its own; a resumable one also holds ``trainer_state/`` (see ``vlmtune.resume``).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from vlmtune.config import Config, config_to_yaml

TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"
STEP_FOLDER = re.compile(r"^checkpoint-(\d+)$")


def begin(out: Path) -> Path:
    """An empty temporary folder beside ``out`` to write into (a leftover one is removed)."""
    tmp = out.with_name(out.name + TMP_SUFFIX)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, out: Path) -> Path:
    """Flushes every file of ``tmp`` to disk, then renames it to ``out``.

    An existing ``out`` is first renamed to ``out.old`` and removed after the swap, so at every instant
    either the previous or the new folder is complete under its own name (``recover`` handles a crash
    between the two renames).
    """
    for p in sorted(tmp.rglob("*")):
        _fsync(p)
    _fsync(tmp)
    old = out.with_name(out.name + OLD_SUFFIX)
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    tmp.rename(out)
    _fsync(out.parent)
    if old.exists():
        shutil.rmtree(old)
    return out


def write_model(model, processor, cfg: Config, folder: Path, state_dict: dict | None = None) -> None:
    """The loadable part: ``adapter_config.json`` + ``adapter_model.safetensors`` for a PeftModel (LoRA weights
    and the fully-trained groups' modules_to_save), ``config.json`` + ``model.safetensors`` for a plain model;
    the processor (tokenizer, chat template); and the run's resolved ``config.yaml``. ``state_dict``: weights
    gathered from processes that each hold a shard (FSDP, ZeRO-3), written instead of the local ones."""
    if state_dict is None:
        model.save_pretrained(folder, safe_serialization=True)
    else:
        model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    processor.save_pretrained(folder)
    (folder / "config.yaml").write_text(config_to_yaml(cfg), encoding="utf-8")


def save_checkpoint(model, processor, cfg: Config, out: Path, state_dict: dict | None = None) -> Path:
    """Writes a loadable checkpoint folder atomically (no resume state)."""
    tmp = begin(out)
    write_model(model, processor, cfg, tmp, state_dict)
    return commit(tmp, out)


def recover(run_dir: Path) -> list[str]:
    """Cleans up after a crash during a save: half-written ``*.tmp`` folders are removed; an ``X.old`` whose
    ``X`` is missing (a crash between the two renames of ``commit``) is put back. Returns what it did."""
    done = []
    if not run_dir.is_dir():
        return done
    for p in sorted(run_dir.iterdir()):
        if p.is_dir() and p.name.endswith(TMP_SUFFIX):
            shutil.rmtree(p)
            done.append(f"removed the half-written {p.name} (a save was interrupted)")
        elif p.is_dir() and p.name.endswith(OLD_SUFFIX):
            target = p.with_name(p.name[: -len(OLD_SUFFIX)])
            if target.exists():
                shutil.rmtree(p)
            else:
                p.rename(target)
                done.append(f"restored {target.name} from {p.name} (a save was interrupted)")
    return done


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
    """Bytes of the weight files in a checkpoint folder."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
