"""QLoRA on CPU: model.quantize loads the frozen and LoRA groups' linear layers as bitsandbytes 4-bit weights, keeps
the projector, lm_head and fully-trained groups in full precision, trains, resumes and exports as before."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
import yaml

from vlmtune.config.errors import ConfigError
from vlmtune.config.load import load_config
from vlmtune.config.stages import resolve_stages
from vlmtune.model.build import build_model, quantized_groups

bnb = pytest.importorskip("bitsandbytes")

CPU = torch.device("cpu")


def _cfg(tmp_path: Path, model_path: str, **extra):
    raw = {
        "model": {"path": model_path, "quantize": "nf4"},
        "groups": {
            "projector": {"mode": "lora", "rank": 4},
            "language_model": {"mode": "lora", "rank": 4, "targets": "attention"},
        },
    }
    for key, value in extra.items():
        raw.setdefault(key, {}).update(value)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path, echo=lambda *a: None)


def _kinds(built) -> dict[str, set[str]]:
    """Per group: whether its linear layers are 4-bit or full precision (LoRA's own layers left out)."""
    out: dict[str, set[str]] = {}
    for name, module in built.model.named_modules():
        if ".lora_" in name or not isinstance(module, torch.nn.Linear):
            continue
        kind = "4bit" if isinstance(module, bnb.nn.Linear4bit) else "full"
        out.setdefault(built.gmap.group_of(f"{name}.weight"), set()).add(kind)
    return out


def test_frozen_and_lora_groups_are_quantized_the_projector_and_full_groups_are_not(tiny_dir, tmp_path):
    cfg = _cfg(tmp_path, str(tiny_dir), groups={"lm_head": {"mode": "full"}})
    stages = resolve_stages(cfg)
    assert quantized_groups(cfg, [s.cfg for s in stages]) == ["vision_tower", "language_model"]
    built = build_model(cfg, stages, tiny_dir, CPU, echo=lambda *a: None)
    kinds = _kinds(built)
    assert kinds["vision_tower"] == {"4bit"} and kinds["language_model"] == {"4bit"}
    assert kinds["projector"] == {"full"} and kinds["lm_head"] == {"full"}
    # LoRA trains on top of the 4-bit layers: a step moves the adapters.
    ids = torch.randint(0, 50, (2, 12))
    out = built.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    out.loss.backward()
    lora = [p for n, p in built.model.named_parameters() if "language_model" in n and "lora_B" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


def test_overrides_and_what_cannot_be_quantized_are_named(tiny_dir, tmp_path):
    cfg = _cfg(
        tmp_path,
        str(tiny_dir),
        groups={"projector": {"mode": "lora", "quantize": True}, "language_model": {"quantize": False}},
    )
    assert quantized_groups(cfg, [cfg]) == ["vision_tower", "projector"]
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, str(tiny_dir), groups={"lm_head": {"mode": "full", "quantize": True}})
    assert "'groups.lm_head.quantize' is true but the group trains fully" in str(e.value)
    with pytest.raises(ConfigError) as e:
        _cfg(
            tmp_path,
            str(tiny_dir),
            model={"quantize": "none"},
            groups={"projector": {"mode": "lora", "quantize": True}},
        )
    assert "model.quantize is none" in str(e.value)
    staged = tmp_path / "staged.yaml"
    staged.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(tiny_dir), "quantize": "nf4"},
                "groups": {"projector": {"mode": "lora"}},
                "stages": [
                    {"name": "a", "steps": 1},
                    {"name": "b", "steps": 1, "groups": {"vision_tower": {"quantize": False}}},
                ],
            }
        )
    )
    with pytest.raises(ConfigError) as e:
        load_config(staged, echo=lambda *a: None)
    assert "groups.vision_tower.quantize differs in stages[1] (b)" in str(e.value)


QLORA = """
model: {path: builtin:tiny-qwen2-vl, quantize: nf4}
groups:
  projector: {mode: lora, rank: 8, lr: 3.0e-3}
  language_model: {mode: lora, rank: 8, targets: attention, lr: 1.0e-3}
data: {train: builtin:shapes:color, max_length: 256, builtin_train_samples: 24}
train: {max_steps: 6, batch_size: 4, logging_steps: 1, save_steps: 3, seed: 2, progress_bar: false}
"""


@pytest.mark.slow
def test_a_qlora_run_resumes_to_the_same_adapter_and_exports_merged_in_full_precision(base_dir, tmp_path):
    from safetensors.torch import load_file

    from tests.train.test_resume import _cmd, _finish, _run_until
    from vlmtune.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(QLORA)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = _finish(_cmd(path, whole))
    assert "quantized (nf4, bitsandbytes): the linear layers of vision_tower, language_model" in done.stdout
    _run_until(_cmd(path, killed), killed, 4, signal.SIGKILL)
    _finish(_cmd(path, killed, "--resume"))
    a, b = (load_file(r / "final" / "adapter_model.safetensors") for r in (whole, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    out = tmp_path / "merged"
    assert main(["export", "--checkpoint", str(whole / "final"), "--out", str(out), "--merge"]) == 0
    from transformers import AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(out)
    assert not any("4bit" in type(m).__name__ for m in merged.modules())


@pytest.mark.gpu
def test_qlora_trains_on_a_gpu_in_bfloat16(tiny_dir, tmp_path):
    cfg = _cfg(tmp_path, str(tiny_dir), model={"dtype": "bfloat16"})
    device = torch.device("cuda")
    built = build_model(cfg, resolve_stages(cfg), tiny_dir, device, echo=lambda *a: None)
    assert _kinds(built)["language_model"] == {"4bit"}
    ids = torch.randint(0, 50, (2, 12), device=device)
    out = built.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in built.model.named_parameters() if "lora_B" in n
    )
