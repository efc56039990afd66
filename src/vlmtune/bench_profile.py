"""`vlmtune bench --profile`: where one training step's time goes, for vlmtune and for the reference loop.

Each side runs under cProfile twice on the same data, once for ``steps`` and once for ``warmup + 1`` steps; the
difference of the two runs' cumulative times, divided by the difference in steps, is the time per steady-state step
of each phase (start-up, model loading and the first steps cancel out). cProfile adds a cost to every Python call,
so Python-heavy phases (data collation, the peft wrappers) read somewhat high; compare shares, and the two sides
with each other, rather than with the unprofiled s/step.
"""

from __future__ import annotations

import inspect
import json
import pstats
import tempfile
from pathlib import Path

from vlmtune.bench import run_reference, run_vlmtune
from vlmtune.bench_setup import PRESETS, ensure_model, make_workload
from vlmtune.tracking import echo


def _key(fn) -> tuple[str, int, str]:
    code = inspect.unwrap(fn).__code__
    return code.co_filename, code.co_firstlineno, code.co_name


def phase_keys() -> dict[str, tuple[str, int, str]]:
    """The functions whose cumulative time makes each phase."""
    import torch
    from torch.utils.data.dataloader import _BaseDataLoaderIter
    from transformers.models.qwen2_vl import modeling_qwen2_vl as q

    from vlmtune.doctor import group_grad_norms

    try:  # vlmtune computes the answer loss itself where it keeps logits only at label positions
        from vlmtune.loss import answer_loss
    except ImportError:
        answer_loss = q.Qwen2VLForConditionalGeneration.forward
    return {
        "answer_loss": _key(answer_loss),
        "data": _key(_BaseDataLoaderIter.__next__),
        "forward": _key(q.Qwen2VLForConditionalGeneration.forward),
        "inner": _key(q.Qwen2VLModel.forward),
        "vision": _key(q.Qwen2VisionTransformerPretrainedModel.forward),
        "language": _key(q.Qwen2VLTextModel.forward),
        "backward": _key(torch.autograd.backward),
        "clip": _key(torch.nn.utils.clip_grad_norm_),
        "optimizer": _key(torch.optim.AdamW.step),
        "grad_norms": _key(group_grad_norms),
    }


def cumulative(profile: Path, keys: dict[str, tuple]) -> dict[str, float]:
    stats = pstats.Stats(str(profile)).stats
    return {name: stats[k][3] if k in stats else 0.0 for name, k in keys.items()}


def phases(long: dict[str, float], short: dict[str, float], steps: int) -> dict[str, float]:
    """Per-step seconds of each reported phase."""
    d = {k: (long[k] - short[k]) / steps for k in long}
    return {
        "data loading + collation": d["data"],
        "vision tower forward": d["vision"],
        "language model forward": d["language"],
        "embeddings, M-RoPE index, image merge": d["inner"] - d["vision"] - d["language"],
        "lm_head (logits) + loss": max(d["forward"], d["answer_loss"]) - d["inner"],
        "backward": d["backward"],
        "clip_grad_norm_": d["clip"],
        "optimizer step (AdamW)": d["optimizer"],
        "per-group grad norms (logging)": d["grad_norms"],
    }


def run_profile(preset_name: str, kind: str, steps: int | None, warmup: int | None, work: Path | None) -> dict:
    """Profiles both sides on one workload, prints the phase table and writes ``WORK/profile.json``."""
    from transformers import AutoProcessor

    from vlmtune.sampler import EpochSampler

    preset = PRESETS[preset_name]
    steps = steps or preset.steps
    short = (preset.warmup if warmup is None else warmup) + 1
    if steps - short < 2:
        raise ValueError(f"--profile needs --steps at least {short + 2}")
    work = Path(work or tempfile.mkdtemp(prefix="vlmtune-profile-"))
    model = ensure_model(preset, echo=echo)
    data = make_workload(preset, kind, preset.batch_size * steps, AutoProcessor.from_pretrained(model))
    order = EpochSampler(preset.batch_size * steps, preset.seed).order()
    keys = phase_keys()
    result = {}
    for side in ("vlmtune", "reference"):
        runs = {}
        for n in (steps, short):
            echo(f"  profiling {side}, {n} steps ...")
            folder = work / f"profile-{side}-{n}"
            runs[n] = (run_vlmtune(preset, model, data, n, folder, profile=True) if side == "vlmtune"
                       else run_reference(preset, model, data, order, n, folder, profile=True))
            runs[n]["cumulative"] = cumulative(folder / "profile.out", keys)
        per_step = sum(runs[steps]["step_s"][short:]) / (steps - short)
        parts = phases(runs[steps]["cumulative"], runs[short]["cumulative"], steps - short)
        parts["other (loop, hooks, accelerate, logging)"] = per_step - sum(parts.values())
        result[side] = {"s_per_step_profiled": per_step, "phases": parts}
    rows = [("phase", "vlmtune s", "share", "reference s", "share")]
    for name in result["vlmtune"]["phases"]:
        v, r = result["vlmtune"]["phases"][name], result["reference"]["phases"][name]
        rows.append((name, f"{v:.4f}", f"{v / result['vlmtune']['s_per_step_profiled']:.0%}",
                     f"{r:.4f}", f"{r / result['reference']['s_per_step_profiled']:.0%}"))
    rows.append(("step (profiled)", f"{result['vlmtune']['s_per_step_profiled']:.4f}", "100%",
                 f"{result['reference']['s_per_step_profiled']:.4f}", "100%"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    echo(f"profile: preset {preset.name}, workload {kind}, per step over steps {short + 1}-{steps} (cProfile)")
    echo("\n".join(lines))
    (work / "profile.json").write_text(json.dumps({"preset": preset.name, "workload": kind, **result}, indent=1))
    echo(f"wrote {work / 'profile.json'}")
    return result
