"""Where vlmtune keeps things on disk, and writing a folder atomically (temporary folder, fsync, rename).

Every command that writes a folder (checkpoints, exports) goes through ``begin`` / ``commit``, so a crash
leaves either the previous folder or the new one complete under its name, never a half-written one;
``recover`` tidies what a crash between the steps left behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

LOCK_NAME = ".vlmtune.lock"
"""The lock file of a run folder (vlmtune.train.output_dir): the PID and host of the run using it."""
TMP_SUFFIX = ".tmp"


OLD_SUFFIX = ".old"
PLAN_FILE = "plan.json"
"""Each stage's plan table (group, mode, modules, LoRA settings, parameters, rate) in a run folder."""
GALLERY_FILE = "gallery.jsonl"
"""The first eval samples of a run with the answers generated before training and after each stage."""
REPORT_FILE = "report.html"
"""The run report (``vlmtune report``), written at the end of every run."""


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


def write_atomic(path: Path, text: str) -> Path:
    """Writes ``text`` to a temporary file beside ``path``, then renames it over ``path``: a reader sees the old
    file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


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


def cache_dir() -> Path:
    """Where generated data and the builtin model are kept (``VLMTUNE_CACHE``, else ~/.cache/vlmtune)."""
    return Path(os.environ.get("VLMTUNE_CACHE", Path.home() / ".cache" / "vlmtune"))


def is_run_folder(folder: Path) -> bool:
    """A folder ``vlmtune train`` writes into: it has the run's metrics log or its lock file."""
    return (folder / "metrics.jsonl").is_file() or (folder / LOCK_NAME).is_file()


def overlap_problem(out: Path, source: Path) -> str | None:
    """Why a command must not write (or replace) the folder ``out`` given that it reads ``source``: ``out`` is,
    contains or lies inside ``source``, or is, contains or lies inside a run folder. None when it may."""
    dst, src = out.resolve(), source.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        where = "is" if dst == src else ("lies inside" if src in dst.parents else "contains")
        return f"'{out}' {where} the checkpoint it is made from ('{source}')"
    for folder in (dst, *dst.parents):
        if is_run_folder(folder):
            return f"'{out}' {'is' if folder == dst else 'lies inside'} the run folder '{folder}'"
    if dst.is_dir():
        inner = next((p.parent for p in dst.rglob("metrics.jsonl") if is_run_folder(p.parent)), None)
        if inner is not None:
            return f"'{out}' contains the run folder '{inner}'"
    return None


def damaged_weights(folder: Path) -> str | None:
    """The first ``*.safetensors`` file of ``folder`` whose header does not describe the file (truncated, not a
    safetensors file), with the reason; None when every one opens."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except (OSError, SafetensorError) as e:
            return f"{path} is damaged ({e})"
    return None
