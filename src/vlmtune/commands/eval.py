"""`vlmtune eval`: language and vision-language alignment metrics of a checkpoint, each beside its chance level;
for the builtin base, also its probe (``vlmtune.eval.probe``: each attribute of held-out generated images)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vlmtune.builtin.base import is_builtin_base
from vlmtune.commands.loading import load_checkpoint, load_eval_data, resolve_checkpoint, with_overrides
from vlmtune.eval.evaluate import EvalResult, eval_metrics, plot_metrics, report_table, write_report
from vlmtune.eval.probe import probe_base, probe_table
from vlmtune.model.load import arch_for
from vlmtune.tracking import echo

PROBE_IMAGES = 32  # per attribute: the probe costs about as much as evaluating 128 samples


def command(args: argparse.Namespace) -> int:
    """``vlmtune eval --checkpoint DIR [--data D] [--out F] [--no-generate] [overrides]``."""
    evaluate_checkpoint(
        args.checkpoint, args.data, args.out, args.overrides, not args.no_generate, echo, args.trust_remote_code
    )
    return 0


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | None = None,
    out: str | Path | None = None,
    overrides: list[str] | None = None,
    generate_answers: bool = True,
    echo=print,
    trust_remote_code: bool = False,
) -> EvalResult:
    """``vlmtune eval``: load -> data -> metrics -> table, JSON report, and the run's metrics plot.

    Args:
        checkpoint: a checkpoint folder, a run folder (its ``final/``), or a plain model folder.
        data: eval data; None means the run's ``data.eval``.
        out: the JSON report; None means ``eval_report.json`` in the checkpoint folder.
        overrides: ``key.path=value`` settings, e.g. ``eval.retrieval_k=4``.
        generate_answers: generate for exact match / BLEU / ROUGE.
        echo: where the table and notes are printed.
        trust_remote_code: the user's opt-in to running the model folder's own code (``--trust-remote-code``).
    """
    folder, run = resolve_checkpoint(checkpoint)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor, saved = load_checkpoint(folder, device, trust_remote_code=trust_remote_code)
    cfg = with_overrides(saved, overrides)
    base = is_builtin_base(folder)
    result = EvalResult({})
    if data or cfg.data.eval or not base:  # the builtin base alone may be given without data: its probe only
        items = load_eval_data(cfg, data, processor, cfg.eval.samples)
        echo(f"evaluating {folder} on {len(items)} samples of {data or cfg.data.eval}")
        result = eval_metrics(
            model, processor, items, cfg.eval, generate_answers, arch_for(model, cfg.model), progress=True
        )
        echo(report_table(result.metrics))
        for note in result.notes:
            echo(f"note: {note}")
    if base:
        probe = probe_base(model, processor, PROBE_IMAGES, cfg.eval.batch_size)
        echo(f"probe of the builtin base: its own questions on {PROBE_IMAGES} held-out images per attribute")
        echo(probe_table(probe, PROBE_IMAGES))
        result.metrics.update(probe.metrics())
    report = write_report(
        result,
        Path(out) if out else folder / "eval_report.json",
        {"checkpoint": str(folder), "data": str(data or cfg.data.eval) if data or cfg.data.eval else None},
    )
    echo(f"wrote {report}")
    if run is not None:
        echo(f"wrote {plot_metrics(run / 'metrics.jsonl', run / 'metrics.png')} (metrics over training)")
    return result
