"""Evaluation inside a run: the answer loss over the whole eval set (all processes), and the language and
alignment metrics on ``eval.samples`` of it (main process), logged as one record."""

from __future__ import annotations

from vlmtune.eval.evaluate import eval_record, report_table
from vlmtune.tracking import echo
from vlmtune.train.run import Run, StageRun


def evaluate_stage(run: Run, sr: StageRun, show: bool = False) -> float:
    """Evaluates the stage's model now; returns the eval loss."""
    acc, cfg = run.accelerator, sr.stage.cfg
    loss = run.objective.eval_loss(sr.model, sr.eval_loader, acc)
    record = {"step": run.progress.global_step, "stage": sr.stage.name, "eval_loss": loss}
    if acc.is_main_process:
        record.update(eval_record(sr.model, run.processor, sr.eval_ds, cfg.eval, accelerator=acc, arch=run.gmap.arch))
        if show:
            echo(report_table(record))
    run.metrics.log(record)
    acc.wait_for_everyone()
    return loss
