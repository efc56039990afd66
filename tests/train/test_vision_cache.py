"""The frozen vision tower's features cached on disk: same loss, reused across runs, invalidated by changes."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmtune.cli import main
from vlmtune.data.collate import CACHED
from vlmtune.model.archs import REGISTRY
from vlmtune.train.vision_cache import (
    ImageKeys,
    VisionCache,
    feed_cached_features,
    fill,
    fingerprint,
    missing_images,
    unavailable,
)

ASSETS = Path(__file__).parents[1] / "assets"

CONFIG = """
model: {path: builtin:tiny-qwen2-vl}
groups:
  projector: {mode: lora, rank: 8, lr: 3.0e-3}
  language_model: {mode: lora, rank: 8, targets: attention, lr: 1.0e-3}
data: {train: builtin:shapes:compare, max_length: 512, builtin_train_samples: 16}
train: {max_steps: 4, batch_size: 4, logging_steps: 1, seed: 3, progress_bar: false}
"""


def test_reasons_the_cache_is_not_used():
    qwen2_vl, llava = REGISTRY["qwen2_vl"], REGISTRY["llava"]
    assert unavailable(qwen2_vl, False, False, True) is None
    assert "vision tower trains" in unavailable(qwen2_vl, True, False, True)
    assert "augmentation" in unavailable(qwen2_vl, False, True, True)
    assert "not available for llava" in unavailable(llava, False, False, True)
    assert "not available for qwen3_vl" in unavailable(REGISTRY["qwen3_vl"], False, False, True)
    assert "false" in unavailable(qwen2_vl, False, False, False)


def test_keys_follow_file_bytes_processor_settings_and_pixel_bounds(tiny, tmp_path):
    from PIL import Image

    _, processor = tiny
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    a, b = tmp_path / "a.png", tmp_path / "copy.png"
    image.save(a)
    image.save(b)
    keys = ImageKeys(processor)
    first = keys.key(a, None, None)
    assert keys.key(b, None, None) == first  # same bytes elsewhere: same features
    assert keys.key(a, None, 4096) != first and keys.key(a, 1024, None) != first
    image.putpixel((0, 0), (0, 0, 0))
    image.save(a)
    os.utime(a, ns=(1, 1))  # a rewrite within the same clock tick is still seen: the size or time changes
    assert keys.key(a, None, None) != first and keys.key(b, None, None) == first
    changed = copy.deepcopy(processor)
    changed.image_processor.image_mean = [0.0, 0.0, 0.0]
    assert ImageKeys(changed).key(b, None, None) != first


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


def _same_loss_with_cache(model, processor, jsonl, folder) -> None:
    """The dataset with the cache on (no pixels: grids and cached features) and the features filled from the real
    images give the same batch tokens, loss and projector gradients as the plain dataset."""
    from vlmtune.config.data import DataConfig
    from vlmtune.data.collate import load_image, process_images
    from vlmtune.data.dataset import build_dataset
    from vlmtune.train.loader import make_loader

    inner, projector = model.model, model.model.visual.merger
    data = DataConfig(max_length=512)
    plain = build_dataset(str(jsonl), data, processor, "train")
    keyed = build_dataset(str(jsonl), data, processor, "train")
    keys = ImageKeys(processor)
    cache = VisionCache(folder, "fp", inner, projector)
    keyed.use_vision_cache(keys, cache)
    with pytest.raises(FileNotFoundError, match="vision cache: no features for image .*png"):
        keyed[0]  # not filled yet
    todo, found = missing_images(keyed, keys, cache)
    images = sum(len(it.sample.images) for it in keyed.items)
    assert found == 0 and len(todo) == len({path for it in keyed.items for path in it.sample.images})  # once per file
    model.eval()
    pixels = ((k, process_images(processor, [load_image(path, path)], None, mp)) for k, (path, mp, _) in todo.items())
    assert fill(cache, inner, projector, pixels, "cpu", images_per_pass=3) == len(todo)
    assert missing_images(keyed, keys, cache) == ({}, len(todo))
    # A damaged entry (a truncated file) is found, removed and computed again; the others are kept.
    damaged_key = next(iter(todo))
    entry = cache.path(damaged_key)
    good, before = entry.read_bytes(), cache.get(damaged_key).clone()  # a copy: the entry is memory-mapped
    entry.write_bytes(good[: len(good) // 2])
    again, found = missing_images(keyed, keys, cache)
    assert list(again) == [damaged_key] and found == len(todo) - 1 and cache.damaged == [entry]
    path, mp, _ = again[damaged_key]
    assert (
        fill(
            cache,
            inner,
            projector,
            [(damaged_key, process_images(processor, [load_image(path, path)], None, mp))],
            "cpu",
        )
        == 1
    )
    # the same features as before (computed alone now, with others then: equal up to float summation order)
    assert torch.allclose(cache.get(damaged_key), before, rtol=1e-5, atol=1e-6)
    batch = next(iter(make_loader(plain, processor, len(plain), False, 0, 0)))
    cached_batch = next(iter(make_loader(keyed, processor, len(keyed), False, 0, 0)))
    assert "pixel_values" not in cached_batch and len(cached_batch[CACHED]) == images
    from_workers = next(iter(make_loader(keyed, processor, len(keyed), False, 0, 2)))  # read in worker processes
    assert all(torch.equal(a, b) for a, b in zip(from_workers[CACHED], cached_batch[CACHED]))
    assert torch.equal(from_workers["input_ids"], cached_batch["input_ids"])
    for k in ("input_ids", "labels", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(batch[k], cached_batch[k]), k
    handle = feed_cached_features(inner, projector, REGISTRY[inner.config.model_type])
    try:
        losses, grads = [], []
        for inputs in (batch, cached_batch):
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


def test_cached_features_give_the_same_loss_and_gradients(tiny, shapes_dir, tmp_path):
    model, processor = tiny  # Qwen2-VL, two images per sample
    _same_loss_with_cache(model, processor, shapes_dir / "compare.jsonl", tmp_path)


def test_qwen2_5_vl_window_order_is_restored(tmp_path):
    """Qwen2.5-VL's tower runs in window order; the cached features are in that order and the hook restores image
    order (64x64 images: 4 windows of 2x2 merged tokens, so the order matters)."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from tests.conftest import write_jsonl
    from tests.tiny_families import qwen2_5_vl

    cfg, processor = qwen2_5_vl()
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg)
    assert model.config.model_type == "qwen2_5_vl"
    Image.radial_gradient("L").resize((64, 48)).convert("RGB").save(tmp_path / "gradient.png")
    images = [str(ASSETS / "red_square.png"), str(ASSETS / "blue_circle.png"), str(tmp_path / "gradient.png")]
    rows = [
        {
            "messages": [
                {"role": "user", "content": "<image>" * len(ims) + "What color is the shape?"},
                {"role": "assistant", "content": answer},
            ],
            "images": ims,
        }
        for ims, answer in [
            (images[:1], "red square"),
            (images[1:], "blue circle top left"),
            (images[2:], "green triangle"),
        ]
    ]
    _same_loss_with_cache(model, processor, write_jsonl(tmp_path / "data.jsonl", rows), tmp_path / "cache")
    # Per image, the projector on the cached features, put back in image order, is the tower's own output; without
    # the reordering it is not (the window order differs from image order at this size).
    from vlmtune.data.collate import load_image, process_images
    from vlmtune.train.vision_cache import _image_order

    inner, keys = model.model, ImageKeys(processor)
    cache = VisionCache(tmp_path / "cache", "fp")
    with torch.no_grad():
        for path in images:
            pixels = process_images(processor, [load_image(path, path)], None, None)
            own = inner.get_image_features(**pixels).pooler_output[0]
            merged = inner.visual.merger(cache.get(keys.key(path, None, None), "cpu"))
            assert torch.allclose(
                merged[_image_order(inner, REGISTRY["qwen2_5_vl"])(pixels["image_grid_thw"][0])], own, atol=1e-6
            )
            assert not torch.allclose(merged, own, atol=1e-3)


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
    assert "vision cache: on" in first and "image(s) to compute (about" in first and "MiB" in first
    # The second run with the cache also recomputes activations (gradient checkpointing): same training again.
    assert main(["train", str(config), f"train.output_dir={again}", "train.gradient_checkpointing=true"]) == 0
    second = capsys.readouterr().out
    assert "vision cache: 0 image(s) to compute (about 0.0 MiB), 32 already cached" in second
    assert "gradient checkpointing: on" in second
    assert _losses(on) == pytest.approx(_losses(off), rel=1e-5)
    assert _losses(again) == pytest.approx(_losses(off), rel=1e-5)
    # The tower runs batched without the cache and per image with it, so its features differ in the last float bits;
    # Adam turns a near-zero gradient's noise into a step of up to the rate (3e-3 here), so the weights are compared
    # against what Adam can move them in 4 steps (about 1.2e-2): measured at most 2.6e-5 apart, bound 3e-4.
    a, b = (load_file(r / "final" / "adapter_model.safetensors") for r in (off, on))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 3e-4
