"""`vlmtune bench --profile`: where one training step's time goes, for vlmtune and for the reference loop.

Both sides run once more with the same timers installed in their process before anything else: torch's global
module forward hooks (vision tower, language model, lm_head, the whole model) and global optimizer step hooks, so
neither side's code is changed and both are measured the same way. Per step: the gap from the previous optimizer
step's end to this forward's start (data loading, collation, moving the batch, the loop's own work), each forward
part, the time from the forward's end to the optimizer step (loss outside the model, backward, clipping, logging
of gradient norms), and the optimizer step. On a GPU every hook synchronises first. Medians over the steps of
the last epoch.
"""

from __future__ import annotations

import atexit
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from vlmtune.bench import reference
from vlmtune.bench.runs import epoch_orders, last_epoch, run_reference, run_vlmtune, trainer_child
from vlmtune.bench.setup import PRESETS, ensure_model, make_workload
from vlmtune.tracking import echo, text_table

ENV = "VLMTUNE_BENCH_TIMERS"  # where a child writes its per-step phase times
PHASES = (
    "data, collation, loop",
    "vision tower forward",
    "language model forward",
    "lm_head (logits)",
    "rest of forward (embeddings, M-RoPE, loss in forward)",
    "loss outside forward + backward + clipping",
    "optimizer step",
)


def install_timers(out: str) -> None:
    """Registers the global hooks and writes every step's phase times to ``out`` at exit."""
    import torch
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    from transformers.models.qwen2_vl import modeling_qwen2_vl as q

    def now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    kinds = {
        q.Qwen2VLForConditionalGeneration: "forward",
        q.Qwen2VisionTransformerPretrainedModel: "vision",
        q.Qwen2VLTextModel: "language",
    }
    state = {"step": {}, "starts": {}, "lm_head": None, "last_end": None}
    steps: list[dict] = []

    def kind_of(module) -> str | None:
        if module is state["lm_head"]:
            return "lm_head"
        return kinds.get(type(module))

    def pre(module, args):
        kind = kind_of(module)
        if kind is None or not module.training:
            return
        if kind == "forward":
            state["lm_head"] = module.lm_head
        state["starts"][kind] = now()

    def post(module, args, output):
        kind = kind_of(module)
        if kind is None or kind not in state["starts"] or not module.training:
            return
        t = now()
        state["step"][kind] = state["step"].get(kind, 0.0) + t - state["starts"].pop(kind)
        if kind == "forward":
            state["step"]["forward_start"] = t - state["step"]["forward"]
            state["step"]["forward_end"] = t

    def opt_pre(optimizer, args, kwargs):
        state["step"]["opt_start"] = now()

    def opt_post(optimizer, args, kwargs):
        s, end = state["step"], now()
        if "forward_start" in s and state["last_end"] is not None:
            steps.append(
                {
                    PHASES[0]: s["forward_start"] - state["last_end"],
                    PHASES[1]: s.get("vision", 0.0),
                    PHASES[2]: s.get("language", 0.0),
                    PHASES[3]: s.get("lm_head", 0.0),
                    PHASES[4]: s["forward"] - s.get("vision", 0.0) - s.get("language", 0.0) - s.get("lm_head", 0.0),
                    PHASES[5]: s["opt_start"] - s["forward_end"],
                    PHASES[6]: end - s["opt_start"],
                }
            )
        state["step"], state["last_end"] = {}, end

    register_module_forward_pre_hook(pre)
    register_module_forward_hook(post)
    register_optimizer_step_pre_hook(opt_pre)
    register_optimizer_step_post_hook(opt_post)
    atexit.register(lambda: Path(out).write_text(json.dumps(steps), encoding="utf-8"))


def timed_child(argv: list[str]) -> int:
    """``python -c ... SIDE ARGS``: installs the timers, then runs the trainer child or the reference."""
    install_timers(os.environ[ENV])
    side, rest = argv[0], argv[1:]
    if side == "vlmtune":
        return trainer_child(rest)
    return reference.main(rest)


def run_profile(
    preset_name: str,
    kind: str,
    steps: int | None,
    epochs: int | None,
    work: Path | None,
    overrides: tuple[str, ...] = (),
) -> dict:
    """Runs each side once with the timers on one workload, prints the phase table, writes ``WORK/profile.json``."""
    from transformers import AutoProcessor

    preset = PRESETS[preset_name]
    steps, epochs = steps or preset.steps, epochs or preset.epochs
    work = Path(work or tempfile.mkdtemp(prefix="vlmtune-profile-"))
    model = ensure_model(preset, echo=echo)
    data = make_workload(preset, kind, preset.batch_size * steps, AutoProcessor.from_pretrained(model))
    order = epoch_orders(preset.batch_size * steps, preset.seed, epochs)
    result = {}
    for side in ("vlmtune", "reference"):
        echo(f"  timing the phases of {side}, {epochs} epochs of {steps} steps ...")
        folder = work / f"profile-{side}"
        os.environ[ENV] = str(work / f"phases-{side}.json")
        run = (
            run_vlmtune(preset, model, data, steps * epochs, folder, timed=True, overrides=overrides)
            if side == "vlmtune"
            else run_reference(preset, model, data, order, steps * epochs, folder, timed=True)
        )
        del os.environ[ENV]
        per_step = json.loads((work / f"phases-{side}.json").read_text())[-steps:]  # the last epoch
        phases = {p: statistics.median(s[p] for s in per_step) for p in PHASES}
        result[side] = {
            "s_per_step": statistics.median(last_epoch(run, steps)),
            "phases": phases,
            "steps_measured": len(per_step),
        }
    rows = [("phase (median per step)", "vlmtune s", "share", "reference s", "share")]
    for p in (*PHASES, "step"):
        v = result["vlmtune"]["s_per_step"] if p == "step" else result["vlmtune"]["phases"][p]
        r = result["reference"]["s_per_step"] if p == "step" else result["reference"]["phases"][p]
        rows.append(
            (
                p,
                f"{v:.4f}",
                f"{v / result['vlmtune']['s_per_step']:.0%}",
                f"{r:.4f}",
                f"{r / result['reference']['s_per_step']:.0%}",
            )
        )
    lines = text_table(rows)
    echo(
        f"profile: preset {preset.name}, workload {kind}, medians over the last of {epochs} epochs of {steps} steps "
        "(phase medians need not add up to the step median)"
    )
    echo("\n".join(lines))
    (work / "profile.json").write_text(json.dumps({"preset": preset.name, "workload": kind, **result}, indent=1))
    echo(f"wrote {work / 'profile.json'}")
    return result


if __name__ == "__main__":
    sys.exit(timed_child(sys.argv[1:]))
