"""`vlmtune doctor` (vlmtune.commands.doctor): passes on the quickstart recipe, fails with the right message on broken setups.

Broken setups are built from the tiny random Qwen2-VL (real model, real processor, real images): a projector
whose output width is wrong, a projector whose output is detached, a processor that makes the wrong number of
image tokens, a vision tower narrower than the projector expects, a frozen group that receives gradients.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from vlmtune.checks import CheckResult, check_gradient_flow, check_gradients, forward_backward, group_grad_norms
from vlmtune.commands.doctor import batch_of, check_lora_settings, check_memory, doctor, run_checks
from vlmtune.config.load import load_config
from vlmtune.data.dataset import VLMDataset
from vlmtune.data.sharegpt import Sample
from vlmtune.model.groups import assign_groups
from vlmtune.model.load import arch_for
from vlmtune.model.tuning import apply_plan, build_plan

ROOT = Path(__file__).resolve().parents[2]
ASSETS = Path(__file__).parents[1] / "assets"
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
SAMPLES = [
    Sample(
        messages=[("user", "<image>What color is the shape?"), ("assistant", c)],
        images=[ASSETS / f],
        where=f"d.jsonl:{i}",
    )
    for i, (f, c) in enumerate(
        [("red_square.png", "red"), ("blue_circle.png", "blue"), ("big_gray.png", "gray")], start=1
    )
]
CPU = torch.device("cpu")
# The seed's recipe (LoRA on the projector, alpha = 2 x rank), which most checks below break a LoRA layer of; the
# quickstart trains the projector fully.
SEED_LORA = [
    "groups.projector.mode=lora",
    "groups.projector.rank=16",
    "groups.projector.alpha=32",
    "groups.projector.targets=all-linear",
    "groups.language_model.alpha=32",
]


def _setup(tiny_dir, overrides=(), break_model=None, break_processor=None, seed_lora=True):
    """(model, processor, gmap, plans, items, wheres) as the doctor builds them, with an optional break before planning."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg = load_config(QUICKSTART, [f"model.path={tiny_dir}", *(SEED_LORA if seed_lora else []), *overrides])
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    processor = AutoProcessor.from_pretrained(tiny_dir)
    if break_model:
        break_model(model)
    if break_processor:
        break_processor(processor)
    gmap = assign_groups([n for n, _ in model.named_parameters()], arch_for(model, cfg.model))
    plans = build_plan(model, gmap, cfg)
    model = apply_plan(model, gmap, plans)
    ds = VLMDataset(SAMPLES, processor, cfg.data, split="eval")
    return model, processor, gmap, plans, [ds[i] for i in range(len(ds))], [it.sample.where for it in ds.items]


def _by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


def _run(setup) -> dict[str, CheckResult]:
    model, processor, gmap, plans, items, wheres = setup
    return _by_name(
        run_checks(model, processor, gmap, plans, items, wheres, CPU, max_length=256, batch_size=len(items))
    )


@pytest.mark.parametrize("seed_lora", [False, True], ids=["quickstart", "seed-lora-projector"])
def test_quickstart_recipe_passes_every_check(tiny_dir, seed_lora):
    results = _run(_setup(tiny_dir, seed_lora=seed_lora))
    assert {n: r.status for n, r in results.items()} == {
        "dimensions: vision tower -> projector": "PASS",
        "dimensions: projector -> language model": "PASS",
        "dimensions: image tokens": "PASS",
        "gradient flow": "PASS",
        "LoRA settings": "PASS",
        "memory": "PASS",
    }
    assert results["dimensions: image tokens"].lines == [
        "d.jsonl:1: 16 image tokens = 16 features for grid(s) [[1, 8, 8]]"
    ]
    assert results["gradient flow"].lines[0].endswith("frozen and gradient-free: vision_tower, lm_head")


def test_projector_output_wider_than_the_language_model_fails(tiny_dir):
    def widen(model):
        old = model.model.visual.merger.mlp[2]
        model.model.visual.merger.mlp[2] = nn.Linear(old.in_features, old.out_features + 8)

    results = _run(_setup(tiny_dir, break_model=widen))
    dims = results["dimensions: projector -> language model"]
    assert dims.status == "FAIL"
    assert dims.lines[0] == (
        "projector output width 136 does not match the language model's hidden size 128 (model.visual.merger)"
    )
    assert results["gradient flow"].status == "FAIL"  # the model cannot even run a step
    assert results["dimensions: vision tower -> projector"].status == "PASS"


def test_vision_tower_narrower_than_the_projector_input_fails(tiny_dir):
    def narrow_input(model):
        merger = model.model.visual.merger
        merger.ln_q = nn.LayerNorm(72, eps=1e-6)

    results = _run(_setup(tiny_dir, break_model=narrow_input))
    dims = results["dimensions: vision tower -> projector"]
    assert dims.status == "FAIL"
    assert (
        dims.lines[0]
        == "vision tower output width 64 does not match the projector's input width 72 (model.visual.merger.ln_q)"
    )


def test_detached_projector_output_fails_naming_the_projector(tiny_dir):
    model, processor, gmap, plans, items, wheres = _setup(tiny_dir)
    model.get_base_model().model.visual.merger.register_forward_hook(lambda module, args, out: out.detach())
    result = check_gradient_flow(model, batch_of(items, processor, CPU), gmap, plans)
    assert result.status == "FAIL"
    assert result.lines[0].startswith("gradients do not reach projector: norm 0 over its 4 trainable tensor(s)")
    assert not any("language_model" in line and "do not reach" in line for line in result.lines)
    assert all(p.grad is None for p in model.parameters())  # the check leaves no gradients behind


def test_processor_making_the_wrong_number_of_image_tokens_fails(tiny_dir):
    def merge_one(processor):
        processor.image_processor.merge_size = 1  # 4 tokens per merged feature: a processor from another model

    results = _run(_setup(tiny_dir, break_processor=merge_one))
    tokens = results["dimensions: image tokens"]
    assert tokens.status == "FAIL"
    assert tokens.lines[0].startswith(
        "d.jsonl:1: 64 image placeholder tokens but the vision path produces 16 features "
        "for its image grid(s) [[1, 8, 8]]"
    )
    assert results["dimensions: projector -> language model"].status == "PASS"


def test_frozen_group_that_receives_gradients_fails(tiny_dir):
    model, processor, gmap, plans, items, _ = _setup(tiny_dir)
    for name, p in model.named_parameters():
        if gmap.group_of(name) == "vision_tower":
            p.requires_grad_(True)
    result = check_gradient_flow(model, batch_of(items, processor, CPU), gmap, plans)
    assert result.status == "FAIL"
    assert result.lines[0].startswith("frozen group vision_tower receives gradients (")


def test_non_finite_gradients_fail(tiny_dir):
    model, processor, gmap, plans, items, _ = _setup(tiny_dir)
    with torch.no_grad():
        model.get_base_model().model.visual.merger.mlp[0].lora_B["default"].weight.fill_(float("nan"))
    result = check_gradient_flow(model, batch_of(items, processor, CPU), gmap, plans)
    assert result.status == "FAIL" and "gradients of projector are not finite" in result.lines[0]


def test_group_grad_norms_and_judging_existing_gradients(tiny_dir):
    model, processor, gmap, plans, items, _ = _setup(tiny_dir)
    loss, activations = forward_backward(model, batch_of(items, processor, CPU))
    assert math.isfinite(loss) and activations > 0
    norms = group_grad_norms(model, gmap)
    assert list(norms) == ["projector", "language_model"]
    manual = math.sqrt(
        sum(
            float(p.grad.pow(2).sum())
            for n, p in model.named_parameters()
            if p.grad is not None and gmap.group_of(n) == "projector"
        )
    )
    assert norms["projector"] == pytest.approx(manual, rel=1e-6) and norms["projector"] > 0
    assert check_gradients(model, gmap, plans).status == "PASS"
    assert any(p.grad is not None for p in model.parameters())  # judging does not clear them


@pytest.mark.parametrize(
    "overrides, status, fragment",
    [
        (
            ["groups.projector.alpha=4"],
            "WARN",
            "groups.projector: alpha/rank = 0.25 (alpha 4, rank 16); the usual start is alpha = 2 x rank (32)",
        ),
        (["groups.projector.dropout=0.1"], "WARN", "groups.projector.dropout = 0.1: on the vision path"),
        (["groups.language_model.dropout=0.1"], "PASS", "language_model r16/alpha 32/dropout 0.1"),
        (
            ["groups.language_model.rank=100", "groups.language_model.alpha=200"],
            "FAIL",
            "groups.language_model.rank = 100 is larger than the width min(in, out) of 4 layer(s): "
            "model.language_model.layers.0.self_attn.k_proj (64)",
        ),
    ],
    ids=["alpha-far-from-2x", "dropout-on-projector", "dropout-on-language-model", "rank-above-width"],
)
def test_lora_settings(tiny_dir, overrides, status, fragment):
    model, _, _, plans, _, _ = _setup(tiny_dir, overrides)
    result = check_lora_settings(model, plans)
    assert result.status == status
    assert any(fragment in line for line in result.lines), result.lines


def test_memory_estimate_fails_when_the_batch_cannot_fit(tiny_dir):
    model, processor, gmap, plans, items, _ = _setup(tiny_dir)
    batch = batch_of(items, processor, CPU)
    _, activations = forward_backward(model, batch)
    fits = check_memory(model, activations, batch, CPU, 256, 3)
    assert fits.status == "PASS" and "activations" in fits.lines[0]
    too_big = check_memory(model, 2**50, batch, CPU, 256, 3)  # a petabyte of activations
    assert too_big.status == "FAIL"


def test_doctor_command_on_the_quickstart_recipe(tiny_dir, capsys):
    cfg = load_config(QUICKSTART, [f"model.path={tiny_dir}", "train.batch_size=4", "data.builtin_train_samples=8"])
    assert doctor(cfg) == 0
    out = capsys.readouterr().out
    for fragment in (
        "environment",
        "transformers ",
        "device cpu",
        "training dtype: float32",
        "projector       full    3: ln_q, mlp.0, mlp.2",
        "optimizer group projector",
        "lr=3.00e-03",
        "PASS  gradient flow",
        "all checks passed",
    ):
        assert fragment in out, fragment


def test_doctor_checks_the_plan_of_every_stage(tiny_dir, tmp_path, capsys):
    """A staged config is checked as its stages run: the projector-only stage first (the language model's LoRA is
    injected but must get no gradient), then the joint stage."""
    config = tmp_path / "staged.yaml"
    config.write_text(
        "stages:\n"
        "  - {name: align, steps: 2, groups: {language_model: {mode: frozen}}}\n"
        "  - {name: joint, steps: 2, groups: {projector: {lr: 1.0e-4}}}\n",
        encoding="utf-8",
    )
    cfg = load_config(config, [f"model.path={tiny_dir}", "train.batch_size=2", "data.builtin_train_samples=4"])
    assert doctor(cfg) == 0
    out = capsys.readouterr().out
    align, joint = out.split("stage 1/2 'align'")[1].split("stage 2/2 'joint'")
    assert "language_model  frozen" in align and "optimizer group language_model" not in align
    assert "optimizer group language_model" in joint and "lr=1.00e-04" in joint
    assert align.count("PASS  gradient flow") == 1 and joint.count("PASS  gradient flow") == 1
    assert "all checks passed" in joint


@pytest.mark.slow
def test_cli_doctor_on_the_quickstart_config_with_the_builtin_base(base_dir, capsys):
    from vlmtune.cli import main

    assert main(["doctor", str(QUICKSTART), "data.builtin_train_samples=16"]) == 0
    assert "all checks passed" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_doctor_exits_1_on_a_failure(tiny_dir, capsys):
    from vlmtune.cli import main

    assert (
        main(
            [
                "doctor",
                str(QUICKSTART),
                f"model.path={tiny_dir}",
                "groups.language_model.rank=100",
                "data.builtin_train_samples=8",
                "train.batch_size=2",
            ]
        )
        == 1
    )
    out = capsys.readouterr().out
    assert "FAIL  LoRA settings: groups.language_model.rank = 100" in out and "1 check(s) failed: LoRA settings" in out
