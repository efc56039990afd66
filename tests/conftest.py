"""Shared fixtures: real tiny models built in code, real processors, generated data. No downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """GPU-only tests (marked ``gpu``) are skipped where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory) -> Path:
    """A fresh vlmtune cache per test session, so the builtin base is built (and tested) from scratch."""
    path = Path(os.environ.get("VLMTUNE_TEST_CACHE") or tmp_path_factory.mktemp("vlmtune-cache"))
    os.environ["VLMTUNE_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny Qwen2-VL model folder with its tokenizer and processor; Qwen2-VL's merge size 2
    (16 tokens per 64-pixel image), not the builtin base's 4, so the tests see images of several tokens per side."""
    from vlmtune.builtin.base import write_random_init

    return write_random_init(tmp_path_factory.mktemp("tiny-random"), merge_size=2)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(model, processor) loaded from ``tiny_dir`` the way users load a model folder."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_pretrained(tiny_dir), AutoProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def base_dir() -> Path:
    """The builtin pretrained base (built once per session)."""
    from vlmtune.builtin.base import ensure_base

    return ensure_base()


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """Generated shapes data: position task (train/eval) and two-image compare samples."""
    from vlmtune.data.shapes import generate_shapes

    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(out, 64, "position", seed=0, name="train")
    generate_shapes(out, 16, "position", seed=1, name="eval")
    generate_shapes(out, 8, "compare", seed=2, name="compare")
    return out


@pytest.fixture(scope="session")
def compare_batch(tiny, shapes_dir) -> dict:
    """One collated batch of 4 two-image samples (8 images) from ``shapes_dir``, as the training loader makes it."""
    from vlmtune.config.data import DataConfig
    from vlmtune.data.dataset import build_dataset
    from vlmtune.train.loader import make_loader

    _, processor = tiny
    ds = build_dataset(str(shapes_dir / "compare.jsonl"), DataConfig(max_length=512), processor, "train")
    return next(iter(make_loader(ds, processor, 4, False, 0, 0)))


def write_jsonl(path: Path, records: list) -> Path:
    import json

    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path
