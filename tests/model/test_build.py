"""build_model: one model for every stage, the plan of each stage, and family checks before any training."""

from __future__ import annotations

import pytest
import torch

from vlmtune.config.errors import ConfigError
from vlmtune.config.load import load_config
from vlmtune.config.stages import resolve_stages
from vlmtune.model.build import build_model
from vlmtune.model.tuning import activate

CPU = torch.device("cpu")


def _staged(tmp_path, tiny_dir, *overrides):
    config = tmp_path / "staged.yaml"
    config.write_text(
        "stages:\n  - {name: align, steps: 1, groups: {language_model: {mode: frozen}}}\n  - {name: joint, steps: 1}\n",
        encoding="utf-8",
    )
    return load_config(config, [f"model.path={tiny_dir}", *overrides])


def test_lora_of_every_stage_is_injected_once_and_each_stage_trains_its_own_groups(tmp_path, tiny_dir):
    cfg = _staged(tmp_path, tiny_dir)
    stages = resolve_stages(cfg)
    built = build_model(cfg, stages, tiny_dir, CPU)
    assert [p.mode for p in built.stage_plans[0] if p.group == "language_model"] == ["frozen"]
    assert {p.group: p.mode for p in built.union} == {
        "vision_tower": "frozen",
        "projector": "full",
        "language_model": "lora",
        "lm_head": "frozen",
    }
    names = {n for n, _ in built.model.named_parameters()}
    assert any("language_model" in n and "lora_A" in n for n in names)  # injected for the joint stage
    lora = {n for n in names if "lora_" in n}
    assert lora and lora <= built.trained_params
    assert {built.gmap.group_of(n) for n in built.trained_params - lora} == {"projector"}
    activate(built.model, built.gmap, built.stage_plans[0])
    trains = {built.gmap.group_of(n) for n, p in built.model.named_parameters() if p.requires_grad}
    assert trains == {"projector"}
    activate(built.model, built.gmap, built.stage_plans[1])
    trains = {built.gmap.group_of(n) for n, p in built.model.named_parameters() if p.requires_grad}
    assert trains == {"projector", "language_model"}


def test_a_setting_the_family_cannot_honour_is_a_config_error_naming_the_key(tmp_path):
    from tests.tiny_families import save_family

    folder = save_family("llava", tmp_path / "llava")
    cfg = load_config(None, [f"model.path={folder}", "train.packing=true"])
    with pytest.raises(ConfigError) as e:
        build_model(cfg, resolve_stages(cfg), folder, CPU)
    (problem,) = e.value.problems
    assert problem.startswith("'train.packing': model_type 'llava' (llava) has no per-sample M-RoPE positions")
    assert "qwen2_vl, qwen2_5_vl, qwen3_vl" in problem and str(folder) in str(e.value)
