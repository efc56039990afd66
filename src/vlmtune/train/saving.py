"""Saving during a run: resumable checkpoints (every process takes part) and the final folder."""

from __future__ import annotations

import shutil
from pathlib import Path

from vlmtune.config.errors import ConfigError
from vlmtune.model.tuning import GroupPlan
from vlmtune.paths import TMP_SUFFIX, begin, commit
from vlmtune.tracking import echo
from vlmtune.train.checkpoint import prune, save_checkpoint, write_model
from vlmtune.train.distributed import any_process, gathered_state_dict, sharded_engine
from vlmtune.train.resume import STATE_DIR, write_objective, write_rng, write_state
from vlmtune.train.run import Run
from vlmtune.train.sharding import is_sharded, save_optimizer
from vlmtune.train.stopping import SaveFailed


def check_convertible(accelerator, plans: list[GroupPlan]) -> None:
    """PiSSA/OLoRA adapters are saved converted for the original base (``vlmtune.model.adapters``), from weights
    that FSDP and DeepSpeed split across processes; such a run is refused before it trains.

    Raises:
        ConfigError: a PiSSA/OLoRA group in a run with sharded weights, naming the group.
    """
    engine = sharded_engine(accelerator)
    converted = [p for p in plans if p.mode == "lora" and p.init.startswith(("pissa", "olora"))]
    if engine and converted:
        raise ConfigError(
            [
                f"groups.{p.group}.init is {p.init}: its adapter is saved converted for the original base weights, "
                f"which vlmtune does not do for weights split by {engine}; use init default or gaussian"
                for p in converted
            ],
            "the run",
        )


def save_resumable(run: Run, model, folder: Path, optimizer=None, scheduler=None) -> Path:
    """Writes a loadable checkpoint plus everything a resume needs, atomically; every process takes part
    (each writes its own RNG state), the main process writes the rest and renames.

    Raises:
        SaveFailed: a write failed (a full disk, say): the half-written folder is removed, the last good
            checkpoint is named, and every process stops together.
    """
    acc = run.accelerator
    run.progress.metrics_lines = len(run.metrics.records)
    tmp = folder.with_name(folder.name + TMP_SUFFIX)
    fsdp2 = is_sharded(acc.unwrap_model(model))  # train.sharding: fsdp: each process writes its optimizer shard
    sharded = None if fsdp2 else sharded_engine(acc)  # accelerate's FSDP or DeepSpeed: no resume state
    failed = None
    if acc.is_main_process:
        failed = _attempt(lambda: begin(folder), tmp)
    _stop_together(run, folder, failed)
    if not sharded:

        def write_own() -> None:
            write_rng(tmp, acc.process_index)
            write_objective(tmp, acc.process_index, run.objective.state())

        failed = _attempt(write_own, tmp)
    state_dict = gathered_state_dict(acc, model)
    _stop_together(run, folder, failed)
    if fsdp2:
        raw = getattr(optimizer, "optimizer", optimizer)
        failed = _attempt(lambda: save_optimizer(tmp / STATE_DIR, model, raw, acc.num_processes), tmp)
        _stop_together(run, folder, failed)
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(model)

        def write() -> None:
            write_model(unwrapped, run.processor, run.cfg, tmp, state_dict, run.initial)
            if sharded:  # optimizer states are sharded across processes there; vlmtune does not gather them yet
                echo(f"note: {folder.name} holds the weights but no resume state ({sharded} shards the optimizer)")
            elif fsdp2:  # the gathered weights; the optimizer's states are in trainer_state/optimizer/
                weights = {n: v for n, v in state_dict.items() if n in run.trained_params}
                write_state(tmp, run.progress, weights, None, scheduler)
            else:
                weights = {n: p for n, p in unwrapped.named_parameters() if n in run.trained_params}
                write_state(tmp, run.progress, weights, optimizer, scheduler)
            commit(tmp, folder)

        failed = _attempt(write, tmp)
        if failed is None:
            for p in prune(run.out, run.cfg.train.save_total_limit):
                echo(f"removed {p.name} (train.save_total_limit={run.cfg.train.save_total_limit})")
    _stop_together(run, folder, failed)
    run.last_checkpoint = folder
    return folder


def save_final(run: Run, model) -> Path:
    """``final/``: the last stage's loadable checkpoint (no resume state), written by the main process.

    Raises:
        SaveFailed: as ``save_resumable``.
    """
    acc = run.accelerator
    acc.wait_for_everyone()
    final = run.out / "final"
    state_dict = gathered_state_dict(acc, model)
    failed = None
    if acc.is_main_process:
        failed = _attempt(
            lambda: save_checkpoint(acc.unwrap_model(model), run.processor, run.cfg, final, state_dict, run.initial),
            final.with_name(final.name + TMP_SUFFIX),
        )
    _stop_together(run, final, failed)
    return final


def _attempt(write, tmp: Path) -> str | None:
    """Runs a write; on an OS error (disk full, no permission, ...) removes the half-written ``tmp`` and says why."""
    try:
        write()
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        return f"{e.strerror or e} ({e.filename or tmp})"
    return None


def _stop_together(run: Run, folder: Path, failed: str | None) -> None:
    """Every process learns whether a write failed anywhere, and all stop with the same message if it did."""
    if not any_process(failed is not None, run.accelerator):
        run.accelerator.wait_for_everyone()
        return
    last = run.last_checkpoint or "none (no checkpoint was written yet)"
    raise SaveFailed(
        f"could not write {folder}: {failed or 'a write failed on another process'}; the half-written "
        f"{folder.name}{TMP_SUFFIX} was removed and nothing else changed. Last good checkpoint: {last}. Free some space "
        "(or fix the folder's permissions), then run the same command with --resume"
    )
