"""Training on videos (Qwen2-VL, Qwen2.5-VL): a step on a batch mixing video, image and text samples, the vision cache
and packing with videos, and ``vlmtune train`` / ``predict`` on video data (videos from tests/data/test_video.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.data.test_video import make_media
from vlmtune.config.data import DataConfig
from vlmtune.data.chat import to_chat
from vlmtune.data.dataset import VLMDataset, build_dataset
from vlmtune.data.media import load_images, load_videos


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    return make_media(tmp_path_factory.mktemp("video"))


def _lora_model(tiny_dir: Path, vision: str):
    from transformers import AutoModelForImageTextToText

    from vlmtune.config.overrides import deep_merge
    from vlmtune.config.schema import DEFAULT_GROUPS, Config
    from vlmtune.model.groups import assign_groups
    from vlmtune.model.load import arch_for
    from vlmtune.model.tuning import apply_plan, build_plan

    groups = deep_merge(DEFAULT_GROUPS, {"vision_tower": {"mode": vision, "rank": 4}})
    cfg = Config.model_validate({"model": {"path": str(tiny_dir)}, "groups": groups})
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    gmap = assign_groups([n for n, _ in model.named_parameters()], arch_for(model, cfg.model))
    plans = build_plan(model, gmap, cfg)
    return apply_plan(model, gmap, plans), gmap, plans


def test_a_step_on_video_image_and_text_samples_trains_the_vision_tower(tiny, tiny_dir, media):
    from vlmtune.checks import check_gradient_flow, inner_model
    from vlmtune.train.loader import make_loader
    from vlmtune.train.loss import answer_loss
    from vlmtune.train.packing import pack, rope_index_of

    _, processor = tiny
    model, gmap, plans = _lora_model(tiny_dir, "lora")
    ds = build_dataset(str(media / "mixed.jsonl"), DataConfig(), processor, "train")
    batch = next(iter(make_loader(ds, processor, 4, False, 0, 0)))
    assert {"pixel_values", "pixel_values_videos", "video_grid_thw"} <= set(batch)
    assert int((batch["mm_token_type_ids"] == 2).sum()) == 24 + 36  # the mp4: 4 frames, the folder: 6 (3 patches)
    loss = answer_loss(model, batch)
    assert torch.isfinite(loss)
    flow = check_gradient_flow(model, batch, gmap, plans)
    assert flow.status == "PASS" and "vision_tower" in flow.lines[0], flow.lines
    # a video alone reaches the tower's LoRA
    video_only = next(
        iter(make_loader(VLMDataset([ds.items[3].sample], processor, DataConfig()), processor, 1, False, 0, 0))
    )
    assert "pixel_values" not in video_only and check_gradient_flow(model, video_only, gmap, plans).status == "PASS"
    # packed rows hold the same samples: the same loss
    packed = next(iter(make_loader(ds, processor, 4, False, 0, 0, packing=True)))
    with torch.no_grad():
        padded_loss = answer_loss(model, batch)
        packed_loss = answer_loss(model, pack(packed, rope_index_of(inner_model(model))))
    assert packed_loss.item() == pytest.approx(padded_loss.item(), rel=1e-4)


def test_the_vision_cache_with_videos_gives_the_same_loss(tiny, media, tmp_path):
    from tests.train.test_vision_cache import _same_loss_with_cache

    model, processor = tiny
    _same_loss_with_cache(model, processor, media / "mixed.jsonl", tmp_path)  # videos go through the frozen tower


def test_qwen2_5_vl_takes_videos_with_their_seconds_per_patch(media):
    from transformers import AutoModelForImageTextToText
    from transformers.video_utils import VideoMetadata

    from tests.tiny_families import qwen2_5_vl
    from vlmtune.train.loader import make_loader

    cfg, processor = qwen2_5_vl()
    ds = build_dataset(str(media / "mixed.jsonl"), DataConfig(), processor, "train")
    item, sample = ds[0], ds.items[0].sample
    meta = VideoMetadata(total_num_frames=6, fps=3.0, frames_indices=[0, 2, 3, 5])
    clip = load_videos(sample, DataConfig())[0]
    text = processor.apply_chat_template(to_chat(sample), tokenize=False)
    own = processor(
        text=[text], images=load_images(sample), videos=[clip.frames], video_metadata=[meta], return_tensors="pt"
    )
    assert item["input_ids"] == own["input_ids"][0].tolist()
    assert item["second_per_grid_ts"].tolist() == pytest.approx(own["second_per_grid_ts"].tolist()) == [1.0]
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg)
    loss = model(**next(iter(make_loader(ds, processor, 4, False, 0, 0)))).loss
    assert torch.isfinite(loss)


def test_train_and_predict_on_video_data_from_the_command_line(tiny_dir, media, tmp_path, capsys):
    from vlmtune.cli import main

    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{path: {tiny_dir}}}\n"
        f"data: {{train: [builtin:shapes:motion, {media / 'mixed.jsonl'}], builtin_train_samples: 4, max_length: 256}}\n"
        f"train: {{max_steps: 2, batch_size: 4, logging_steps: 1, progress_bar: false, output_dir: {out}}}\n",
        encoding="utf-8",
    )
    assert main(["train", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "train data: 8 samples" in printed and "vision cache: on" in printed
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    predictions = tmp_path / "p.jsonl"
    args = [
        "predict",
        "--checkpoint",
        str(out / "final"),
        "--data",
        str(media / "mixed.jsonl"),
        "--out",
        str(predictions),
    ]
    assert main([*args, "--max-new-tokens", "2"]) == 0
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(records) == 4 and records[3]["videos"] == [str(media / "frames")]
