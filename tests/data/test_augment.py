"""Seeded visual augmentation (vlmtune.data.augment), train split only, and the preview grid (vlmtune.data.preview)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import write_jsonl
from vlmtune.config.data import AugmentConfig, DataConfig
from vlmtune.config.errors import ConfigError
from vlmtune.config.load import load_config
from vlmtune.data.augment import Augmenter, apply_params, draw_params, generator_for
from vlmtune.data.dataset import VLMDataset
from vlmtune.data.preview import preview
from vlmtune.data.sharegpt import Sample

ASSETS = Path(__file__).parents[1] / "assets"
RED = ASSETS / "red_square.png"
BIG = ASSETS / "big_gray.png"
ON = AugmentConfig(enabled=True)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    with Image.open(BIG) as im:
        big = im.convert("RGB")
    with Image.open(RED) as im:
        big.paste(im.convert("RGB").resize((150, 150)), (20, 40))  # an off-centre object, so crops and flips show
    return big


def test_same_seed_index_epoch_same_image_whatever_the_global_rng(image):
    aug = Augmenter(ON)
    torch.manual_seed(1)
    random.seed(1)
    first = _pixels(aug(image, index=3, epoch=2))
    torch.manual_seed(999)
    random.seed(999)
    torch.rand(1000)  # advance the global state: it must not matter
    state = torch.get_rng_state()
    again = _pixels(Augmenter(AugmentConfig(enabled=True))(image, index=3, epoch=2))
    assert np.array_equal(first, again)
    assert torch.equal(state, torch.get_rng_state())  # and augmentation leaves the global state alone


@pytest.mark.parametrize(
    "other",
    [dict(index=4, epoch=2), dict(index=3, epoch=3), dict(index=3, epoch=2, image_index=1)],
    ids=["another-sample", "another-epoch", "second-image-of-the-sample"],
)
def test_each_sample_epoch_and_image_gets_its_own_draw(image, other):
    aug = Augmenter(ON)
    assert not np.array_equal(_pixels(aug(image, 3, 2)), _pixels(aug(image, **other)))


def test_another_seed_another_draw(image):
    assert not np.array_equal(
        _pixels(Augmenter(ON)(image, 0, 0)), _pixels(Augmenter(AugmentConfig(enabled=True, seed=1))(image, 0, 0))
    )


def test_size_kept_and_params_within_configured_ranges(image):
    cfg = AugmentConfig(enabled=True, crop_scale=(0.5, 0.9), rotation=10, brightness=0.3, hue=0.1)
    for index in range(50):
        p = draw_params(cfg, (image.height, image.width), generator_for(0, index, 0, 0))
        top, left, h, w = p.crop
        assert 0 <= top and top + h <= image.height and 0 <= left and left + w <= image.width
        assert 0.5 * 0.9 <= h * w / (image.height * image.width) <= 0.9 * 1.1  # rounding of the box
        assert -10 <= p.angle <= 10 and 0.7 <= p.brightness <= 1.3 and -0.1 <= p.hue <= 0.1
        assert not p.flip  # off by default: answers may say left or right
        assert apply_params(image, p).size == image.size


def test_flip_only_when_enabled_and_hue_off_by_default(image):
    flips = [
        draw_params(AugmentConfig(enabled=True, flip=True), (448, 448), generator_for(0, i, 0, 0)).flip
        for i in range(40)
    ]
    assert 5 < sum(flips) < 35
    assert {draw_params(ON, (448, 448), generator_for(0, i, 0, 0)).hue for i in range(20)} == {0.0}


def test_everything_off_is_the_identity(image):
    off = AugmentConfig(
        enabled=True, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), brightness=0, contrast=0, saturation=0, rotation=0
    )
    assert np.array_equal(_pixels(Augmenter(off)(image, 5, 1)), _pixels(image))


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.augment.crop_scale=[0.9,0.5]", "'data.augment.crop_scale': needs 0 < low <= high"),
        ("data.augment.crop_scale=[0.5,1.5]", "is a fraction of the image's area, at most 1"),
        ("data.augment.hue=0.7", "'data.augment.hue'"),
        ("data.augment.flp=true", "unknown key 'data.augment.flp' (did you mean 'flip'?)"),
    ],
    ids=["scale-reversed", "scale-above-1", "hue-too-large", "misspelt-key"],
)
def test_bad_settings_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value)


# ---------------------------------------------------------------------------------------------
# In the dataset: train only, per epoch, token counts unchanged
# ---------------------------------------------------------------------------------------------

SAMPLES = [
    Sample(messages=[("user", "<image>What color is the shape?"), ("assistant", c)], images=[p], where=f"d.jsonl:{i}")
    for i, (p, c) in enumerate([(RED, "red"), (BIG, "gray")], start=1)
]


@pytest.fixture(scope="module")
def processor(tiny):
    return tiny[1]


def test_train_split_is_augmented_per_epoch_eval_never(processor):
    data = DataConfig(augment=ON)
    train = VLMDataset(SAMPLES, processor, data, split="train")
    evals = VLMDataset(SAMPLES, processor, data, split="eval")
    plain = VLMDataset(SAMPLES, processor, DataConfig(), split="train")
    assert evals.augment is None and plain.augment is None and train.augment is not None
    for i in range(2):
        assert torch.equal(evals[i]["pixel_values"], plain[i]["pixel_values"])
        epoch0 = train[i]["pixel_values"]
        assert not torch.equal(epoch0, plain[i]["pixel_values"])
        assert torch.equal(epoch0, train[i]["pixel_values"])  # reproducible
        train.set_epoch(1)
        assert not torch.equal(epoch0, train[i]["pixel_values"])
        evals.set_epoch(1)
        assert torch.equal(evals[i]["pixel_values"], plain[i]["pixel_values"])
        train.set_epoch(0)
        assert torch.equal(epoch0, train[i]["pixel_values"])
        # the image-token count is the one the length check predicted
        assert train[i]["input_ids"] == plain[i]["input_ids"] and len(train[i]["input_ids"]) == train.lengths()[i]
        assert train[i]["image_grid_thw"].tolist() == plain[i]["image_grid_thw"].tolist()


# ---------------------------------------------------------------------------------------------
# Preview
# ---------------------------------------------------------------------------------------------


def test_preview_writes_a_grid(tmp_path):
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"messages": [{"role": "user", "content": "What is red?"}, {"role": "assistant", "content": "a square"}]},
            {
                "messages": [{"role": "user", "content": "<image>Color?"}, {"role": "assistant", "content": "red"}],
                "images": [str(RED)],
            },
            {
                "messages": [{"role": "user", "content": "<image>Color?"}, {"role": "assistant", "content": "gray"}],
                "images": [str(BIG)],
            },
        ],
    )
    cfg = load_config(None, [f"data.train={data}", "data.augment.enabled=true"])
    out = preview(cfg, tmp_path / "out" / "grid.png", samples=2, views=3)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > im.height > 300


@pytest.mark.slow
def test_cli_preview(tmp_path):
    from vlmtune.cli import main

    data = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {
                "messages": [{"role": "user", "content": "<image>Color?"}, {"role": "assistant", "content": "red"}],
                "images": [str(RED)],
            }
        ],
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"data": {"train": str(data), "augment": {"enabled": True, "flip": True}}}))
    assert main(["data", "preview", str(cfg), "data.augment.seed=3", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").stat().st_size > 1000
