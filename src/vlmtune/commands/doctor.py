"""`vlmtune doctor`: the environment, the resolved plan, then checks that each report PASS, WARN or FAIL.

The checks follow the usual VLM troubleshooting list: feature dimensions match (vision tower -> projector ->
language model, and image tokens = image features), gradients reach every trained group and no frozen one,
LoRA settings are sensible (alpha near 2 x rank), and the configured batch fits the device. The gradient and
dimension checks live in ``vlmtune.checks`` (training runs the gradient one at each stage's first step too).
"""

from __future__ import annotations

import json
import platform
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from vlmtune.builtin.base import model_folder
from vlmtune.checks import CheckResult, check_dimensions, check_gradients, forward_backward, gib, inner_model
from vlmtune.commands.fitting import fit, parse_size, resolve_batch_size
from vlmtune.commands.planner import device_memory, plan_run
from vlmtune.config.load import load_config
from vlmtune.config.schema import Config
from vlmtune.config.stages import resolve_stages
from vlmtune.data.collate import collate, expanded_image_token
from vlmtune.data.dataset import VLMDataset
from vlmtune.data.sharegpt import Sample
from vlmtune.data.sources import iter_split
from vlmtune.model.build import build_model
from vlmtune.model.groups import GroupMap
from vlmtune.model.load import resolve_dtype
from vlmtune.model.peak import Host, Prediction, table
from vlmtune.model.tuning import GroupPlan, activate, plan_table
from vlmtune.tracking import echo
from vlmtune.train.optim import describe, param_groups

# ---------------------------------------------------------------------------------------------
# LoRA settings and memory
# ---------------------------------------------------------------------------------------------

VISION_PATH = ("vision_tower", "projector")


def check_lora_settings(model: nn.Module, plans: list[GroupPlan]) -> CheckResult:
    """Flags alpha/rank far from the usual 2x (WARN), dropout on the vision path (WARN) and a rank larger
    than a wrapped layer's width (FAIL: such a rank adds parameters but no capacity)."""
    inner = inner_model(model)
    warns, fails = [], []
    for p in plans:
        if p.mode != "lora":
            continue
        ratio = p.alpha / p.rank
        if not 1.0 <= ratio <= 4.0:
            warns.append(
                f"groups.{p.group}: alpha/rank = {ratio:g} (alpha {p.alpha:g}, rank {p.rank}); the usual start is "
                f"alpha = 2 x rank ({2 * p.rank}), and scaling far from it changes the effective learning rate"
            )
        if p.dropout > 0 and p.group in VISION_PATH:
            warns.append(
                f"groups.{p.group}.dropout = {p.dropout:g}: on the vision path every image patch's input is copied and "
                f"masked at each of the {len(p.modules)} wrapped layer(s), where most of the tokens are, which costs "
                "time and memory; keep dropout for language_model LoRA, or set 0 here"
            )
        narrow = []
        for name in p.modules:
            module = inner.get_submodule(name)
            width = min(getattr(module, "in_features", p.rank), getattr(module, "out_features", p.rank))
            if p.rank > width:
                narrow.append(f"{name} ({width})")
        if narrow:
            fails.append(
                f"groups.{p.group}.rank = {p.rank} is larger than the width min(in, out) of {len(narrow)} layer(s): "
                f"{', '.join(narrow[:4])}{' ...' if len(narrow) > 4 else ''}; the update cannot exceed that rank, "
                "so use a rank at most the smallest width"
            )
    if fails:
        return CheckResult("LoRA settings", "FAIL", fails + warns)
    if warns:
        return CheckResult("LoRA settings", "WARN", warns)
    lora = [f"{p.group} r{p.rank}/alpha {p.alpha:g}/dropout {p.dropout:g}" for p in plans if p.mode == "lora"]
    return CheckResult("LoRA settings", "PASS", [", ".join(lora) or "no LoRA group"])


def check_memory(
    model: nn.Module, activation_bytes: int, batch: dict, device: torch.device, max_length: int, batch_size: int
) -> CheckResult:
    """Weights + gradients + AdamW state (two tensors per trainable one) + activations measured on the batch,
    against the device's memory (FAIL above 90%); a batch of max_length samples is estimated too (WARN)."""
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    total = weights + 3 * grads + activation_bytes
    capacity = device_memory(device)
    rows, tokens = batch["input_ids"].shape
    lines = [
        f"{gib(total)} of {gib(capacity)} on {device}: weights {gib(weights)} + gradients {gib(grads)} + AdamW state "
        f"{gib(2 * grads)} + activations {gib(activation_bytes)} (batch of {rows} sample(s) padded to {tokens} tokens, "
        "measured from what the forward saves for backward)"
    ]
    if rows < batch_size:
        lines.append(f"the data gave {rows} sample(s) for a configured batch of {batch_size}")
    worst = weights + 3 * grads + activation_bytes * (batch_size * max_length) / max(1, rows * tokens)
    lines.append(f"a batch of {batch_size} sample(s) all at data.max_length={max_length} would need about {gib(worst)}")
    if total > 0.9 * capacity:
        return CheckResult("memory", "FAIL", lines)
    return CheckResult("memory", "WARN" if worst > 0.9 * capacity else "PASS", lines)


def check_memory_plan(p: Prediction) -> CheckResult:
    """The planner's predicted peak (``vlmtune.commands.planner``) against the device's memory: FAIL above it, WARN
    above 90% of it; the lines are the prediction's table."""
    lines = [
        f"predicted peak {gib(p.total)} of {gib(p.capacity)} on {p.device} ({p.total / p.capacity:.0%})",
        *table(p),
    ]
    if p.total > p.capacity:
        return CheckResult("memory plan", "FAIL", lines + ["`vlmtune doctor CONFIG --fit` proposes settings that fit"])
    return CheckResult("memory plan", "WARN" if not p.fits() else "PASS", lines)


def fit_lines(
    cfg: Config, folder: Path, device: torch.device, capacity: int, host: Host, echo
) -> tuple[list[str], dict]:
    """``--fit``: the best setting that fits ``capacity``, as overrides, and what was tried (for --json)."""
    best, tried = fit(cfg, folder, device, capacity, host, echo=echo)
    current = next((o for o in tried if not o.overrides(cfg)), None)
    lines = [f"fit: the setting with the best throughput whose peak stays under 90% of {gib(capacity)}"]
    if current is not None:
        lines.append(
            f"  as configured: peak {gib(current.peak)}{'' if current.peak <= 0.9 * capacity else ' (does not fit)'}"
        )
    if best is None:
        lines.append(
            "  nothing fits: not with one sample per micro-batch, checkpointing, nf4 and images at 1/16 of their pixels"
        )
        return lines, {"capacity_bytes": capacity, "best": None}
    changes = best.overrides(cfg)
    lines.append(
        f"  best: {' '.join(changes) or '(the config as it is)'}: peak {gib(best.peak)}, micro-batch {best.batch_size} "
        f"x grad_accum {best.grad_accum}, relative time per sample {best.cost:.2f}"
    )
    data = {"capacity_bytes": capacity, "best": {"overrides": changes, "peak_bytes": best.peak, "cost": best.cost}}
    return lines, data


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def environment_lines(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Versions, the device and which dtypes it supports."""
    import accelerate
    import peft
    import torchvision
    import transformers

    versions = [
        f"python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"torchvision {torchvision.__version__}",
        f"transformers {transformers.__version__}",
        f"peft {peft.__version__}",
        f"accelerate {accelerate.__version__}",
    ]
    lines = [", ".join(versions)]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(
            f"device {device}: {props.name}, {gib(props.total_memory)}, compute capability {props.major}.{props.minor}"
        )
        lines.append(
            f"dtypes: bfloat16 {'supported' if torch.cuda.is_bf16_supported() else 'not supported'}, float16 supported"
        )
    else:
        lines.append(
            f"device cpu: {torch.get_num_threads()} thread(s), {gib(device_memory(device))} RAM, "
            f"instruction set {torch.backends.cpu.get_cpu_capability()}; no CUDA device"
        )
        lines.append("dtypes: float32 (bfloat16 runs on CPU, slowly without AVX512-BF16/AMX)")
    lines.append(f"training dtype: {str(dtype).removeprefix('torch.')}")
    return lines


def first_items(cfg, processor, n: int) -> tuple[list[dict], list[str]]:
    """Up to ``n`` checked, processed samples from the start of the train split (not augmented), and their places.
    Whatever the method, each is read as a conversation (a pair's chosen answer, a labelled answer as it is): the
    checks here are about shapes and gradients, which the answers' text does not change."""
    samples = []
    for got in iter_split(cfg.data.train, cfg.data, "train"):
        if isinstance(got, Sample):
            samples.append(replace(got, rejected=None, kto_label=None))
            if len(samples) == n:
                break
    ds = VLMDataset(samples, processor, cfg.data.model_copy(update={"on_bad_sample": "skip"}), split="eval")
    return [ds[i] for i in range(len(ds))], [it.sample.where for it in ds.items]


def batch_of(items: list[dict], processor, device: torch.device) -> dict:
    """Collated and on the device, as the training loader makes it."""
    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    video = getattr(processor, "video_token", None)
    batch = collate(
        items,
        pad_id,
        tok.convert_tokens_to_ids(processor.image_token),
        tok.convert_tokens_to_ids(video) if video else None,
    )
    return {k: v.to(device) for k, v in batch.items()}


def run_checks(
    model: nn.Module,
    processor,
    gmap: GroupMap,
    plans: list[GroupPlan],
    items: list[dict],
    wheres: list[str],
    device: torch.device,
    max_length: int,
    batch_size: int,
) -> list[CheckResult]:
    """Every check on a built, planned model and real processed samples."""
    image_token_id = processor.tokenizer.convert_tokens_to_ids(expanded_image_token(processor))
    with_image = next((i for i, it in enumerate(items) if "pixel_values" in it), 0)
    results = check_dimensions(
        model, gmap, batch_of(items[with_image : with_image + 1], processor, device), image_token_id, wheres[with_image]
    )
    batch = batch_of(items, processor, device)
    activations = 0
    try:
        _, activations = forward_backward(model, batch)
        results.append(check_gradients(model, gmap, plans))
    except Exception as e:  # a dimension problem usually shows up here too
        results.append(
            CheckResult("gradient flow", "FAIL", [f"forward/backward on a batch of {len(items)} failed: {e}"])
        )
    finally:
        for p in model.parameters():
            p.grad = None
    results.append(check_lora_settings(model, plans))
    results.append(check_memory(model, activations, batch, device, max_length, batch_size))
    return results


def doctor(
    cfg: Config, echo=print, fit_to: int | None = None, json_path: Path | None = None, host: Host | None = None
) -> int:
    """The command: environment, then per stage the plan the stage runs, its predicted memory and every check.
    Returns 1 if any check FAILs, else 0. The model is built as ``vlmtune train`` builds it (``build_model``), stages
    included. ``fit_to``: also propose settings that fit this many bytes (0: the device's memory); ``json_path``:
    write the predictions there; ``host``: the CPU process's share (measured when None)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    echo("environment")
    for line in environment_lines(device, resolve_dtype(cfg.model.dtype, device)):
        echo(f"  {line}")
    folder = model_folder(cfg.model, echo=echo)
    cfg = resolve_batch_size(cfg, folder, device, echo=echo)
    stages = resolve_stages(cfg)
    _, host, memory = plan_run(cfg, stages, folder, device, host=host, echo=echo)
    built = build_model(cfg, stages, folder, device, echo=echo)
    model, gmap, processor = built.model.to(device), built.gmap, built.processor
    echo(f"\nplan: {type(model).__name__} ({gmap.arch.name}, layout {gmap.layout.name})")
    failed = []
    for stage, plans, sp in zip(stages, built.stage_plans, memory):
        activate(model, gmap, plans)
        if stage.named:
            echo(f"\nstage {stage.index + 1}/{len(stages)} '{stage.name}'")
        echo(plan_table(plans))
        for line in describe(param_groups(model, gmap, plans)):
            echo(line)
        scfg = stage.cfg
        items, wheres = first_items(scfg, processor, scfg.train.batch_size)
        if not items:
            echo("\nFAIL  data: no usable sample at the start of data.train (run `vlmtune data check` on it)")
            return 1
        echo("\nchecks")
        results = run_checks(
            model, processor, gmap, plans, items, wheres, device, scfg.data.max_length, scfg.train.batch_size
        )
        results.append(check_memory_plan(sp.prediction))
        for r in results:
            echo(str(r))
        failed += [r.name if not stage.named else f"{r.name} ({stage.name})" for r in results if r.status == "FAIL"]
    report = {"stages": [{"stage": sp.stage.name, **sp.prediction.to_dict()} for sp in memory], "fit": None}
    if fit_to is not None:
        lines, report["fit"] = fit_lines(cfg, folder, device, fit_to or device_memory(device), host, echo)
        echo("\n" + "\n".join(lines))
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=1), encoding="utf-8")
        echo(f"\nwrote the memory prediction to {json_path}")
    echo(f"\n{len(failed)} check(s) failed: {', '.join(failed)}" if failed else "\nall checks passed")
    return 1 if failed else 0


def command(args) -> int:
    """``vlmtune doctor CONFIG [overrides] [--fit [SIZE]] [--json PATH]``."""
    fit_to = None if args.fit is None else (0 if args.fit == "device" else parse_size(args.fit))
    cfg = load_config(args.config, args.overrides, echo=echo)
    return doctor(cfg, echo=echo, fit_to=fit_to, json_path=args.json)
