"""Command line: ``vlmtune train CONFIG.yaml [key.path=value ...]``, ``eval``, ``predict``, ``chat``, ``export``,
``data check``, ``data preview``, ``doctor``, ``serve``, ``report``, ``bench``, ``sweep``, ``lr-find``.

argparse only: each command calls one function in ``vlmtune.commands`` (``bench`` in ``vlmtune.bench``)."""

from __future__ import annotations

import argparse
import os
import sys

from vlmtune.bench import command as bench
from vlmtune.commands import data as data_command
from vlmtune.commands import doctor, export, lr_find, predict, sweep
from vlmtune.commands import eval as eval_command
from vlmtune.commands import report as report_command
from vlmtune.commands import serve as serve_command
from vlmtune.commands import train as train_command
from vlmtune.commands.loading import CheckpointError
from vlmtune.config.errors import ConfigError
from vlmtune.config.load import reference
from vlmtune.data.sharegpt import DataError


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest generated answer in tokens (default 64)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --sample)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling")


def _add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the model folder's own Python code run (never taken from a checkpoint's config.yaml)",
    )


def _add_commands(sub) -> None:
    ck = "checkpoint folder (final/, checkpoint-N/, a stage folder), a run folder, or a plain transformers model folder"
    p = sub.add_parser(
        "eval",
        help="language and vision-language alignment metrics of a checkpoint",
        description="Answer loss, perplexity, token accuracy, exact match, BLEU-4, ROUGE, image-ablation "
        "gap, caption retrieval and projector alignment, each beside its chance level; for the builtin base, also "
        "its probe (its own questions on held-out generated images), which alone needs no --data.",
    )
    p.add_argument("--checkpoint", required=True, help=ck)
    _add_trust_arg(p)
    p.add_argument("--data", help="eval data (file, dataset name or builtin:shapes:TASK); default: the run's data.eval")
    p.add_argument("--out", help="JSON report path (default: CHECKPOINT/eval_report.json)")
    p.add_argument("--no-generate", action="store_true", help="skip generation (exact match, BLEU-4, ROUGE)")
    p.add_argument("overrides", nargs="*", help="key.path=value settings, e.g. eval.retrieval_k=4 eval.samples=128")
    p.set_defaults(func=eval_command.command)

    p = sub.add_parser("predict", help="generate an answer for every sample of a data file (JSONL out)")
    p.add_argument("--checkpoint", required=True, help=ck)
    _add_trust_arg(p)
    p.add_argument(
        "--data", required=True, help="data file (ShareGPT JSON/JSONL, with images and videos) or builtin:shapes:TASK"
    )
    p.add_argument("--out", required=True, help="predictions file: one JSON line per sample")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch (default 8)")
    p.add_argument("--limit", type=int, help="only the first N samples")
    _add_generation_args(p)
    p.set_defaults(func=predict.predict_command)

    p = sub.add_parser(
        "chat",
        help="talk to a checkpoint; '/image PATH' attaches an image file, '/video PATH' a video or frames folder",
    )
    p.add_argument("--checkpoint", required=True, help=ck)
    _add_trust_arg(p)
    _add_generation_args(p)
    p.set_defaults(func=predict.chat_command)

    p = sub.add_parser(
        "export", help="write the adapter, the model with LoRA merged in, or a base + adapter for vLLM (logits checked)"
    )
    p.add_argument("--checkpoint", required=True, help=ck)
    _add_trust_arg(p)
    p.add_argument("--out", required=True, help="export folder")
    p.add_argument(
        "--format",
        choices=["adapter", "merged", "vllm"],
        help="adapter: the peft adapter (default); merged: LoRA and the fully trained groups merged into the base "
        "weights; vllm: base/ with everything but the language model's LoRA merged in, and adapter/ with that LoRA",
    )
    p.add_argument("--merge", action="store_true", help="the same as --format merged")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="saved dtype of a merged export or of a vllm export's base/ (default: the base's)",
    )
    p.add_argument(
        "--atol", type=float, help="allowed max abs logit difference, export vs. unmerged (default: per dtype)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=export.command)

    p = sub.add_parser(
        "report",
        help="one self-contained HTML page of a run, or of several runs compared (also written at a run's end)",
    )
    report_command.add_arguments(p)
    p.set_defaults(func=report_command.command)


def _add_tuning_commands(sub) -> None:
    """`sweep` and `lr-find`."""
    p = sub.add_parser(
        "sweep",
        help="search config values (per-group learning rates, ranks, ...) with Optuna: seeded TPE, median pruning",
        description="Each trial is a normal run in DIR/trial-NNN; the study lives in DIR/study.db, so the same "
        "command resumes it. Writes DIR/trials.csv, trials.md, sweep.png and best.yaml (a config for vlmtune train).",
    )
    p.add_argument("config", help="YAML config")
    p.add_argument(
        "overrides", nargs="*", help="key.path=value overrides applied to every trial, e.g. train.max_steps=40"
    )
    p.add_argument(
        "--space",
        required=True,
        help="YAML file: key.path: {type: float|int, low, high, log, step} or {type: categorical, choices: [...]}",
    )
    p.add_argument("--trials", type=int, required=True, help="trials in all (a resumed sweep counts those done)")
    p.add_argument("--metric", default="eval_loss", help="the eval figure to optimise (default eval_loss)")
    p.add_argument(
        "--direction",
        choices=["minimize", "maximize"],
        help="default: minimize for losses and perplexity, maximize otherwise",
    )
    p.add_argument("--out", help="sweep folder (default: train.output_dir + '-sweep')")
    p.add_argument("--seed", type=int, help="sampler seed (default train.seed)")
    p.add_argument(
        "--startup-trials",
        type=int,
        default=5,
        help="trials sampled at random and never pruned before TPE and the median pruner take over (default 5)",
    )
    p.set_defaults(func=sweep.command)

    p = sub.add_parser(
        "lr-find",
        help="learning-rate range test per trained group: the loss as each group's rate rises, a suggested rate",
        description="Trains each trained group alone (the others frozen) from the same start while its rate "
        "rises exponentially from --min to --max; prints a suggested rate per group and writes a plot. Writes "
        "nothing but --out.",
    )
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.batch_size=8")
    p.add_argument("--steps", type=int, default=100, help="steps per group (default 100)")
    p.add_argument("--min", type=float, default=1e-6, dest="min_lr", help="first rate (default 1e-6)")
    p.add_argument("--max", type=float, default=1e-1, dest="max_lr", help="last rate (default 1e-1)")
    p.add_argument("--out", help="folder for lr_find.png and lr_find.csv (default: train.output_dir + '-lr-find')")
    p.set_defaults(func=lr_find.command)


def _add_bench_command(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="time vlmtune's trainer against a plain transformers + peft loop (same training)",
        description="Runs the same LoRA training through vlmtune and through a plain reference loop, "
        "alternately, and prints s/step, samples/s, tokens/s, peak memory and the ratios.",
    )
    bench.add_arguments(p)
    p.set_defaults(func=bench.run_from_args)


def _add_check_commands(sub) -> None:
    """`data check`, `data preview` and `doctor`."""
    data = sub.add_parser("data", help="check or preview data before training")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser(
        "check", help="report every problem of every sample by place, then a summary (exit 1 on errors)"
    )
    p.add_argument("target", help="a YAML config (checks data.train and data.eval) or a JSON/JSONL data file")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. data.max_length=512 model.path=DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=data_command.check_command)

    p = data_sub.add_parser("preview", help="write a PNG grid of augmented training samples with their text")
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. data.augment.flip=true")
    p.add_argument("--out", default="preview.png", help="PNG file to write (default preview.png)")
    p.add_argument("--samples", type=int, default=4, help="rows: samples with images from the start of data.train")
    p.add_argument("--views", type=int, default=4, help="augmented draws per sample (epochs 0, 1, ...)")
    p.set_defaults(func=data_command.preview_command)

    p = sub.add_parser("doctor", help="print environment and plan, then PASS/FAIL checks (exit 1 on any FAIL)")
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.add_argument(
        "--fit",
        nargs="?",
        const="device",
        metavar="SIZE",
        help="also propose the settings with the best throughput that fit the device's memory, or SIZE (e.g. 24GiB)",
    )
    p.add_argument("--json", metavar="PATH", help="write the predicted peak memory, per stage and group, to PATH")
    p.set_defaults(func=doctor.command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmtune", description="Fine-tune vision-language models component by component."
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the Python traceback of a failure vlmtune does not name itself (also VLMTUNE_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "train",
        help="fine-tune from a YAML config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train from a YAML file (vlmtune keys or flat LLaMA-Factory keys), then key.path=value overrides.",
        epilog="config reference:\n" + "\n".join(reference()),
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument(
        "overrides", nargs="*", help="key.path=value overrides, e.g. train.max_steps=50 groups.projector.lr=1e-3"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in output_dir (train.resume=auto)",
    )
    p.add_argument(
        "--force-resume",
        action="store_true",
        help="resume even if model, groups, data or stages changed since the checkpoint",
    )
    p.set_defaults(func=train_command.command)
    _add_commands(sub)
    _add_check_commands(sub)
    _add_bench_command(sub)
    _add_tuning_commands(sub)
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible chat completions API over a checkpoint (images as data: URIs, streaming)",
        description="POST /v1/chat/completions, GET /v1/models, GET /health; requests arriving together share a "
        "generate call. Binds to 127.0.0.1 unless --host says otherwise.",
    )
    serve_command.add_arguments(p)
    p.set_defaults(func=serve_command.command)
    return parser


UNEXPECTED_EXIT = 1


def main(argv: list[str] | None = None) -> int:
    """Runs one command; every failure ends in one ``error:`` message and an exit code, never a traceback
    (``--debug`` or ``VLMTUNE_DEBUG=1`` shows the traceback of a failure vlmtune does not name itself)."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("VLMTUNE_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # anything else: one line naming what failed; the traceback on request
        if debug:
            raise
        print(
            f"error: {type(e).__name__}: {e}\n  (vlmtune {args.command} failed; `vlmtune --debug {args.command} ...` "
            "or VLMTUNE_DEBUG=1 shows where)",
            file=sys.stderr,
        )
        return UNEXPECTED_EXIT


if __name__ == "__main__":
    sys.exit(main())
