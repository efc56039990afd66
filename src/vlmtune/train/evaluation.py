"""Evaluation inside a run: the answer loss over the whole eval set (all processes), and the language and
alignment metrics on ``eval.samples`` of it (main process), logged as one record. The evaluations before
training and at each stage's end also record the first eval samples' answers for the run report's gallery."""

from __future__ import annotations

from typing import Literal

from vlmtune.eval.alignment import eval_items
from vlmtune.eval.evaluate import eval_metrics, report_table
from vlmtune.eval.gallery import GALLERY_SAMPLES, gallery_answers, update_gallery
from vlmtune.paths import GALLERY_FILE
from vlmtune.tracking import echo
from vlmtune.train.run import Run, StageRun
from vlmtune.train.sharding import is_sharded


def evaluate_stage(
    run: Run, sr: StageRun, show: bool = False, gallery: Literal["before", "after"] | None = None
) -> float:
    """Evaluates the stage's model now; returns the eval loss.

    Args:
        run: the run.
        sr: the stage being trained.
        show: print the metrics table.
        gallery: record the gallery's answers as those before training or after this stage; None records none.
    """
    acc, cfg = run.accelerator, sr.stage.cfg
    found = run.objective.evaluate(sr.model, sr.eval_loader, acc)
    loss = found["eval_loss"]
    record = {"step": run.progress.global_step, "stage": sr.stage.name, **found}
    model = acc.unwrap_model(sr.model)
    if acc.is_main_process or is_sharded(model):  # sharded layers run on every process together (same inputs)
        items = eval_items(sr.eval_ds, cfg.eval.samples)
        result = eval_metrics(model, run.processor, items, cfg.eval, cfg.eval.generate_in_training, run.gmap.arch)
        record.update({f"eval/{k}": float(v) for k, v in result.metrics.items()})
        if hasattr(run.objective, "evaluate_rewards") and cfg.eval.generate_in_training:  # GRPO's rewards
            record.update(run.objective.evaluate_rewards(model, items, cfg.eval.max_new_tokens))
        if gallery is not None:
            first = items[:GALLERY_SAMPLES]
            answers = gallery_answers(model, run.processor, first, result.predictions, cfg.eval)
            if acc.is_main_process:
                update_gallery(run.out / GALLERY_FILE, first, answers, None if gallery == "before" else sr.stage.name)
        if show:
            echo(report_table(record))
    run.metrics.log(record)
    acc.wait_for_everyone()
    return loss
