"""The memory planner's parts on the tiny random Qwen2-VL (vlmtune.model.memory, vlmtune.model.peak,
vlmtune.commands.planner, vlmtune.commands.fitting): weights and trainable parameters against counts worked out by
hand from the config, activations against the tensors autograd really saves, monotonic in batch and image size,
``--fit``, ``--json`` and ``train.batch_size: auto``. The host's share is given (``Host()``: none), so no child
process runs here; its measurement runs in ``python -m vlmtune.bench.memory``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from vlmtune.commands.doctor import doctor
from vlmtune.commands.fitting import fit, parse_size, resolve_batch_size
from vlmtune.commands.planner import Item, Workload, model_plan, plan_run, predict
from vlmtune.config.errors import ConfigError
from vlmtune.config.load import load_config
from vlmtune.config.schema import TrainConfig
from vlmtune.config.stages import resolve_stages
from vlmtune.data.dataset import VLMDataset
from vlmtune.data.sharegpt import Sample
from vlmtune.model.build import build_model
from vlmtune.model.memory import Batch, Settings, activations, quantized_bytes
from vlmtune.model.peak import Host
from vlmtune.train.loader import make_loader
from vlmtune.train.loss import answer_loss

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
ASSETS = Path(__file__).parents[1] / "assets"
CPU = torch.device("cpu")
NONE = Host()  # no host share: the model's own bytes only
QUIET = lambda *a: None  # noqa: E731


def _cfg(tiny_dir, *overrides):
    return load_config(QUICKSTART, [f"model.path={tiny_dir}", "data.builtin_train_samples=16", *overrides], echo=QUIET)


def _by_hand(config) -> dict[str, int]:
    """Parameters per group from the config's sizes (Qwen2-VL's layers written out)."""
    t, v = config.text_config, config.vision_config
    h, i, vocab = t.hidden_size, t.intermediate_size, t.vocab_size
    kv = t.num_key_value_heads * (h // t.num_attention_heads)
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h  # q, k, v (biases), o, MLP, two norms
    d, m = v.embed_dim, int(v.embed_dim * v.mlp_ratio)
    patch = d * v.in_channels * v.temporal_patch_size * v.patch_size**2  # Conv3d, no bias
    block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)  # norms, qkv, proj, fc1, fc2
    w = d * v.spatial_merge_size**2
    return {
        "vision_tower": patch + v.depth * block,
        "projector": 2 * d + (w * w + w) + (w * h + h),
        "language_model": vocab * h + t.num_hidden_layers * layer + h,
        "lm_head": vocab * h,
    }


def test_weights_and_trainable_parameters_per_group_match_counts_by_hand(tiny_dir):
    cfg = _cfg(tiny_dir)
    mp = model_plan(cfg, resolve_stages(cfg), tiny_dir, CPU)
    facts = mp.stage_facts[0]
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_dir)
    for group, params in _by_hand(config).items():
        assert facts[group].params == params, group
        assert facts[group].weight_bytes == 4 * params, group  # float32 on a CPU
    t = config.text_config
    h, r = t.hidden_size, 16
    kv = t.num_key_value_heads * (h // t.num_attention_heads)
    assert facts["projector"].trainable == facts["projector"].params  # trained fully (the quickstart)
    attention = r * (h + h) + 2 * r * (h + kv) + r * (h + h)  # q, k, v, o
    assert facts["language_model"].trainable == t.num_hidden_layers * attention
    assert facts["vision_tower"].trainable == facts["lm_head"].trainable == 0
    # ... which is what peft really makes trainable
    built = build_model(cfg, resolve_stages(cfg), tiny_dir, CPU, echo=QUIET)
    assert {p.group: p.trainable_params for p in built.union} == {g: f.trainable for g, f in facts.items()}


def test_gradients_and_adamw_states_are_4_and_8_bytes_per_trainable_parameter(tiny_dir):
    cfg = _cfg(tiny_dir, "groups.lm_head.mode=full")
    mp, _, plans = plan_run(cfg, resolve_stages(cfg), tiny_dir, CPU, host=NONE, echo=QUIET)
    rows = {r.group: r for r in plans[0].prediction.groups}
    for group in ("projector", "language_model", "lm_head"):
        n = plans[0].facts[group].trainable
        assert n > 0 and rows[group].gradients == 4 * n and rows[group].optimizer == 8 * n
    assert rows["lm_head"].trained == rows["lm_head"].weights  # peft's modules_to_save copy beside the original
    assert rows["vision_tower"].gradients == rows["vision_tower"].optimizer == 0


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_quantized_weights_match_what_bitsandbytes_holds(tiny_dir, quantize):
    pytest.importorskip("bitsandbytes")
    cfg = _cfg(tiny_dir, f"model.quantize={quantize}")
    stages = resolve_stages(cfg)
    facts = model_plan(cfg, stages, tiny_dir, CPU).stage_facts[0]
    built = build_model(cfg, stages, tiny_dir, CPU, echo=QUIET)
    lm = 0  # the language model's bytes as bitsandbytes holds them: packed weights, their constants, the rest
    for name, module in built.model.named_modules():
        if ".lora_" in name or built.gmap.group_of(name) != "language_model":
            continue
        lm += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
        weight = module._parameters.get("weight")  # its own (a peft wrapper forwards its base layer's)
        state = getattr(weight, "quant_state", None)
        if state is not None:  # 4-bit: absmax per block (with double quantization: its own absmax and codes)
            nested = [state.state2.absmax, state.state2.code] if state.state2 is not None else []
            lm += sum(t.numel() * t.element_size() for t in [state.absmax, state.code, *nested])
        if getattr(weight, "SCB", None) is not None:  # int8: a scale per output row
            lm += weight.SCB.numel() * weight.SCB.element_size()
    assert facts["language_model"].weight_bytes == pytest.approx(lm, rel=0.01)
    assert (
        quantized_bytes(4096, 64, "nf4", False) == 2048 + 4 * 64 + 64
    )  # half a byte a weight, a float per 64, the code


def _saved_bytes(model, batch) -> int:
    """Bytes of the tensors the forward saves for the backward (each storage once, parameters and buffers not)."""
    skip = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = answer_loss(model, batch)
    loss.backward()
    return sum(saved.values())


@pytest.mark.parametrize(
    "overrides",
    [
        (),  # the quickstart: projector LoRA, language-model attention LoRA
        ("groups.language_model.targets=all-linear",),
        ("groups.language_model.mode=full", "groups.projector.mode=full"),
        ("groups.language_model.mode=frozen",),  # the projector only: the backward still crosses the language model
        ("groups.vision_tower.mode=lora", "groups.vision_tower.targets=all-linear"),
    ],
)
def test_predicted_activations_match_what_autograd_saves(tiny_dir, overrides):
    cfg = _cfg(tiny_dir, *overrides)
    stages = resolve_stages(cfg)
    mp = model_plan(cfg, stages, tiny_dir, CPU)
    built = build_model(cfg, stages, tiny_dir, CPU, echo=QUIET)
    samples = [
        Sample([("user", f"<image>What color is the shape?{' Look.' * k}"), ("assistant", c)], [ASSETS / f], f"d:{k}")
        for k, (f, c) in enumerate([("red_square.png", "red"), ("blue_circle.png", "blue"), ("big_gray.png", "gray")])
    ]
    ds = VLMDataset(samples, built.processor, cfg.data, split="eval")
    batch = next(iter(make_loader(ds, built.processor, 3, False, 0, 0)))
    rows, length = batch["input_ids"].shape
    answers = int((batch["labels"][:, 1:] != -100).sum())
    patches = batch["pixel_values"].shape[0]
    b = Batch(rows, length, answers, patches, padded=True, vision_tokens=patches // mp.vision.merge)
    acts = activations(mp.text, mp.vision, mp.stage_facts[0], b, Settings("cpu", 4, vision_runs=True))
    predicted = sum(t.total for t in acts.kept)
    measured = _saved_bytes(built.model, batch)
    assert predicted == pytest.approx(measured, rel=0.1), (predicted, measured)


def test_predictions_grow_with_batch_size_and_image_size(tiny_dir):
    from transformers import AutoProcessor

    cfg = _cfg(tiny_dir)
    stages = resolve_stages(cfg)
    mp = model_plan(cfg, stages, tiny_dir, CPU)
    processor = AutoProcessor.from_pretrained(tiny_dir)
    items = [Item(40 + 7 * k, 5 + k, [(96 + 16 * k, 128)], None) for k in range(8)]
    work = Workload(items, processor, None)
    st = Settings("cpu", 4, vision_runs=True)
    by_batch = [predict(mp, mp.stage_facts[0], work, st, NONE, b).total for b in (1, 2, 4, 8)]
    assert by_batch == sorted(by_batch) and len(set(by_batch)) == 4
    by_pixels = [predict(mp, mp.stage_facts[0], work, st, NONE, 4, px).total for px in (32 * 32, 64 * 64, 128 * 128)]
    assert by_pixels == sorted(by_pixels) and len(set(by_pixels)) == 3
    assert work.batch(4).length == max(it.text + sum(work.image_tokens(it, None)) for it in items)  # the longest


def _peaks(tiny_dir, cfg) -> dict[int, int]:
    mp, _, plans = plan_run(cfg, resolve_stages(cfg), tiny_dir, CPU, host=NONE, echo=QUIET)
    return {b: predict(mp, plans[0].facts, plans[0].work, plans[0].settings, NONE, b).total for b in (1, 2, 4, 8)}


def test_fit_splits_the_global_batch_when_the_capacity_is_small(tiny_dir):
    cfg = _cfg(tiny_dir, "train.batch_size=8")
    peaks = _peaks(tiny_dir, cfg)
    capacity = int((peaks[2] + peaks[4]) / 2 / 0.9)
    best, tried = fit(cfg, tiny_dir, CPU, capacity, NONE, echo=QUIET)
    assert (best.batch_size, best.grad_accum, best.checkpointing) == (2, 4, False)
    assert best.overrides(cfg) == ["train.batch_size=2", "train.grad_accum=4"]
    assert best.peak <= 0.9 * capacity < next(o.peak for o in tried if o.batch_size == 8)
    roomy, _ = fit(cfg, tiny_dir, CPU, 100 * peaks[8], NONE, echo=QUIET)
    assert roomy.batch_size == 8 and roomy.overrides(cfg) == []


def test_batch_size_auto_resolves_to_what_fits(tiny_dir):
    peaks = _peaks(tiny_dir, _cfg(tiny_dir))
    capacity = int((peaks[2] + peaks[4]) / 2 / 0.9)
    every = resolve_batch_size(_cfg(tiny_dir, "train.batch_size=auto:8"), tiny_dir, CPU, QUIET, capacity, NONE)
    assert (every.train.batch_size, every.train.grad_accum) == (2, 4)
    largest = resolve_batch_size(_cfg(tiny_dir, "train.batch_size=auto"), tiny_dir, CPU, QUIET, capacity, NONE)
    assert largest.train.batch_size in (2, 3) and largest.train.grad_accum == 1
    fixed = _cfg(tiny_dir, "train.batch_size=4")
    assert resolve_batch_size(fixed, tiny_dir, CPU, QUIET, capacity, NONE) is fixed
    with pytest.raises(ConfigError, match="--fit"):
        resolve_batch_size(_cfg(tiny_dir, "train.batch_size=auto"), tiny_dir, CPU, QUIET, peaks[1] // 2, NONE)
    with pytest.raises(ConfigError, match="grad_accum"):
        resolve_batch_size(_cfg(tiny_dir, "train.batch_size=auto:8", "train.grad_accum=2"), tiny_dir, CPU, QUIET)


@pytest.mark.parametrize(
    "value, expected",
    [(8, 8), ("8", 8), ("auto", "auto"), ("auto:32", "auto:32"), ("auto:0", None), ("big", None), (0, None)],
)
def test_batch_size_values(value, expected):
    if expected is None:
        with pytest.raises(ValidationError):
            TrainConfig(batch_size=value)
    else:
        assert TrainConfig(batch_size=value).batch_size == expected


@pytest.mark.parametrize(
    "text, n", [("24GiB", 24 * 2**30), ("500MiB", 500 * 2**20), ("1.5g", 3 * 2**29), ("4096", 4096)]
)
def test_parse_size(text, n):
    assert parse_size(text) == n


def test_doctor_writes_the_prediction_as_json(tiny_dir, tmp_path, capsys):
    out = tmp_path / "memory.json"
    cfg = _cfg(tiny_dir, "train.batch_size=4")
    assert doctor(cfg, fit_to=2**30, json_path=out, host=NONE) == 0
    report = json.loads(out.read_text())
    stage = report["stages"][0]
    assert set(stage["groups"]) == {"vision_tower", "projector", "language_model", "lm_head"}
    facts = model_plan(cfg, resolve_stages(cfg), tiny_dir, CPU).stage_facts[0]
    assert {g: r["weights"] for g, r in stage["groups"].items()} == {g: f.weight_bytes for g, f in facts.items()}
    assert stage["total_bytes"] == max(stage["moments"].values()) and stage["batch"]["rows"] == 4
    assert report["fit"]["best"]["peak_bytes"] <= 0.9 * 2**30
    printed = capsys.readouterr().out
    assert "PASS  memory plan: predicted peak" in printed and "under 90% of 1.00 GiB" in printed


@pytest.mark.slow
def test_vlmtune_train_resolves_batch_size_auto_and_saves_the_numbers(tiny_dir, tmp_path, capsys):
    """The CLI end to end: the host's share measured by its child process, auto:4 resolved before the first step
    (RAM holds 4 samples of the tiny model many times over), the resolved numbers in the run's config.yaml."""
    import yaml

    from vlmtune.cli import main

    out = tmp_path / "run"
    args = ["train", str(QUICKSTART), f"model.path={tiny_dir}", "data.eval=null", "data.builtin_train_samples=8"]
    args += ["train.batch_size=auto:4", "train.max_steps=1", f"train.output_dir={out}", "train.progress_bar=false"]
    assert main(args) == 0
    assert "train.batch_size: auto:4 -> 4 (grad_accum 1: 4 samples per optimizer step)" in capsys.readouterr().out
    saved = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert (saved["batch_size"], saved["grad_accum"]) == (4, 1)
