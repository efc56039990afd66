"""`python -m vlmtune.bench.recipes`: the article's fine-tuning advice, measured on the builtin base.

Two held-out fine-tuning tasks on the builtin base's own kind of images (neither is in its pretraining mixture):

* ``color``: "What color is the shape?" -> "red" (a new question whose answer needs the image; ``builtin:shapes:color``);
* ``brief``: "Describe the image briefly." -> "red circle, top left" (a new answer style: colour, shape and position
  in an order and form the base never produced; written by this module).

Each variant changes one thing of a baseline (the quickstart's recipe: projector LoRA r16/alpha 32 at 3x the language
model's rate, language-model attention LoRA r16/alpha 32, vision tower and lm_head frozen), with equal steps and data:
the projector frozen / LoRA / full; its rate 1x / 3x / 10x the language model's; rank 8 / 16 / 32 (alpha 2r) and
alpha r / 2r / 4r (rank 16); LoRA dropout 0 / 0.05 / 0.1; joint vs progressive (projector alone for the first third);
visual augmentation off / on; and the winners together (projector full, alpha 4r). Every (task, variant, seed) is a
normal run folder under ``--out``; a finished one (``final/`` and its metrics) is not run again, so an interrupted
study resumes. The summary (exact match, answer loss
and image-ablation gap at each eval step, mean and spread over seeds) is printed and written as ``RECIPES.md`` in
``--out`` (and to ``--write`` when given).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

from vlmtune.config.overrides import deep_merge
from vlmtune.data.shapes import random_scene, render_scene
from vlmtune.tracking import echo

BRIEF_QUESTION = "Describe the image briefly."
# The baseline reads the colour perfectly by step 40 of 120 on this base, so the study runs 60 steps and evaluates
# every 15: the differences are in how fast each variant gets there.
STEPS = 60
EVAL_EVERY = 15
BASELINE: dict = {
    "groups": {
        "vision_tower": {"mode": "frozen"},
        "projector": {"mode": "lora", "rank": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear", "lr": 3e-3},
        "language_model": {"mode": "lora", "rank": 16, "alpha": 32, "dropout": 0.0, "targets": "attention", "lr": 1e-3},
        "lm_head": {"mode": "frozen"},
    },
    "data": {"max_length": 256},
    "train": {
        "max_steps": STEPS,
        "batch_size": 16,
        "warmup_steps": 5,
        "scheduler": "cosine",
        "logging_steps": 15,
        "eval_steps": EVAL_EVERY,
        "save_steps": None,
        "progress_bar": False,
    },
    "eval": {"samples": 64, "retrieval_k": 2},  # retrieval is not reported: its cheapest setting
}


def _both(**settings) -> dict:
    """The same LoRA settings on the projector and the language model."""
    return {"groups": {"projector": dict(settings), "language_model": dict(settings)}}


# (factor, level, overrides of the baseline); the baseline is each factor's default level.
VARIANTS: list[tuple[str, str, dict]] = [
    ("baseline", "quickstart", {}),
    ("projector", "frozen", {"groups": {"projector": {"mode": "frozen"}}}),
    ("projector", "full", {"groups": {"projector": {"mode": "full"}}}),
    ("projector lr", "1x", {"groups": {"projector": {"lr": 1e-3}}}),
    ("projector lr", "10x", {"groups": {"projector": {"lr": 1e-2}}}),
    ("rank (alpha 2r)", "8", _both(rank=8, alpha=16)),
    ("rank (alpha 2r)", "32", _both(rank=32, alpha=64)),
    ("alpha (rank 16)", "r", _both(alpha=16)),
    ("alpha (rank 16)", "4r", _both(alpha=64)),
    ("dropout", "0.05", _both(dropout=0.05)),
    ("dropout", "0.1", _both(dropout=0.1)),
    (
        "schedule",
        "progressive",
        {
            "stages": [
                {"name": "align", "steps": STEPS // 3, "groups": {"language_model": {"mode": "frozen"}}},
                {"name": "joint", "steps": STEPS - STEPS // 3},
            ]
        },
    ),
    ("augmentation", "on", {"data": {"augment": {"enabled": True}}}),
    # The two winners above together (vlmtune's default groups and the quickstart since): no interaction undoes them.
    (
        "combined",
        "full projector + alpha 4r",
        {"groups": {"projector": {"mode": "full"}, "language_model": {"alpha": 64}}},
    ),
]
BASE_LEVEL = {
    "projector": "LoRA",
    "projector lr": "3x",
    "rank (alpha 2r)": "16",
    "alpha (rank 16)": "2r",
    "dropout": "0",
    "schedule": "joint",
    "augmentation": "off",
    "combined": "neither",
}
TASKS = ("color", "brief")


def write_brief(out: Path, train: int = 512, eval_: int = 96) -> tuple[Path, Path]:
    """The ``brief`` task's train and eval JSONL files with their images (seeded; written once)."""
    paths = (out / "train.jsonl", out / "eval.jsonl")
    if all(p.is_file() for p in paths):
        return paths
    (out / "images").mkdir(parents=True, exist_ok=True)
    for path, n, seed in ((paths[0], train, 101), (paths[1], eval_, 102)):
        rng = random.Random(f"recipes/brief/{seed}")
        lines = []
        for i in range(n):
            scene = random_scene(rng)
            name = f"images/{path.stem}-{i}.png"
            render_scene(scene).save(out / name)
            answer = f"{scene.color} {scene.shape}, {scene.position}"
            messages = [
                {"role": "user", "content": "<image>" + BRIEF_QUESTION},
                {"role": "assistant", "content": answer},
            ]
            lines.append(json.dumps({"messages": messages, "images": [name]}))
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.rename(path)
    return paths


def task_data(task: str, root: Path) -> dict:
    """The ``data`` overrides of a task."""
    if task == "color":  # QUESTIONS["color"], held out of the base's pretraining
        return {"train": "builtin:shapes:color", "eval": "builtin:shapes:color",
                "builtin_train_samples": 512, "builtin_eval_samples": 96}  # fmt: skip
    if task == "brief":
        train, eval_ = write_brief(root / "brief-data")
        return {"train": str(train), "eval": str(eval_)}
    raise ValueError(f"unknown task {task!r}: {' or '.join(TASKS)}")


def run_one(task: str, variant: tuple[str, str, dict], seed: int, out: Path, base: Path) -> list[dict]:
    """Runs one (task, variant, seed) unless its folder holds a finished run; returns its eval records."""
    from vlmtune.config.schema import Config
    from vlmtune.train.recipe import train

    folder = out / task / f"{variant[0]}={variant[1]}".replace(" ", "_") / f"seed{seed}"
    done = folder / "evals.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    cfg = deep_merge(BASELINE, variant[2])
    cfg = deep_merge(
        cfg,
        {
            "model": {"path": str(base)},
            "data": task_data(task, out),
            "train": {"output_dir": str(folder / "run"), "seed": seed},
        },
    )
    train(Config.model_validate(cfg))
    records = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [{k: v for k, v in r.items() if k == "step" or k.startswith("eval")} for r in records if "eval_loss" in r]
    done.write_text(json.dumps(evals))
    shutil.rmtree(folder / "run", ignore_errors=True)  # the figures are kept; the adapters are not needed
    return evals


def main(argv: list[str] | None = None) -> int:
    from vlmtune.bench.recipes_report import report
    from vlmtune.builtin.base import ensure_base

    ap = argparse.ArgumentParser(prog="python -m vlmtune.bench.recipes", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out",
        type=Path,
        help="study folder (resumable); default runs/recipes/<the base's folder name>, so runs from another builtin "
        "base are never taken as done",
    )
    ap.add_argument("--seeds", type=int, default=3, help="seeds per variant (train.seed 0..N-1)")
    ap.add_argument("--tasks", default="color,brief", help="comma-separated: color, brief")
    ap.add_argument("--only", default="", help="comma-separated factor names to run (default: every variant)")
    ap.add_argument("--write", type=Path, help="also write the summary to this file (e.g. bench/RECIPES.md)")
    args = ap.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    factors = {f.strip() for f in args.only.split(",") if f.strip()}
    unknown = [f"task {t!r}" for t in tasks if t not in TASKS]
    unknown += [f"factor {f!r}" for f in sorted(factors - set(BASE_LEVEL))]
    if unknown or not tasks:
        ap.error(
            f"--tasks/--only: unknown {', '.join(unknown) or 'empty --tasks'}; "
            f"tasks are {', '.join(TASKS)}; factors are {', '.join(BASE_LEVEL)}"
        )
    base = ensure_base(echo=echo)
    out = args.out or Path("runs/recipes") / base.name
    variants = [v for v in VARIANTS if not factors or v[0] in factors or v[0] == "baseline"]
    results: dict = {}
    for task in tasks:
        for variant in variants:
            for seed in range(args.seeds):
                echo(f"== {task} / {variant[0]} = {variant[1]} / seed {seed}")
                results.setdefault(task, {}).setdefault(variant[:2], []).append(run_one(task, variant, seed, out, base))
    text = report(results, BASE_LEVEL, args.seeds, base.name)
    echo(text)
    (out / "RECIPES.md").write_text(text, encoding="utf-8")
    if args.write:
        args.write.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
