"""``python -m vlmtune.bench.memory``: the memory planner's predictions against measured peaks.

Each case trains for real in a child process (``vlmtune train`` on a generated workload, as ``vlmtune bench`` runs
it) and is predicted by the planner from its config alone (``vlmtune.commands.planner.plan_run``, the same path
as ``vlmtune doctor``). Measured: the child's peak RSS (``os.wait4``) on a CPU, ``torch.cuda.max_memory_allocated``
on a GPU. The models are random-weight Qwen2-VLs built in code (``vlmtune.bench.setup``), from 9M to 206M
parameters, so that the model's share is a large part of the process; the cases differ in model size, batch size,
image size, padding, and LoRA, full training, QLoRA (nf4), gradient checkpointing and a LoRA-trained vision tower.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml

from vlmtune.bench.runs import _TRAINER, spawn
from vlmtune.bench.setup import PRESETS, ModelShape, ensure_model, make_workload, vlmtune_config
from vlmtune.commands.planner import plan_run
from vlmtune.config.load import load_config
from vlmtune.config.stages import resolve_stages
from vlmtune.model.peak import gib
from vlmtune.tracking import echo, text_table

SHAPES = {  # text width, MLP, layers, heads, KV heads; vision width, depth, heads; vocabulary
    "9M": ModelShape(256, 1408, 4, 4, 2, 192, 4, 3, 4096),
    "48M": ModelShape(512, 2816, 6, 8, 2, 384, 6, 6, 8192),
    "206M": ModelShape(1024, 5632, 8, 16, 2, 512, 8, 8, 16384),
}
LORA_VISION = ("groups.vision_tower.mode=lora", "groups.vision_tower.rank=16", "groups.vision_tower.targets=all-linear")


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # a key of SHAPES
    batch: int
    side: int = 448  # image side in pixels (fixed workload)
    kind: str = "fixed"  # or variable: mixed image sizes and answer lengths, so batches are padded
    overrides: tuple[str, ...] = ()
    preset: str = "cpu"  # the bench preset giving dtype, text length and pixel bounds (gpu-2b: bf16, the 2B's shape)


CASES = (
    Case("9M LoRA", "9M", 4),
    Case("48M LoRA", "48M", 4),
    Case("48M LoRA, small images", "48M", 8, side=224),
    Case("48M full", "48M", 2, overrides=("groups.language_model.mode=full", "groups.projector.mode=full")),
    Case("48M QLoRA nf4", "48M", 4, overrides=("model.quantize=nf4",)),
    Case("48M LoRA, checkpointing", "48M", 8, overrides=("train.gradient_checkpointing=true",)),
    Case("48M vision LoRA", "48M", 2, overrides=LORA_VISION),
    Case("206M LoRA", "206M", 2),
    Case("206M LoRA, variable", "206M", 4, kind="variable"),
    Case("206M QLoRA nf4", "206M", 2, overrides=("model.quantize=nf4",)),
    Case("206M LoRA, checkpointing", "206M", 4, overrides=("train.gradient_checkpointing=true",)),
)
# On a GPU: the gpu-2b preset's model (Qwen2-VL-2B's shape, random weights, bf16), measured by max_memory_allocated.
GPU_CASES = (
    Case("2B LoRA bf16", "2B", 8, preset="gpu-2b"),
    Case("2B QLoRA nf4", "2B", 8, overrides=("model.quantize=nf4",), preset="gpu-2b"),
    Case("2B full projector", "2B", 8, overrides=("groups.projector.mode=full",), preset="gpu-2b"),
)


def run_case(case: Case, work: Path, steps: int) -> dict:
    """Trains the case in a child process and predicts it; returns both (bytes)."""
    from transformers import AutoProcessor

    base = PRESETS[case.preset]
    model_preset = base if case.preset != "cpu" else replace(base, name=f"mem-{case.model}", shape=SHAPES[case.model])
    data_preset = replace(
        model_preset, name=f"mem-{case.model}-{case.side}", fixed_side=case.side, batch_size=case.batch
    )
    model = ensure_model(model_preset, echo=echo)
    data = make_workload(data_preset, case.kind, case.batch * steps, AutoProcessor.from_pretrained(model))
    folder = work / case.name.replace(" ", "_").replace(",", "")
    folder.mkdir(parents=True)
    config = vlmtune_config(data_preset, model, data, folder / "run", steps, case.overrides)
    (folder / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    cfg = load_config(folder / "config.yaml", [], echo=lambda *a: None)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, _, plans = plan_run(cfg, resolve_stages(cfg), model, device, echo=echo)
    prediction = plans[0].prediction
    _, rss = spawn(
        [sys.executable, "-c", _TRAINER, str(folder / "config.yaml"), str(folder / "child.json")], folder / "log.txt"
    )
    cuda_peak = json.loads((folder / "child.json").read_text())["cuda_peak_bytes"]
    measured = cuda_peak if device.type == "cuda" else rss
    return {
        "case": case.name,
        "parameters": sum(f.params for f in plans[0].facts.values()),
        "batch": case.batch,
        "side": case.side,
        "kind": case.kind,
        "overrides": list(case.overrides),
        "device": device.type,
        "predicted_bytes": prediction.total,
        "measured_bytes": measured,
        "error": prediction.total / measured - 1,
        "prediction": prediction.to_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmtune.bench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (default 4)")
    parser.add_argument(
        "--cases", nargs="*", help="case names to run (default: every CPU case, or on a GPU the 2B ones)"
    )
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="vlmtune-memory-"))
    results = []
    cases = CASES + GPU_CASES if args.cases else (GPU_CASES if torch.cuda.is_available() else CASES)
    unknown = sorted(set(args.cases or ()) - {c.name for c in cases})
    if unknown:
        parser.error(f"unknown case(s) {unknown}; valid: {[c.name for c in cases]}")
    for case in cases:
        if args.cases and case.name not in args.cases:
            continue
        echo(f"{case.name}: training {args.steps} steps in a child process ...")
        results.append(run_case(case, work, args.steps))
        r = results[-1]
        echo(f"  predicted {gib(r['predicted_bytes'])}, measured {gib(r['measured_bytes'])} ({r['error']:+.1%})")
    what = "peak RSS" if results and results[0]["device"] == "cpu" else "max_memory_allocated"
    rows = [("case", "parameters", "batch", "image", "predicted GiB", f"measured {what} GiB", "error")]
    for r in results:
        image = f"{r['side']}px" if r["kind"] == "fixed" else "112-448px"
        rows.append(
            (
                r["case"],
                f"{r['parameters'] / 1e6:.0f}M",
                r["batch"],
                image,
                f"{r['predicted_bytes'] / 2**30:.2f}",
                f"{r['measured_bytes'] / 2**30:.2f}",
                f"{r['error']:+.1%}",
            )
        )
    echo("\n".join(text_table(rows)))
    if results:
        worst = max(results, key=lambda r: abs(r["error"]))
        echo(
            f"worst error: {worst['error']:+.1%} ({worst['case']}); {sum(abs(r['error']) <= 0.15 for r in results)}/{len(results)} within 15%"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1), encoding="utf-8")
        echo(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
