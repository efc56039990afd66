"""The run folder (``train.output_dir``): one run at a time in it, where to resume from, and clearing an earlier
run's checkpoints only once the new run is known to be valid.

A fresh start in a used folder removes the earlier run's checkpoints (so that a later ``--resume`` never mixes two
runs), but only just before its first step: after its config, model, plan and every stage's data were checked, so a
run that fails before training leaves the folder as it was. A lock file (``.vlmtune.lock``: PID, host, start time)
keeps a second run out of a busy folder; a lock whose process is gone is taken over, and says so.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from vlmtune.config.errors import ConfigError
from vlmtune.config.schema import Config
from vlmtune.config.stages import Stage
from vlmtune.paths import GALLERY_FILE, LOCK_NAME, recover
from vlmtune.tracking import echo
from vlmtune.train.checkpoint import STEP_FOLDER
from vlmtune.train.distributed import any_process
from vlmtune.train.resume import DAMAGED, STATE_DIR, config_changes, damage, latest, progress_key, resumable
from vlmtune.train.sharding import check_resume, sharding

BUSY_EXIT = 5


class OutputDirBusy(RuntimeError):
    """Another run holds the output folder; the message names its PID and host."""

    exit_code = BUSY_EXIT


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux /proc), to tell a live run from a later process with its PID."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the process that wrote a lock still runs (only knowable on the same host)."""
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process: assume it runs
    pid = int(holder.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    started = holder.get("start")
    return started is None or _process_start(pid) in (None, started)


def _try_lock(out: Path) -> str | None:
    """Takes the folder's lock for this process; returns why not (the holder), or None when taken.

    Raises:
        ConfigError: ``train.output_dir`` cannot be created or written (a file in its place, no permission, ...).
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f"{LOCK_NAME}.{os.getpid()}.probe"
        probe.write_text("", encoding="utf-8")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            [f"'train.output_dir': cannot write into '{out}': {e.strerror or e} ({e.filename or out})"], str(out)
        ) from None
    path = out / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()), "since": time.time()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                holder = {}
            if holder and _alive(holder):
                return (
                    f"{out} is in use by another vlmtune run (PID {holder.get('pid')} on {holder.get('host')}, "
                    f"lock file {path}); wait for it to end, or choose another train.output_dir. If that run is "
                    f"gone (it ran on another machine), delete {path}"
                )
            echo(f"{path}: taking over the lock of a run that is gone ({holder or 'unreadable lock file'})")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        return None
    return f"{out}: could not take the lock file {path}"


class OutputLock:
    """``with OutputLock(out, accelerator):`` one run per output folder; the main process holds the lock file."""

    def __init__(self, out: Path, accelerator):
        self.out, self.accelerator, self.held = out, accelerator, False
        self.created = False  # the folder did not exist: a run that ends before writing anything removes it again

    def __enter__(self) -> OutputLock:
        self.created = not self.out.exists()
        why = _try_lock(self.out) if self.accelerator.is_main_process else None
        self.held = self.accelerator.is_main_process and why is None
        if any_process(why is not None, self.accelerator):
            raise OutputDirBusy(why or f"{self.out} is in use by another vlmtune run (see the main process)")
        return self

    def __exit__(self, *exc) -> None:
        if not self.held:
            return
        path = self.out / LOCK_NAME
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
                path.unlink()
            if self.created and not any(self.out.iterdir()):
                self.out.rmdir()
        except (OSError, ValueError):
            pass  # a lock left behind names a process that is gone: the next run takes it over, saying so


def find_resume_point(out: Path, cfg: Config, accelerator) -> Path | None:
    """The checkpoint to resume from with ``train.resume: auto`` (after tidying an interrupted save), else None.

    Raises:
        ConfigError: the checkpoint's model, groups, data or stages differ and ``train.force_resume`` is off.
    """
    if cfg.train.resume != "auto":
        return None
    if accelerator.is_main_process:
        for line in recover(out):
            echo(line)
        set_aside_damaged(out)
    accelerator.wait_for_everyone()
    found = latest(out)
    if found is None:
        echo(f"resume: no complete checkpoint in {out}; starting from the beginning")
        return None
    changes = config_changes(found / "config.yaml", cfg.model_dump(mode="json"))
    if changes and not cfg.train.force_resume:
        raise ConfigError(
            [f"{c}" for c in changes]
            + [
                "these settings differ from the checkpoint's; resuming would mix two different runs. Use the "
                "checkpoint's settings, another train.output_dir, or --force-resume to resume anyway"
            ],
            f"resume from {found}",
        )
    for c in changes:
        echo(f"warning: resuming although {c} (forced)")
    check_resume(found, sharding(cfg, accelerator), accelerator.num_processes)
    return found


def set_aside_damaged(out: Path) -> None:
    """Renames every damaged resumable checkpoint newer than the newest intact one, and any whose progress cannot be
    read, to ``NAME.damaged`` (kept, never deleted), saying what is wrong with it, so that a resume falls back to
    the newest intact checkpoint."""
    intact_found = False
    for folder in resumable(out):
        if intact_found and progress_key(folder) is not None:
            continue  # older than the checkpoint the run resumes from: not read
        why = damage(folder)
        if why is None:
            intact_found = True
            continue
        target = folder.with_name(folder.name + DAMAGED)
        n = 1
        while target.exists():
            n += 1
            target = folder.with_name(f"{folder.name}{DAMAGED}-{n}")
        folder.rename(target)
        echo(f"warning: {folder} is damaged ({why}); kept as {target.name}, resuming from an earlier checkpoint")


def clear_earlier_run(out: Path, stages: list[Stage], accelerator) -> None:
    """For a fresh start, just before its first step: tidies an interrupted save and removes the checkpoints of an
    earlier run in ``out`` (``final/``, stage folders, ``checkpoint-N/``), saying which."""
    if accelerator.is_main_process:
        for line in recover(out):
            echo(line)
        (out / GALLERY_FILE).unlink(missing_ok=True)  # the new run's evaluations write their own answers
    names = {"final"} | {s.name for s in stages if s.named}
    stale = sorted(
        p
        for p in out.iterdir()
        if p.is_dir()
        and (p / "config.yaml").is_file()
        and (p.name in names or STEP_FOLDER.match(p.name) or (p / STATE_DIR).is_dir())
    )
    if stale:
        echo(
            f"{out} holds checkpoints of an earlier run ({', '.join(p.name for p in stale)}); this fresh start "
            "removes them now that its config, model and data are checked (`vlmtune train CONFIG --resume` "
            "continues a run instead)"
        )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for p in stale:
                shutil.rmtree(p)
    accelerator.wait_for_everyone()
