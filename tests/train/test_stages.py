"""Stages as data: config checks, and a real two-stage run on the builtin base."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vlmtune.config.errors import ConfigError
from vlmtune.config.load import load_config
from vlmtune.config.stages import resolve_stages


def _write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return path


TWO_STAGES = """
groups:
  projector: {mode: lora, rank: 8, lr: 3.0e-3}
  language_model: {mode: lora, rank: 8, targets: attention, lr: 1.0e-3}
train: {learning_rate: 1.0e-4, max_steps: 7}
stages:
  - {name: align, steps: 3, groups: {language_model: {mode: frozen}}}
  - {name: joint, epochs: 2, learning_rate: 5.0e-4, groups: {projector: {lr: 2.0e-3}}, data: {train: other.jsonl}}
"""


def test_stage_configs_merge_over_the_top_level(tmp_path):
    stages = resolve_stages(load_config(_write(tmp_path, TWO_STAGES)))
    assert [s.name for s in stages] == ["align", "joint"]
    align, joint = stages[0].cfg, stages[1].cfg
    assert align.group("language_model").mode == "frozen" and align.group("projector").mode == "lora"
    assert align.train.max_steps == 3 and align.group_lr("projector") == 3e-3
    assert joint.group("language_model").mode == "lora" and joint.group("language_model").targets == "attention"
    assert joint.train.max_steps is None and joint.train.epochs == 2
    assert joint.group_lr("projector") == 2e-3 and joint.group_lr("vision_tower") == 5e-4
    assert joint.data.train == "other.jsonl" and align.data.train != "other.jsonl"


def test_no_stages_is_one_unnamed_stage(tmp_path):
    (stage,) = resolve_stages(load_config(None))
    assert stage.name == "train" and not stage.named


@pytest.mark.parametrize(
    "stages, fragments",
    [
        ("[{name: a, steps: 2}, {name: a, steps: 2}]", ["stages[1] (a)", "already used"]),
        ("[{name: final, steps: 2}]", ["'final' is reserved"]),
        ("[{name: checkpoint-3}]", ["'checkpoint-3' is reserved"]),
        ("[{name: align.tmp}]", ["'align.tmp' is reserved"]),
        ("[{name: joint.old}]", ["'joint.old' is reserved"]),
        ("[{name: config.yaml}]", ["'config.yaml' is reserved"]),
        ("[{name: metrics.jsonl}]", ["'metrics.jsonl' is reserved"]),
        ("[{name: data_report-x.json}]", ["'data_report-x.json' is reserved"]),
        ("[{name: trainer_state}]", ["'trainer_state' is reserved"]),
        ("[{name: 'bad name', steps: 2}]", ["stages.0.name"]),
        ("[{name: a, stepz: 2}]", ["stages.0.stepz", "did you mean 'steps'"]),
        ("[{name: a, groups: {projektor: {mode: full}}}]", ["projektor", "did you mean 'projector'"]),
        (
            "[{name: a, groups: {projector: {mode: frozen}, language_model: {mode: frozen}}}]",
            ["stages[0] (a)", "every group is frozen"],
        ),
        (
            "[{name: a, groups: {language_model: {mode: full}}}, {name: b}]",
            ["groups.language_model is lora in one stage and full in another"],
        ),
        (
            "[{name: a, groups: {language_model: {rank: 4}}}, {name: b}]",
            ["groups.language_model", "rank 4", "rank 16", "stages[1] (b)"],
        ),
        ("[{name: a, groups: {projector: {mode: lora, modee: x}}}]", ["stages[0] (a)", "groups.projector.modee"]),
    ],
)
def test_stage_problems_name_the_stage_and_key(tmp_path, stages, fragments):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, f"stages: {stages}\n"))
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))


def test_stage_may_change_mode_between_frozen_and_lora_and_its_rate(tmp_path):
    cfg = load_config(
        _write(
            tmp_path,
            "stages: [{name: a, groups: {language_model: {mode: frozen}}}, {name: b, groups: {language_model: {lr: 0.1, dropout: 0.1}}}]\n",
        )
    )
    assert [s.cfg.group("language_model").mode for s in resolve_stages(cfg)] == ["frozen", "lora"]


def _lora(sd: dict, group_key: str) -> dict:
    return {k: v for k, v in sd.items() if group_key in k and "lora_" in k}


@pytest.mark.slow
def test_two_stage_run_trains_projector_then_language_model(base_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from vlmtune.cli import main

    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "examples/progressive.yaml",
            f"train.output_dir={out}",
            # the projector as LoRA (the example trains it fully): its adapter must carry over between stages
            "groups.projector.mode=lora",
            "groups.projector.rank=16",
            "groups.projector.targets=all-linear",
            "stages.0.steps=4",
            "stages.1.steps=4",
            "train.batch_size=4",
            "train.save_steps=null",
            "train.eval_steps=null",
            "train.logging_steps=1",
            "data.builtin_train_samples=32",
            "data.builtin_eval_samples=8",
            "train.progress_bar=false",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "stage 1/2 'align': trains projector (lora); frozen: vision_tower, language_model, lm_head" in text
    assert "stage 'align': language_model (frozen) changed 0 of 16 tensors (0 parameters)" in text
    assert "stage 'joint': language_model (lora) changed 16 of 16 tensors (28,672 parameters)" in text

    align = load_file(out / "align" / "adapter_model.safetensors")
    joint = load_file(out / "joint" / "adapter_model.safetensors")
    final = load_file(out / "final" / "adapter_model.safetensors")
    # Stage 1: projector LoRA trained (B moved off zero); language-model LoRA untouched (B still zero).
    assert all(v.abs().sum() > 0 for k, v in _lora(align, "merger").items() if "lora_B" in k)
    assert all(v.abs().sum() == 0 for k, v in _lora(align, "language_model").items() if "lora_B" in k)
    # Stage 2: both changed, and projector continued from stage 1 (not re-initialised).
    for k in _lora(joint, "merger"):
        assert not torch.equal(align[k], joint[k]), k
    assert all(v.abs().sum() > 0 for k, v in _lora(joint, "language_model").items() if "lora_B" in k)
    assert all(torch.equal(joint[k], final[k]) for k in joint)

    # Both stage folders load with plain peft onto the base, and give different outputs.
    ids = torch.tensor([[1, 2, 3, 4]])
    logits = []
    for stage in ("align", "joint"):
        base = AutoModelForImageTextToText.from_pretrained(base_dir)
        model = PeftModel.from_pretrained(base, out / stage).eval()
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    assert not torch.allclose(logits[0], logits[1])

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    starts = [(r["step"], r["stage_start"]) for r in records if "stage_start" in r]
    assert starts == [(0, "align"), (4, "joint")]
    ends = {r["stage_end"]: r for r in records if "stage_end" in r}
    # LoRA r16 on the merger's mlp.0 (1024 -> 1024) and mlp.2 (1024 -> 128): 16 x (1024 + 1024 + 1024 + 128)
    assert ends["align"]["changed_params/language_model"] == 0 and ends["align"]["changed_params/projector"] == 51200
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert (out / "loss.png").stat().st_size > 0


def test_generation_regressions_name_what_fell():
    from vlmtune.train.evaluation import generation_regressions

    before = {"eval/exact_match": 0.5, "eval/ablation_gap_other": 0.40}
    assert generation_regressions(before, {"eval/exact_match": 0.5, "eval/ablation_gap_other": 0.38}) == []
    assert generation_regressions(before, {"eval/exact_match": 0.75, "eval/ablation_gap_other": 0.9}) == []
    assert generation_regressions(before, {"eval/exact_match": 0.25, "eval/ablation_gap_other": 0.02}) == [
        "exact match 0.500 -> 0.250",
        "image-ablation gap 0.400 -> 0.020",
    ]
    # A small gap falling by less than the slack is noise, not a regression; a missing figure is not compared.
    assert generation_regressions({"eval/ablation_gap_other": 0.04}, {"eval/ablation_gap_other": 0.0}) == []
    assert generation_regressions({"eval/exact_match": 1.0}, {}) == []


@pytest.mark.slow
def test_a_stage_that_hurts_generation_is_reported(base_dir, tmp_path, capsys):
    """A stage that learns the colour question, then a projector-only stage at a destructive rate: the second leaves
    the image unreadable, and the run says so at its end (the first, which improved both figures, raises nothing)."""
    from vlmtune.cli import main
    from vlmtune.train.evaluation import generation_regressions

    config = tmp_path / "c.yaml"
    config.write_text(
        """
model: {path: builtin:tiny-qwen2-vl}
groups:
  vision_tower: {mode: frozen}
  projector: {mode: lora, rank: 8, targets: all-linear, lr: 3.0e-3}
  language_model: {mode: lora, rank: 8, targets: attention, lr: 3.0e-3}
  lm_head: {mode: frozen}
data: {train: builtin:shapes:color, eval: builtin:shapes:color, builtin_train_samples: 64, builtin_eval_samples: 16}
eval: {samples: 16}
train: {batch_size: 8, warmup_steps: 0, save_steps: null, eval_steps: null, progress_bar: false}
stages:
  - {name: learn, steps: 24}
  - {name: break, steps: 6, groups: {language_model: {mode: frozen}, projector: {lr: 1.0}}}
""",
        encoding="utf-8",
    )
    out = tmp_path / "run"
    assert main(["train", str(config), f"train.output_dir={out}"]) == 0
    text = capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    before, learned, broken = [r for r in records if "eval/ablation_gap_other" in r]
    assert learned["eval/ablation_gap_other"] > before["eval/ablation_gap_other"] + 0.5
    assert learned["eval/exact_match"] > before["eval/exact_match"]
    worse = generation_regressions(learned, broken)
    assert worse and "warning: stage 'learn'" not in text
    assert f"warning: stage 'break' left the model worse at generation than it found it: {', '.join(worse)}" in text
    assert "a lower projector rate, warmup, or training the language model in the same stage" in text
