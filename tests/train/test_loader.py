"""Weighted mixing of training sources (vlmtune.train.loader): checked in the config, drawn per epoch by the
sampler, printed and logged per epoch by a real run."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import write_jsonl
from vlmtune.cli import main
from vlmtune.config.errors import ConfigError
from vlmtune.config.load import load_config


def _config(tmp_path, data: str):
    path = tmp_path / "c.yaml"
    path.write_text(f"data: {data}\n", encoding="utf-8")
    return path


def test_weights_on_some_sources_only_are_refused(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(_config(tmp_path, "{train: [{path: a.jsonl, weight: 2}, b.jsonl]}"))
    assert "some sources have a weight and b.jsonl not" in str(info.value)


def test_a_weight_must_be_positive(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(_config(tmp_path, "{train: [{path: a.jsonl, weight: 0}]}"))
    assert "'data.train.0.weight'" in str(info.value)


def test_llama_factory_interleave_becomes_weights(tmp_path):
    path = tmp_path / "lf.yaml"
    path.write_text("dataset: a,b\nmix_strategy: interleave_under\ninterleave_probs: 0.7,0.3\n", encoding="utf-8")
    cfg = load_config(path, echo=lambda *_: None)
    assert [(s.path, s.weight) for s in cfg.data.train] == [("a", 0.7), ("b", 0.3)]
    assert cfg.data.mix_epoch == "under"


@pytest.mark.slow
def test_a_weighted_run_logs_its_realised_mix_per_epoch(tiny_dir, shapes_dir, tmp_path, capsys):
    images = write_jsonl(
        tmp_path / "images.jsonl",
        [
            {**json.loads(line), "images": [str(shapes_dir / json.loads(line)["images"][0])]}
            for line in (shapes_dir / "train.jsonl").read_text().splitlines()[:12]
        ],
    )
    text = write_jsonl(
        tmp_path / "text.jsonl",
        [
            {"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            for w in ("red", "blue", "green")
        ],
    )
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
    config = tmp_path / "mix.yaml"
    config.write_text(
        f"model: {{path: {tiny_dir}}}\n"
        f"data: {{train: [{{path: {images}, weight: 1}}, {{path: {text}, weight: 1}}], mix_epoch: 8}}\n"
        f"train: {{batch_size: 4, epochs: 2, output_dir: {tmp_path / 'run'}, progress_bar: false}}\n",
        encoding="utf-8",
    )
    code = main(["train", str(config)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "epoch 0 mix (data.train weights):" in printed and "epoch 1 mix" in printed
    assert f"{text}: 4 drawn (3 distinct of 3, weight 1.0)" in printed
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mixes = [r for r in records if "mix" in r]
    assert [r["epoch"] for r in mixes] == [0, 1]
    assert mixes[0]["mix"][str(images)]["drawn"] == 4 and mixes[0]["mix"][str(images)]["held"] == 12
    assert max(r["step"] for r in records if "loss" in r) == 4  # 2 epochs of 8 samples at batch 4
