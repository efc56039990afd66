"""`vlmtune bench`: vlmtune's trainer against a plain transformers + peft loop, same training, one command.

For each workload, the two sides run alternately in child processes (vlmtune, reference, vlmtune, reference, ...)
so that machine noise hits both. Side (a) is the real recipe: ``vlmtune train CONFIG`` with
``train.logging_steps=1``, its per-step time read from ``metrics.jsonl`` (``samples_per_s`` of each step's window:
data loading to the end of the optimizer step). Side (b) is ``vlmtune.bench.reference``, timed over the same
window. Both get the same model folder, dtype, attention kernel, LoRA targets, optimizer settings, seed, batch size
and the same samples each epoch; the reference takes them in the plain shuffled order, vlmtune grouped by length
(``train.group_by_length: true``). Every run trains whole epochs; all but the last are warm-up, and the figures come from the
last one: its summed step times against the samples and tokens of one epoch (the same for both sides, whatever the
batching), median over the rounds. Peak memory is the child's peak RSS (``os.wait4``) on CPU, and
``torch.cuda.max_memory_allocated`` on a GPU. Checks printed under each table: both sides wrapped the same modules
and trained on the same tokens and answer tokens each epoch; where their batches are the same, their per-step losses
agree.

``--profile`` instead runs each side once with timers on the vision tower, language model, lm_head, backward and
optimizer (torch's global module and optimizer hooks, see ``vlmtune.bench.profile``) and prints where a step's time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

from vlmtune.bench.profile import run_profile
from vlmtune.bench.runs import SIDES, epoch_orders, last_epoch, run_reference, run_vlmtune
from vlmtune.bench.setup import PRESETS, Preset, ensure_model, make_workload
from vlmtune.config.data import DataConfig
from vlmtune.data.collate import IGNORE
from vlmtune.data.dataset import build_dataset
from vlmtune.tracking import echo, text_table


def machine() -> dict:
    """What the numbers were measured on."""
    import peft
    import torch
    import transformers

    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").is_file()
        else platform.processor()
    )
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_avg_at_start": os.getloadavg()[0],
    }


def epoch_totals(data: Path, processor) -> dict:
    """Samples, real tokens, image tokens and answer (label) tokens of one epoch (the whole workload), as vlmtune's
    dataset makes them."""
    ds = build_dataset(str(data), DataConfig(train=str(data), max_length=8192), processor, "train")
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    totals = {"samples": len(ds), "tokens": 0, "image_tokens": 0, "label_tokens": 0}
    for i in range(len(ds)):
        item = ds[i]
        totals["tokens"] += len(item["input_ids"])
        totals["image_tokens"] += item["input_ids"].count(image_id)
        totals["label_tokens"] += sum(1 for x in item["labels"] if x != IGNORE)
    return totals


def summarise(runs: list[dict], totals: dict, steps: int) -> dict:
    """Per run, the last epoch's figures (its summed step times against one epoch's samples and tokens); the
    reported value is the median over the runs."""
    gpu = runs[0]["cuda_peak_bytes"] is not None
    epoch_s = [sum(last_epoch(run, steps)) for run in runs]
    text = totals["tokens"] - totals["image_tokens"]
    return {
        "s_per_step": statistics.median(t / steps for t in epoch_s),
        "round_s_per_step": [t / steps for t in epoch_s],
        "samples_per_s": statistics.median(totals["samples"] / t for t in epoch_s),
        "text_tokens_per_s": statistics.median(text / t for t in epoch_s),
        "image_tokens_per_s": statistics.median(totals["image_tokens"] / t for t in epoch_s),
        "peak_memory_bytes": max(r["cuda_peak_bytes"] if gpu else r["peak_rss_bytes"] for r in runs),
        "peak_memory_kind": "cuda max_memory_allocated" if gpu else "peak RSS",
        "whole_command_s": statistics.median(r["wall_s"] for r in runs),
        "measured_steps": steps,
    }


METRICS = (
    "s_per_step",
    "samples_per_s",
    "text_tokens_per_s",
    "image_tokens_per_s",
    "peak_memory_bytes",
    "whole_command_s",
)


def checks(runs: dict[str, list[dict]], totals: dict, steps: int) -> dict:
    """Fairness: same LoRA modules; every epoch the same tokens and answer tokens on both sides (and the workload's);
    where the two sides' batches are the same (same counts at every step), the same per-step losses."""
    vl, ref = runs["vlmtune"], runs["reference"]

    def epochs_match(run: dict) -> bool:
        c = run["counts"]
        return len(c) % steps == 0 and all(
            sum(x["tokens"] for x in c[e : e + steps]) == totals["tokens"]
            and sum(x["label_tokens"] for x in c[e : e + steps]) == totals["label_tokens"]
            for e in range(0, len(c), steps)
        )

    def per_step(run: dict) -> list[tuple[int, int]]:
        return [(x["tokens"], x["label_tokens"]) for x in run["counts"]]

    same_batches = all(per_step(v) == per_step(r) for v, r in zip(vl, ref))  # same token counts at every step
    out = {
        "same_lora_modules": all(v["lora_modules"] == r["lora_modules"] for v, r in zip(vl, ref)),
        "lora_modules": len(ref[0]["lora_modules"]),
        "same_tokens_each_epoch": all(epochs_match(run) for run in vl + ref),
        "same_image_tokens_each_epoch": all(
            sum(x["image_tokens"] for x in r["counts"][-steps:]) == totals["image_tokens"] for r in ref
        ),
        "same_batches": same_batches,
        "first_epoch_mean_loss": [statistics.mean(vl[0]["loss"][:steps]), statistics.mean(ref[0]["loss"][:steps])],
    }
    if same_batches:
        losses = [(a, b) for v, r in zip(vl, ref) for a, b in zip(v["loss"], r["loss"])]
        out["max_rel_loss_difference"] = max(abs(a - b) / max(abs(b), 1e-12) for a, b in losses)
    return out


def table(name: str, result: dict) -> str:
    s = {side: result[side] for side in SIDES}
    gib = "GiB (peak RSS)" if s["vlmtune"]["peak_memory_kind"] == "peak RSS" else "GiB (CUDA peak alloc)"
    header = ("", "s/step", "per round", "samples/s", "text tok/s", "image tok/s", gib, "whole command s")
    rows = [header]
    for side in SIDES:
        r = s[side]
        rows.append(
            (
                side,
                f"{r['s_per_step']:.3f}",
                ", ".join(f"{x:.3f}" for x in r["round_s_per_step"]),
                f"{r['samples_per_s']:.2f}",
                f"{r['text_tokens_per_s']:.0f}",
                f"{r['image_tokens_per_s']:.0f}",
                f"{r['peak_memory_bytes'] / 2**30:.2f}",
                f"{r['whole_command_s']:.1f}",
            )
        )
    ratio = result["ratio"]
    rows.append(
        (
            "vlmtune/reference",
            f"{ratio['s_per_step']:.3f}",
            "",
            f"{ratio['samples_per_s']:.3f}",
            f"{ratio['text_tokens_per_s']:.3f}",
            f"{ratio['image_tokens_per_s']:.3f}",
            f"{ratio['peak_memory_bytes']:.3f}",
            f"{ratio['whole_command_s']:.3f}",
        )
    )
    lines = [f"workload {name}: {result['description']}", *text_table(rows)]
    c = result["checks"]
    lines.append(
        f"checks: same LoRA modules ({c['lora_modules']}): {c['same_lora_modules']}; same tokens and answer tokens "
        f"every epoch: {c['same_tokens_each_epoch']}; same image tokens: {c['same_image_tokens_each_epoch']}"
    )
    if c["same_batches"]:
        lines.append(
            f"same batches on both sides; max relative difference of their per-step losses "
            f"{c['max_rel_loss_difference']:.1e}"
        )
    else:
        lines.append(
            "batches differ (vlmtune groups samples by length, the reference takes the shuffled order); mean loss "
            f"over the first epoch: vlmtune {c['first_epoch_mean_loss'][0]:.4f}, reference {c['first_epoch_mean_loss'][1]:.4f}"
        )
    for side in SIDES:
        rounds = s[side]["round_s_per_step"]
        if max(rounds) > 1.2 * min(rounds):
            lines.append(
                f"warning: {side}'s rounds differ by {max(rounds) / min(rounds) - 1:.0%}: the machine was "
                "busy during some runs; rerun (or add --rounds) before trusting the ratios"
            )
    return "\n".join(lines)


def describe(preset: Preset, kind: str, totals: dict, steps: int, epochs: int, rounds: int) -> str:
    text = (totals["tokens"] - totals["image_tokens"]) / totals["samples"]
    image = totals["image_tokens"] / totals["samples"]
    what = (
        f"one {preset.fixed_side}x{preset.fixed_side} image + {preset.text_tokens} text tokens per sample"
        if kind == "fixed"
        else f"image sides {preset.variable_sides[0]}-{preset.variable_sides[-1]} px, answers 5-200 tokens, 1 in 4 samples with two images"
    )
    return (
        f"{what}; per sample {text:.0f} text + {image:.0f} image tokens on average; batch {preset.batch_size}, "
        f"{steps} steps per epoch, {epochs} epochs per run (the last one measured), {rounds} round(s) per side"
    )


def run_bench(
    preset_name: str = "cpu",
    workloads: tuple[str, ...] = ("fixed", "variable"),
    steps: int | None = None,
    rounds: int | None = None,
    epochs: int | None = None,
    out: Path | None = None,
    work: Path | None = None,
    overrides: tuple[str, ...] = (),
) -> dict:
    """Runs the benchmark, prints one table per workload and writes the JSON results; returns them.
    ``overrides`` (``key.path=value``) change vlmtune's side only."""
    from transformers import AutoProcessor

    preset = PRESETS[preset_name]
    steps, rounds, epochs = steps or preset.steps, rounds or preset.rounds, epochs or preset.epochs
    if epochs < 2:
        raise ValueError(f"--epochs {epochs}: at least 2 (the first is warm-up, the last is measured)")
    work = Path(work or tempfile.mkdtemp(prefix="vlmtune-bench-"))
    out = Path(out or work / "results.json")
    echo(f"vlmtune bench: preset {preset.name} ({preset.notes}); work folder {work}")
    if overrides:
        echo(f"vlmtune side's config changed by: {' '.join(overrides)}")
    model = ensure_model(preset, echo=echo)
    processor = AutoProcessor.from_pretrained(model)
    results = {
        "preset": preset.name,
        "notes": preset.notes,
        "machine": machine(),
        "command": " ".join(sys.argv),
        "steps_per_epoch": steps,
        "epochs": epochs,
        "rounds": rounds,
        "vlmtune_overrides": list(overrides),
        "workloads": {},
    }
    for kind in workloads:
        data = make_workload(preset, kind, preset.batch_size * steps, processor)
        order = epoch_orders(preset.batch_size * steps, preset.seed, epochs)
        totals = epoch_totals(data, processor)
        runs: dict[str, list[dict]] = {side: [] for side in SIDES}
        for r in range(rounds):
            for side in SIDES:
                echo(f"  {kind}: round {r + 1}/{rounds}, {side} ...")
                folder = work / f"{kind}-round{r + 1}-{side}"
                runs[side].append(
                    run_vlmtune(preset, model, data, steps * epochs, folder, overrides=overrides)
                    if side == "vlmtune"
                    else run_reference(preset, model, data, order, steps * epochs, folder)
                )
        result = {side: summarise(runs[side], totals, steps) for side in SIDES}
        result["ratio"] = {m: result["vlmtune"][m] / result["reference"][m] for m in METRICS}
        result["checks"] = checks(runs, totals, steps)
        result["totals_per_epoch"] = totals
        result["description"] = describe(preset, kind, totals, steps, epochs, rounds)
        result["runs"] = runs
        results["workloads"][kind] = result
        echo(table(kind, result))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1), encoding="utf-8")
    echo(f"wrote {out}")
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu",
        help="cpu (a few minutes on 2 cores), gpu-2b (Qwen2-VL-2B shape, bf16, batch 8) or tiny (seconds, for tests)",
    )
    p.add_argument("--workload", choices=["fixed", "variable", "both"], default="both", help="which workload(s) to run")
    p.add_argument(
        "--steps",
        type=int,
        help="optimizer steps per epoch; the workload has batch size x steps samples (default: the preset's)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        help="epochs per run, at least 2: all but the last are warm-up, the last is measured (default: the preset's)",
    )
    p.add_argument("--rounds", type=int, help="vlmtune/reference alternations per workload (default: the preset's)")
    p.add_argument("--out", type=Path, help="results JSON (default: WORK/results.json)")
    p.add_argument(
        "--work", type=Path, help="folder for the runs' configs, logs and outputs (default: a new temp folder)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change vlmtune's side of the comparison, as on the train command line (repeatable), "
        "e.g. --set train.packing=true",
    )
    p.add_argument(
        "--profile", action="store_true", help="where a step's time goes, per side (phase timers), instead of the table"
    )


def run_from_args(args: argparse.Namespace) -> int:
    workloads = ("fixed", "variable") if args.workload == "both" else (args.workload,)
    if args.profile:
        run_profile(args.preset, workloads[0], args.steps, args.epochs, args.work, tuple(args.overrides))
        return 0
    run_bench(args.preset, workloads, args.steps, args.rounds, args.epochs, args.out, args.work, tuple(args.overrides))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmtune.bench.command", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
