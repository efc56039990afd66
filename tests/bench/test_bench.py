"""`vlmtune bench`: the workloads are what they claim, the presets have the shapes they name, and a real run of
both sides (tiny preset) prints the table with ratios computed from the measured numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlmtune.bench.setup import PRESETS, build_processor, count_text_tokens, make_workload, model_config


@pytest.fixture(scope="module")
def processor():
    return build_processor(PRESETS["tiny"])


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_fixed_workload_has_exact_text_tokens_and_one_image(processor):
    preset = PRESETS["tiny"]
    path = make_workload(preset, "fixed", 6, processor)
    rows = _rows(path)
    assert len(rows) == 6
    from PIL import Image

    for row in rows:
        assert count_text_tokens(processor, row["messages"], 1) == preset.text_tokens
        assert len(row["images"]) == 1
        with Image.open(path.parent / row["images"][0]) as im:
            assert im.size == (preset.fixed_side, preset.fixed_side)


def test_variable_workload_answers_images_and_sizes(processor):
    preset = PRESETS["tiny"]
    path = make_workload(preset, "variable", 16, processor)
    rows = _rows(path)
    tok = processor.tokenizer
    answers = [len(tok(r["messages"][-1]["content"], add_special_tokens=False)["input_ids"]) for r in rows]
    assert all(5 <= n <= 200 for n in answers) and len(set(answers)) > 4
    assert sum(len(r["images"]) == 2 for r in rows) == 4  # a quarter
    from PIL import Image

    sizes = set()
    for r in rows:
        for name in r["images"]:
            with Image.open(path.parent / name) as im:
                assert im.height in preset.variable_sides and im.width in preset.variable_sides
                sizes.add(im.size)
    assert len(sizes) > 3


@pytest.mark.parametrize(
    "preset, params, vision",
    [
        ("gpu-2b", 2_208_985_600, 665_271_296),  # Qwen2-VL-2B-Instruct: 2.21B parameters, 665M in the vision tower
        ("cpu", 8_957_824, 2_793_088),
    ],
)
def test_preset_model_shapes_on_meta(processor, preset, params, vision):
    from transformers import Qwen2VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(model_config(PRESETS[preset].shape, processor.tokenizer))
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(p.numel() for n, p in model.named_parameters() if ".visual." in n) == vision
    assert model.config.tie_word_embeddings


@pytest.mark.slow
def test_bench_runs_both_sides_and_prints_ratios(tmp_path, capsys):
    from vlmtune.cli import main

    out = tmp_path / "results.json"
    assert (
        main(
            [
                "bench",
                "--preset",
                "tiny",
                "--workload",
                "fixed",
                "--steps",
                "3",
                "--epochs",
                "2",
                "--rounds",
                "1",
                "--out",
                str(out),
                "--work",
                str(tmp_path / "work"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "vlmtune/reference" in printed and "s/step" in printed and f"wrote {out}" in printed
    result = json.loads(out.read_text())["workloads"]["fixed"]
    totals = result["totals_per_epoch"]
    assert totals["samples"] == 6 and totals["image_tokens"] > 0
    for side in ("vlmtune", "reference"):
        run = result["runs"][side][0]
        assert len(run["step_s"]) == 6 and all(s > 0 for s in run["step_s"])
        assert run["peak_rss_bytes"] > 100 * 2**20
        assert result[side]["measured_steps"] == 3
        epoch_s = sum(run["step_s"][3:])  # the second (measured) epoch
        assert result[side]["s_per_step"] == pytest.approx(epoch_s / 3)
        assert result[side]["samples_per_s"] == pytest.approx(6 / epoch_s)
        assert result[side]["image_tokens_per_s"] == pytest.approx(totals["image_tokens"] / epoch_s)
    for metric, ratio in result["ratio"].items():
        assert ratio == pytest.approx(result["vlmtune"][metric] / result["reference"][metric])
    c = result["checks"]
    # Both sides trained the same thing: same wrapped modules, the same tokens each epoch, and (fixed-length
    # samples: length grouping keeps the shuffled order) the same batches with the same losses.
    assert c["same_lora_modules"] and c["lora_modules"] == 2 * 7 + 2
    assert c["same_tokens_each_epoch"] and c["same_image_tokens_each_epoch"]
    assert c["same_batches"] and c["max_rel_loss_difference"] < 1e-4
    assert f"{result['ratio']['s_per_step']:.3f}" in printed


@pytest.mark.slow
def test_bench_variable_workload_grouped_batches_same_epoch_tokens(tmp_path, capsys):
    """vlmtune groups the variable workload by length: different batches from the reference's, the same samples
    and tokens every epoch, and the table says the batches differ."""
    from vlmtune.bench.command import run_bench

    result = run_bench("tiny", ("variable",), steps=4, rounds=1, epochs=2, work=tmp_path / "work")["workloads"][
        "variable"
    ]
    c = result["checks"]
    assert c["same_tokens_each_epoch"] and c["same_image_tokens_each_epoch"] and c["same_lora_modules"]
    assert not c["same_batches"]
    assert "batches differ" in capsys.readouterr().out
    vl = [x["tokens"] for x in result["runs"]["vlmtune"][0]["counts"]]
    for epoch in (vl[:4], vl[4:]):  # one group of 8 samples per epoch, sorted longest first
        assert epoch == sorted(epoch, reverse=True)


@pytest.mark.slow
def test_bench_packed_vlmtune_matches_the_reference_step_by_step(tmp_path, capsys):
    """vlmtune packing the variable workload into one row per batch (shuffled order, as the reference takes it):
    the same batches as the plain padded loop and the same per-step losses, with no padding left."""
    from vlmtune.bench.command import run_bench

    overrides = ("train.packing=true", "train.group_by_length=false", "train.packing_length=4096")
    results = run_bench("tiny", ("variable",), steps=3, rounds=1, epochs=2, work=tmp_path / "work", overrides=overrides)
    assert results["vlmtune_overrides"] == list(overrides)
    assert "vlmtune side's config changed by: train.packing=true" in capsys.readouterr().out
    result = results["workloads"]["variable"]
    c = result["checks"]
    assert c["same_tokens_each_epoch"] and c["same_image_tokens_each_epoch"] and c["same_lora_modules"]
    assert c["same_batches"] and c["max_rel_loss_difference"] < 1e-4
    metrics = Path(result["runs"]["vlmtune"][0]["folder"]) / "run" / "metrics.jsonl"
    steps = [r for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    assert len(steps) == 6 and all(r["padding"] == 0.0 for r in steps)
