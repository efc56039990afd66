"""End to end: the real CLI trains the builtin base and writes what a user checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import write_jsonl
from vlmtune.cli import main

ROOT = Path(__file__).resolve().parents[2]
QUICK = ["train.progress_bar=false", "data.builtin_eval_samples=32"]


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def _base_state(base_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(base_dir / "model.safetensors")


@pytest.mark.slow
def test_quickstart_writes_outputs_and_learns(base_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            str(ROOT / "examples/quickstart.yaml"),
            f"train.output_dir={out}",
            "train.max_steps=40",
            "train.eval_steps=20",
            "train.save_steps=20",
            *QUICK,
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    # the plan table, printed before training
    assert "projector       full    3: ln_q, mlp.0, mlp.2" in printed
    assert "language_model  lora    8: q_proj, k_proj, v_proj, o_proj  16/64/0" in printed
    assert "optimizer group projector" in printed and "lr=3.00e-03" in printed

    for name in (
        "config.yaml",
        "metrics.jsonl",
        "loss.png",
        "final/adapter_config.json",
        "final/adapter_model.safetensors",
        "final/config.yaml",
        "final/tokenizer.json",
        "final/chat_template.jinja",
        "checkpoint-20/adapter_model.safetensors",
    ):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert train_records and all({"step", "loss", "lr"} <= set(r) for r in train_records)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1] < 0.6 * evals[0], evals  # before, step 20, end

    weights = _adapter(out / "final")
    merger = {k.split(".merger.")[1]: v for k, v in weights.items() if ".merger." in k}
    assert set(merger) == {f"{m}.{p}" for m in ("ln_q", "mlp.0", "mlp.2") for p in ("weight", "bias")}
    base_weights = _base_state(base_dir)  # the flat layout (visual.*)
    assert all(not torch.equal(v, base_weights[f"visual.merger.{k}"]) for k, v in merger.items() if "mlp" in k)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert any(f"self_attn.{proj}.lora_A" in k for k in weights), proj
    assert not any("mlp.gate_proj" in k or "visual.blocks" in k for k in weights)

    # plain peft loads the adapter onto the plain base
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, out / "final")
    loaded = model.get_base_model().model.visual.merger.mlp[0].weight
    assert torch.equal(loaded, merger["mlp.0.weight"]), "the trained projector must load with the adapter"
    lora_b = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())
    saved_cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert saved_cfg["groups"]["projector"]["lr"] == 3e-3 and saved_cfg["train"]["max_steps"] == 40


def _lf_yaml(tmp_path: Path, **keys) -> Path:
    cfg = {
        "model_name_or_path": "builtin:tiny-qwen2-vl",
        "dataset": "builtin:shapes:color",
        "output_dir": str(tmp_path / "lf"),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "cutoff_len": 256,
        "seed": 1,
        **keys,
    }
    path = tmp_path / "lf.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_llama_factory_lora_target_merger_trains_only_the_projector(base_dir, tmp_path, capsys):
    assert main(["train", str(_lf_yaml(tmp_path, lora_target="merger", lora_rank=8)), "train.progress_bar=false"]) == 0
    printed = capsys.readouterr().out
    assert "lora_target: merger -> groups.projector: lora on all-linear" in printed
    assert "cutoff_len: 256 -> data.max_length" in printed
    weights = _adapter(tmp_path / "lf" / "final")
    assert weights and all(".visual.merger.mlp." in k for k in weights)
    # mlp.0 and mlp.2 both read the merged patches: embed_dim x merge_size^2 features
    vision = json.loads((base_dir / "config.json").read_text())["vision_config"]
    width = vision["embed_dim"] * vision["spatial_merge_size"] ** 2
    assert {tuple(v.shape) for k, v in weights.items() if "lora_A" in k} == {(8, width)}
    assert all(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)


@pytest.mark.slow
def test_llama_factory_additional_target_trains_projector_fully(base_dir, tmp_path):
    assert (
        main(
            [
                "train",
                str(_lf_yaml(tmp_path, lora_target="q_proj,v_proj", additional_target="merger")),
                "train.progress_bar=false",
            ]
        )
        == 0
    )
    weights = _adapter(tmp_path / "lf" / "final")
    full = {k: v for k, v in weights.items() if ".merger." in k}
    assert {k.split(".merger.")[1] for k in full} == {
        "ln_q.weight",
        "ln_q.bias",
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.2.weight",
        "mlp.2.bias",
    }
    base = _base_state(base_dir)  # transformers writes Qwen2-VL checkpoints in the flat layout (visual.*)
    changed = [k for k, v in full.items() if not torch.equal(v, base["visual." + k.split(".visual.")[1]])]
    assert changed, "the projector's full weights must differ from the base"
    lm = [k for k in weights if "language_model" in k]
    assert lm and all(("q_proj" in k or "v_proj" in k) and "lora_" in k for k in lm)


@pytest.mark.slow
def test_overlong_samples_are_counted_and_named_never_cut(base_dir, tmp_path, capsys):
    assets = ROOT / "tests" / "assets"
    rows = [
        {
            "messages": [
                {"role": "user", "content": "<image>What color is the shape?"},
                {"role": "assistant", "content": c},
            ],
            "images": [str(assets / img)],
        }
        for img, c in (("red_square.png", "red"), ("blue_circle.png", "blue"), ("big_gray.png", "gray"))
    ] * 2
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    args = [
        "train",
        str(ROOT / "examples/quickstart.yaml"),
        f"data.train={data}",
        "data.eval=null",
        "data.max_length=60",
        "data.image_max_pixels=65536",
        f"train.output_dir={tmp_path / 'o'}",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.progress_bar=false",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "train data: 4 samples" in printed
    assert f"2 sample(s) over max_length=60 dropped (image tokens are never cut): {data}:3, {data}:6" in printed


@pytest.mark.slow
def test_tensorboard_tracker(base_dir, tmp_path):
    out = tmp_path / "tb"
    assert (
        main(
            [
                "train",
                str(ROOT / "examples/quickstart.yaml"),
                f"train.output_dir={out}",
                "train.max_steps=2",
                "train.logging_steps=1",
                "train.report_to=[tensorboard]",
                "data.eval=null",
                "train.progress_bar=false",
            ]
        )
        == 0
    )
    assert list(out.rglob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    "overrides,fragments",
    [
        (["data.train=/nonexistent/train.jsonl"], ["data file '/nonexistent/train.jsonl' does not exist"]),
        (["train.lerning_rate=1e-3"], ["unknown key 'train.lerning_rate'", "did you mean 'learning_rate'"]),
        (["groups.projector.rnk=4", "train.max_steps=0"], ["unknown key 'groups.projector.rnk'", "'train.max_steps'"]),
    ],
    ids=["missing-dataset", "unknown-key", "two-problems-at-once"],
)
def test_bad_input_exits_2_with_a_message(base_dir, tmp_path, capsys, overrides, fragments):
    code = main(["train", str(ROOT / "examples/quickstart.yaml"), f"train.output_dir={tmp_path / 'x'}", *overrides])
    err = capsys.readouterr().err
    assert code == 2
    for fragment in fragments:
        assert fragment in err


def test_missing_image_names_sample_and_path(base_dir, tmp_path, capsys):
    rows = [
        {
            "messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "red"}],
            "images": ["nowhere.png"],
        }
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    code = main(
        ["train", str(ROOT / "examples/quickstart.yaml"), f"data.train={data}", f"train.output_dir={tmp_path / 'x'}"]
    )
    assert code == 2
    assert f"{data}:1: image '{tmp_path / 'nowhere.png'}' does not exist" in capsys.readouterr().err


def test_python_dash_m_and_help():
    run = subprocess.run(
        [sys.executable, "-m", "vlmtune", "train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0
    for key in ("groups.<group>.mode", "groups.<group>.lr", "data.max_length", "train.grad_accum", "model.path"):
        assert key in run.stdout


def test_loader_workers_auto_and_given():
    from vlmtune.train.loader import loader_workers

    assert loader_workers(3) == 3 and loader_workers(0) == 0
    cores = len(os.sched_getaffinity(0))
    expected = max(0, min(4, cores - 1)) if torch.cuda.is_available() else 0
    assert loader_workers("auto") == expected
    if torch.cuda.is_available():
        assert loader_workers("auto", processes=cores) == 0
