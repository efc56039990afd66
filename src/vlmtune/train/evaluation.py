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


# Generation figures a stage must not lower without the run saying so: greedy exact match, and how much the answers
# lean on the image (answer loss with another sample's image minus with the sample's own).
WATCHED = {"eval/exact_match": "exact match", "eval/ablation_gap_other": "image-ablation gap"}
# The gap is a difference of mean losses over a few dozen samples: a fall smaller than this is within its noise.
GAP_SLACK = 0.05


def generation_regressions(before: dict, after: dict) -> list[str]:
    """The watched figures that are worse in ``after`` than in ``before`` (two eval records), as "name a -> b".

    Exact match counts any fall (each sample is a whole answer); the gap counts a fall of more than half its value
    and more than ``GAP_SLACK`` nats."""
    out = []
    for key, name in WATCHED.items():
        if key not in before or key not in after:
            continue
        a, b = float(before[key]), float(after[key])
        fell = b < a - 1e-9 if key == "eval/exact_match" else (a - b > GAP_SLACK and b < a / 2)
        if fell:
            out.append(f"{name} {a:.3f} -> {b:.3f}")
    return out


def check_stage_generation(run: Run, sr: StageRun) -> list[str]:
    """Compares the stage's last eval with the eval it started from (before training, or the previous stage's
    last) and warns when generation got worse; returns what got worse."""
    start = run.progress.global_step - sr.total
    evals = [r for r in run.metrics.records if "eval_loss" in r]
    before = [r for r in evals if r["step"] <= start]
    if not before or evals[-1]["step"] == before[-1]["step"]:
        return []
    worse = generation_regressions(before[-1], evals[-1])
    if worse:
        echo(
            f"warning: stage '{sr.stage.name}' left the model worse at generation than it found it: "
            f"{', '.join(worse)} (eval at step {before[-1]['step']} vs step {evals[-1]['step']}). "
            + (
                "A stage whose language model is frozen can move the image features away from what that model "
                "reads; a lower projector rate, warmup, or training the language model in the same stage avoids it "
                "(examples/progressive.yaml)."
                if all(p.mode == "frozen" for p in sr.plans if p.group in ("language_model", "lm_head"))
                else "Check the rates and the data of this stage."
            )
        )
    return worse
