"""The frozen vision tower's features cached on disk: same loss, reused across runs, invalidated by changes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vlmtune.cli import main
from vlmtune.vision_cache import VisionCache, fill, fingerprint, install, unavailable

CONFIG = """
model: {path: builtin:tiny-qwen2-vl}
groups:
  projector: {mode: lora, rank: 8, lr: 3.0e-3}
  language_model: {mode: lora, rank: 8, targets: attention, lr: 1.0e-3}
data: {train: builtin:shapes:compare, max_length: 512, builtin_train_samples: 16}
train: {max_steps: 4, batch_size: 4, logging_steps: 1, seed: 3, progress_bar: false}
"""


def test_reasons_the_cache_is_not_used():
    assert unavailable("qwen2_vl", False, False, True) is None
    assert "vision tower trains" in unavailable("qwen2_vl", True, False, True)
    assert "augmentation" in unavailable("qwen2_vl", False, True, True)
    assert "model_type 'llava'" in unavailable("llava", False, False, True)
    assert "false" in unavailable("qwen2_vl", False, False, False)


def test_keys_follow_pixels_and_grid(compare_batch):
    keys = VisionCache.keys(compare_batch)
    assert len(keys) == len(compare_batch["image_grid_thw"]) == 8 and len(set(keys)) == 8  # two images per sample
    changed = dict(compare_batch, pixel_values=compare_batch["pixel_values"].clone())
    changed["pixel_values"][0, 0] += 1.0  # one value of the first image
    assert VisionCache.keys(changed)[0] != keys[0] and VisionCache.keys(changed)[1:] == keys[1:]


def test_fingerprint_changes_with_the_tower_weights(tiny):
    model, _ = tiny
    names = [n for n, _ in model.named_parameters() if n.startswith("model.visual.blocks.0.")]
    before = fingerprint(model, names)
    param = dict(model.named_parameters())[names[0]]
    with torch.no_grad():
        param.add_(1e-3)
        after = fingerprint(model, names)
        param.sub_(1e-3)
    assert before != after and fingerprint(model, names) == before


def test_cached_features_give_the_same_loss_and_gradients(tiny, compare_batch, tmp_path):
    model, _ = tiny
    inner, projector = model.model, model.model.visual.merger
    cache = VisionCache(tmp_path, "fp", inner, projector)
    model.eval()
    assert fill(cache, inner, projector, [compare_batch], "cpu", progress=False) == (8, 0)
    assert fill(cache, inner, projector, [compare_batch], "cpu", progress=False) == (0, 8)
    handle = install(inner, projector)
    try:
        cached = cache.substitute(compare_batch)
        assert "pixel_values" not in cached and len(cached["cached_vision"]) == 8
        losses, grads = [], []
        for inputs in (compare_batch, cached):
            model.zero_grad()
            loss = model(**inputs).loss
            loss.backward()
            losses.append(loss.detach())
            grads.append(projector.mlp[0].weight.grad.clone())
    finally:
        handle.remove()
        model.zero_grad()
    assert torch.allclose(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7) and grads[0].abs().sum() > 0


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.slow
def test_training_with_the_cache_equals_training_without(base_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    off, on, again = tmp_path / "off", tmp_path / "on", tmp_path / "again"
    assert main(["train", str(config), f"train.output_dir={off}", "train.vision_cache=false"]) == 0
    assert "vision cache: off (train.vision_cache is false)" in capsys.readouterr().out
    assert main(["train", str(config), f"train.output_dir={on}"]) == 0
    first = capsys.readouterr().out
    assert "vision cache: on" in first and "image(s) computed" in first and "MiB" in first
    assert main(["train", str(config), f"train.output_dir={again}"]) == 0
    assert "vision cache: 0 image(s) computed, 32 already cached" in capsys.readouterr().out
    assert _losses(on) == pytest.approx(_losses(off), rel=1e-5)
    a, b = (load_file(r / "final" / "adapter_model.safetensors") for r in (off, on))
    assert max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-12)).item() for k in a) <= 1e-4
