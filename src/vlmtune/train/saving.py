"""Saving during a run: resumable checkpoints (every process takes part) and the final folder."""

from __future__ import annotations

from pathlib import Path

from vlmtune.paths import TMP_SUFFIX, begin, commit
from vlmtune.tracking import echo
from vlmtune.train.checkpoint import prune, save_checkpoint, write_model
from vlmtune.train.distributed import gathered_state_dict, sharded_engine
from vlmtune.train.resume import write_rng, write_state
from vlmtune.train.run import Run


def save_resumable(run: Run, model, folder: Path, optimizer=None, scheduler=None) -> Path:
    """Writes a loadable checkpoint plus everything a resume needs, atomically; every process takes part
    (each writes its own RNG state), the main process writes the rest and renames."""
    acc = run.accelerator
    run.progress.metrics_lines = len(run.metrics.records)
    tmp = folder.with_name(folder.name + TMP_SUFFIX)
    sharded = sharded_engine(acc)
    if acc.is_main_process:
        begin(folder)
    acc.wait_for_everyone()
    if not sharded:
        write_rng(tmp, acc.process_index)
    state_dict = gathered_state_dict(acc, model)
    acc.wait_for_everyone()
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(model)
        write_model(unwrapped, run.processor, run.cfg, tmp, state_dict)
        if sharded:  # optimizer states are sharded across processes there; vlmtune does not gather them yet
            echo(f"note: {folder.name} holds the weights but no resume state ({sharded} shards the optimizer)")
        else:
            weights = {n: p for n, p in unwrapped.named_parameters() if n in run.trained_params}
            write_state(tmp, run.progress, weights, optimizer, scheduler)
        commit(tmp, folder)
        for p in prune(run.out, run.cfg.train.save_total_limit):
            echo(f"removed {p.name} (train.save_total_limit={run.cfg.train.save_total_limit})")
    acc.wait_for_everyone()
    run.last_checkpoint = folder
    return folder


def save_final(run: Run, model) -> Path:
    """``final/``: the last stage's loadable checkpoint (no resume state), written by the main process."""
    acc = run.accelerator
    acc.wait_for_everyone()
    final = run.out / "final"
    state_dict = gathered_state_dict(acc, model)
    if acc.is_main_process:
        save_checkpoint(acc.unwrap_model(model), run.processor, run.cfg, final, state_dict)
    return final
