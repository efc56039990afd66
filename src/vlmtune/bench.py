"""`vlmtune bench`: vlmtune's trainer against a plain transformers + peft loop, same training, one command.

For each workload, the two sides run alternately in child processes (vlmtune, reference, vlmtune, reference, ...)
so that machine noise hits both. Side (a) is the real recipe: ``vlmtune train CONFIG`` with
``train.logging_steps=1``, its per-step time read from ``metrics.jsonl`` (``samples_per_s`` of each step's window:
data loading to the end of the optimizer step). Side (b) is ``vlmtune.bench_reference``, timed over the same
window. Both get the same model folder, dtype, attention kernel, LoRA targets, optimizer settings, seed, batch size
and the same samples in the same order. The first ``warmup`` steps of every run are dropped; figures are medians over
the remaining steps of all rounds. Peak memory is the child's peak RSS (``os.wait4``) on CPU, and
``torch.cuda.max_memory_allocated`` on a GPU. Checks printed under each table: both sides wrapped the same
modules, saw the same tokens and labels, and started from the same loss.

``--profile`` instead runs each side once with timers on the vision tower, language model, lm_head, backward and
optimizer (torch's global module and optimizer hooks, see ``vlmtune.bench_profile``) and prints where a step's time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from vlmtune.bench_setup import PRESETS, Preset, ensure_model, make_workload, vlmtune_config
from vlmtune.tracking import echo

SIDES = ("vlmtune", "reference")
_TRAINER = "import sys; from vlmtune.bench import trainer_child; sys.exit(trainer_child(sys.argv[1:]))"


def trainer_child(argv: list[str]) -> int:
    """``vlmtune train CONFIG`` in this process, then its peak GPU memory written to ``argv[1]``."""
    import torch

    from vlmtune.cli import main

    rc = main(["train", argv[0]])
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    Path(argv[1]).write_text(json.dumps({"rc": rc, "cuda_peak_bytes": peak}), encoding="utf-8")
    return rc


def machine() -> dict:
    """What the numbers were measured on."""
    import peft
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else platform.processor()
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_avg_at_start": os.getloadavg()[0]}


def spawn(cmd: list[str], log: Path) -> tuple[float, int]:
    """Runs a child with its output in ``log``; returns (wall seconds, peak RSS bytes) or raises with the log's end."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as f:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"benchmark child failed (exit {child.returncode}): {' '.join(cmd)}\n{tail}")
    return wall, usage.ru_maxrss * 1024  # Linux reports KiB


def adapter_modules(path: Path) -> list[str]:
    """Names of the modules a saved peft adapter holds LoRA weights for (its adapter_config.json may shorten them)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sorted({k.removeprefix("base_model.model.").rsplit(".lora_A.", 1)[0] for k in f.keys() if ".lora_A." in k})


def run_vlmtune(preset: Preset, model: Path, data: Path, steps: int, folder: Path, timed: bool = False) -> dict:
    """One vlmtune run in a child process (``timed``: with the phase timers of ``vlmtune.bench_profile``)."""
    folder.mkdir(parents=True)
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(vlmtune_config(preset, model, data, folder / "run", steps)), encoding="utf-8")
    start = [sys.executable, "-m", "vlmtune.bench_profile", "vlmtune"] if timed else [sys.executable, "-c", _TRAINER]
    wall, rss = spawn(start + [str(config), str(folder / "child.json")], folder / "log.txt")
    records = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    steps_done = [r for r in records if "loss" in r]
    child = json.loads((folder / "child.json").read_text())
    return {"step_s": [preset.batch_size / r["samples_per_s"] for r in steps_done], "loss": [r["loss"] for r in steps_done],
            "lora_modules": adapter_modules(folder / "run" / "final" / "adapter_model.safetensors"), "wall_s": wall,
            "peak_rss_bytes": rss, "cuda_peak_bytes": child.get("cuda_peak_bytes"), "folder": str(folder)}


def run_reference(preset: Preset, model: Path, data: Path, order: list[int], steps: int, folder: Path,
                  timed: bool = False) -> dict:
    """One reference run in a child process (``timed``: with the phase timers of ``vlmtune.bench_profile``)."""
    folder.mkdir(parents=True)
    spec = {"model": str(model), "data": str(data), "order": order, "steps": steps, "batch_size": preset.batch_size,
            "dtype": preset.dtype, "lr": preset.learning_rate, "rank": preset.lora_rank, "alpha": preset.lora_alpha,
            "seed": preset.seed, "out": str(folder / "result.json")}
    (folder / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    start = [sys.executable, "-m", "vlmtune.bench_profile", "reference"] if timed else [sys.executable, "-m", "vlmtune.bench_reference"]
    wall, rss = spawn(start + [str(folder / "spec.json")], folder / "log.txt")
    result = json.loads((folder / "result.json").read_text())
    return {"step_s": [s["s"] for s in result["steps"]], "loss": [s["loss"] for s in result["steps"]],
            "counts": [{k: s[k] for k in ("tokens", "image_tokens", "label_tokens")} for s in result["steps"]],
            "lora_modules": result["lora_modules"], "wall_s": wall, "peak_rss_bytes": rss,
            "cuda_peak_bytes": result["cuda_peak_bytes"], "folder": str(folder)}


def step_counts(data: Path, processor, order: list[int], batch_size: int, steps: int) -> list[dict]:
    """Real tokens, image tokens and answer (label) tokens of every step's batch, as vlmtune's dataset makes them."""
    from vlmtune.config import DataConfig
    from vlmtune.data.dataset import build_dataset

    ds = build_dataset(str(data), DataConfig(train=str(data), max_length=8192), processor, "train")
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    out = []
    for s in range(steps):
        items = [ds[i] for i in order[s * batch_size:(s + 1) * batch_size]]
        out.append({"tokens": sum(len(it["input_ids"]) for it in items),
                    "image_tokens": sum(it["input_ids"].count(image_id) for it in items),
                    "label_tokens": sum(sum(1 for x in it["labels"] if x != -100) for it in items)})
    return out


def summarise(runs: list[dict], counts: list[dict], warmup: int, batch_size: int) -> dict:
    """Medians over the measured steps of every round."""
    per_step = [(s, counts[i]) for run in runs for i, s in enumerate(run["step_s"]) if i >= warmup]
    gpu = runs[0]["cuda_peak_bytes"] is not None
    return {
        "s_per_step": statistics.median(s for s, _ in per_step),
        "round_medians": [statistics.median(run["step_s"][warmup:]) for run in runs],
        "samples_per_s": statistics.median(batch_size / s for s, _ in per_step),
        "text_tokens_per_s": statistics.median((c["tokens"] - c["image_tokens"]) / s for s, c in per_step),
        "image_tokens_per_s": statistics.median(c["image_tokens"] / s for s, c in per_step),
        "peak_memory_bytes": max(r["cuda_peak_bytes"] if gpu else r["peak_rss_bytes"] for r in runs),
        "peak_memory_kind": "cuda max_memory_allocated" if gpu else "peak RSS",
        "whole_command_s": statistics.median(r["wall_s"] for r in runs),
        "measured_steps": len(per_step),
    }


METRICS = ("s_per_step", "samples_per_s", "text_tokens_per_s", "image_tokens_per_s", "peak_memory_bytes", "whole_command_s")


def checks(runs: dict[str, list[dict]], counts: list[dict]) -> dict:
    """Fairness: same LoRA modules, same tokens and labels per step, same starting loss."""
    vl, ref = runs["vlmtune"], runs["reference"]
    losses = [(a, b) for v, r in zip(vl, ref) for a, b in zip(v["loss"], r["loss"])]
    return {"same_lora_modules": all(v["lora_modules"] == r["lora_modules"] for v, r in zip(vl, ref)),
            "lora_modules": len(ref[0]["lora_modules"]),
            "same_tokens_and_labels": all(r["counts"] == counts[:len(r["counts"])] for r in ref),
            "first_step_loss": [vl[0]["loss"][0], ref[0]["loss"][0]],
            "max_rel_loss_difference": max(abs(a - b) / max(abs(b), 1e-12) for a, b in losses)}


def table(name: str, result: dict) -> str:
    s = {side: result[side] for side in SIDES}
    gib = "GiB (peak RSS)" if s["vlmtune"]["peak_memory_kind"] == "peak RSS" else "GiB (CUDA peak alloc)"
    header = ("", "s/step", "round medians", "samples/s", "text tok/s", "image tok/s", gib, "whole command s")
    rows = [header]
    for side in SIDES:
        r = s[side]
        rows.append((side, f"{r['s_per_step']:.3f}", ", ".join(f"{x:.3f}" for x in r["round_medians"]),
                     f"{r['samples_per_s']:.2f}", f"{r['text_tokens_per_s']:.0f}", f"{r['image_tokens_per_s']:.0f}",
                     f"{r['peak_memory_bytes'] / 2**30:.2f}", f"{r['whole_command_s']:.1f}"))
    ratio = result["ratio"]
    rows.append(("vlmtune/reference", f"{ratio['s_per_step']:.3f}", "", f"{ratio['samples_per_s']:.3f}",
                 f"{ratio['text_tokens_per_s']:.3f}", f"{ratio['image_tokens_per_s']:.3f}",
                 f"{ratio['peak_memory_bytes']:.3f}", f"{ratio['whole_command_s']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [f"workload {name}: {result['description']}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(2, "  ".join("-" * w for w in widths))
    c = result["checks"]
    lines.append(f"checks: same LoRA modules ({c['lora_modules']}): {c['same_lora_modules']}; same tokens and labels per "
                 f"step: {c['same_tokens_and_labels']}; first-step loss vlmtune {c['first_step_loss'][0]:.5f} vs reference "
                 f"{c['first_step_loss'][1]:.5f}; max relative loss difference over all steps {c['max_rel_loss_difference']:.1e}")
    for side in SIDES:
        medians = s[side]["round_medians"]
        if max(medians) > 1.2 * min(medians):
            lines.append(f"warning: {side}'s round medians differ by {max(medians) / min(medians) - 1:.0%}: the machine was "
                         "busy during some runs; rerun (or add --rounds) before trusting the ratios")
    return "\n".join(lines)


def describe(preset: Preset, kind: str, counts: list[dict], steps: int, warmup: int, rounds: int) -> str:
    text = statistics.mean(c["tokens"] - c["image_tokens"] for c in counts) / preset.batch_size
    image = statistics.mean(c["image_tokens"] for c in counts) / preset.batch_size
    what = (f"one {preset.fixed_side}x{preset.fixed_side} image + {preset.text_tokens} text tokens per sample" if kind == "fixed"
            else f"image sides {preset.variable_sides[0]}-{preset.variable_sides[-1]} px, answers 5-200 tokens, 1 in 4 samples with two images")
    return (f"{what}; per sample {text:.0f} text + {image:.0f} image tokens on average; batch {preset.batch_size}, "
            f"{steps} steps per run ({warmup} warm-up dropped), {rounds} round(s) per side")


def run_bench(preset_name: str = "cpu", workloads: tuple[str, ...] = ("fixed", "variable"), steps: int | None = None,
              rounds: int | None = None, warmup: int | None = None, out: Path | None = None,
              work: Path | None = None) -> dict:
    """Runs the benchmark, prints one table per workload and writes the JSON results; returns them."""
    from transformers import AutoProcessor

    from vlmtune.sampler import EpochSampler

    preset = PRESETS[preset_name]
    steps, rounds = steps or preset.steps, rounds or preset.rounds
    warmup = preset.warmup if warmup is None else warmup
    if steps <= warmup:
        raise ValueError(f"--steps {steps} leaves nothing after {warmup} warm-up steps")
    work = Path(work or tempfile.mkdtemp(prefix="vlmtune-bench-"))
    out = Path(out or work / "results.json")
    echo(f"vlmtune bench: preset {preset.name} ({preset.notes}); work folder {work}")
    model = ensure_model(preset, echo=echo)
    processor = AutoProcessor.from_pretrained(model)
    results = {"preset": preset.name, "notes": preset.notes, "machine": machine(), "command": " ".join(sys.argv),
               "steps": steps, "warmup": warmup, "rounds": rounds, "workloads": {}}
    for kind in workloads:
        data = make_workload(preset, kind, preset.batch_size * steps, processor)
        order = EpochSampler(preset.batch_size * steps, preset.seed).order()  # the trainer's data order
        counts = step_counts(data, processor, order, preset.batch_size, steps)
        runs: dict[str, list[dict]] = {side: [] for side in SIDES}
        for r in range(rounds):
            for side in SIDES:
                echo(f"  {kind}: round {r + 1}/{rounds}, {side} ...")
                folder = work / f"{kind}-round{r + 1}-{side}"
                runs[side].append(run_vlmtune(preset, model, data, steps, folder) if side == "vlmtune"
                                  else run_reference(preset, model, data, order, steps, folder))
        result = {side: summarise(runs[side], counts, warmup, preset.batch_size) for side in SIDES}
        result["ratio"] = {m: result["vlmtune"][m] / result["reference"][m] for m in METRICS}
        result["checks"] = checks(runs, counts)
        result["description"] = describe(preset, kind, counts, steps, warmup, rounds)
        result["runs"] = runs
        results["workloads"][kind] = result
        echo(table(kind, result))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1), encoding="utf-8")
    echo(f"wrote {out}")
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="cpu (a few minutes on 2 cores), gpu-2b "
                   "(Qwen2-VL-2B shape, bf16, batch 8) or tiny (seconds, for tests)")
    p.add_argument("--workload", choices=["fixed", "variable", "both"], default="both", help="which workload(s) to run")
    p.add_argument("--steps", type=int, help="optimizer steps per run, warm-up included (default: the preset's)")
    p.add_argument("--warmup", type=int, help="first steps of each run left out of the medians (default: the preset's)")
    p.add_argument("--rounds", type=int, help="vlmtune/reference alternations per workload (default: the preset's)")
    p.add_argument("--out", type=Path, help="results JSON (default: WORK/results.json)")
    p.add_argument("--work", type=Path, help="folder for the runs' configs, logs and outputs (default: a new temp folder)")
    p.add_argument("--profile", action="store_true", help="where a step's time goes, per side (phase timers), instead of the table")


def run_from_args(args: argparse.Namespace) -> int:
    workloads = ("fixed", "variable") if args.workload == "both" else (args.workload,)
    if args.profile:
        from vlmtune.bench_profile import run_profile

        run_profile(args.preset, workloads[0], args.steps, args.warmup, args.work)
        return 0
    run_bench(args.preset, workloads, args.steps, args.rounds, args.warmup, args.out, args.work)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmtune.bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
