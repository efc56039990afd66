"""The builtin base: a real Qwen2-VL folder that plain transformers loads, pretrained to use the image."""

from __future__ import annotations

import json

import pytest
import torch

from vlmtune.builtin.base import base_dir as builtin_dir
from vlmtune.builtin.base import ensure_base


def test_base_is_a_plain_transformers_folder(base_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2VLProcessor

    assert ensure_base() == base_dir == builtin_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "pretrain_metrics.jsonl"):
        assert (base_dir / name).is_file(), name
    model = AutoModelForImageTextToText.from_pretrained(base_dir)
    processor = AutoProcessor.from_pretrained(base_dir)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert isinstance(processor, Qwen2VLProcessor)
    losses = [
        json.loads(line)["loss"]
        for line in (base_dir / "pretrain_metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert losses[-1] < 0.2 * losses[0], losses


@pytest.mark.slow
def test_base_uses_the_image(base_dir, tmp_path):
    """Answer loss with each sample's own image is clearly below the loss with another sample's image.

    Measured: 0.39 with the true image vs 0.61 with the neighbour's (per answer token, separators and
    end-of-turn tokens included, which the image does not decide).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmtune.config.data import DataConfig
    from vlmtune.data.dataset import build_dataset
    from vlmtune.train.loader import make_loader

    model = AutoModelForImageTextToText.from_pretrained(base_dir).eval()
    processor = AutoProcessor.from_pretrained(base_dir)
    data = DataConfig(train="builtin:shapes:attributes", builtin_eval_samples=32)
    loader = make_loader(build_dataset(data.train, data, processor, "eval"), processor, 32, False, 0, 0)
    batch = next(iter(loader))
    with torch.no_grad():
        true = model(**batch).loss.item()
        # roll the images by one sample: same sizes, so the pixel rows can be shifted as blocks
        per_image = batch["pixel_values"].shape[0] // batch["image_grid_thw"].shape[0]
        shuffled = dict(batch, pixel_values=batch["pixel_values"].roll(per_image, dims=0))
        other = model(**shuffled).loss.item()
    assert other - true > 0.15, (true, other)
