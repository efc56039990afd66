"""Packed batches (several samples per row, positions restarting per sample) give the padded batch's loss and
gradients, for each M-RoPE family."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

from tests.conftest import write_jsonl
from vlmtune.config.data import DataConfig
from vlmtune.data.collate import collate
from vlmtune.data.dataset import build_dataset
from vlmtune.data.rows import PACK_ROWS, plan_rows
from vlmtune.train.loss import answer_loss
from vlmtune.train.packing import pack, rope_index_of

ASSETS = Path(__file__).parents[1] / "assets"

PLAN_CASES = [
    # name, lengths, capacity, expected rows
    ("one sample", [5], None, [[0]]),
    ("equal lengths never share a row", [4, 4, 4], None, [[0], [1], [2]]),
    ("short ones fill the longest's row", [10, 3, 7, 2], None, [[0], [2, 1], [3]]),
    ("first fit decreasing", [10, 6, 5, 4, 3, 2], None, [[0], [1, 3], [2, 4, 5]]),
    ("explicit capacity", [4, 4, 4, 4], 8, [[0, 1], [2, 3]]),
    ("a sample longer than the capacity gets its own row", [9, 2, 3], 5, [[0], [2, 1]]),
]


@pytest.mark.parametrize("name, lengths, capacity, expected", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_plan_rows(name, lengths, capacity, expected):
    rows = plan_rows(lengths, capacity)
    assert rows == expected
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= max(capacity or 0, max(lengths)) for row in rows)


def _mixed_rows(tmp_path: Path) -> list[dict]:
    """Samples of very different lengths: two images and a long answer, one image, text only, two turns."""
    red, blue = str(ASSETS / "red_square.png"), str(ASSETS / "blue_circle.png")
    long_answer = " ".join(["the red square sits left of the blue circle"] * 6)
    return [
        {
            "messages": [
                {"role": "user", "content": "<image><image>Describe both."},
                {"role": "assistant", "content": long_answer},
            ],
            "images": [red, blue],
        },
        {
            "messages": [{"role": "user", "content": "<image>Color?"}, {"role": "assistant", "content": "red"}],
            "images": [red],
        },
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]},
        {
            "messages": [
                {"role": "user", "content": "<image>Shape?"},
                {"role": "assistant", "content": "circle"},
                {"role": "user", "content": "Color?"},
                {"role": "assistant", "content": "blue"},
            ],
            "images": [blue],
        },
        {"messages": [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "1 2 3"}]},
    ]


def _batches(processor, tmp_path: Path) -> tuple[dict, dict]:
    ds = build_dataset(
        str(write_jsonl(tmp_path / "mixed.jsonl", _mixed_rows(tmp_path))),
        DataConfig(max_length=512),
        processor,
        "train",
    )
    items = [ds[i] for i in range(len(ds))]
    tok = processor.tokenizer
    fn = partial(collate, pad_id=tok.pad_token_id, image_token_id=tok.convert_tokens_to_ids(processor.image_token))
    return fn(items), fn(items, pack=True)


def _loss_and_grads(model, batch, label_only):
    model.zero_grad()
    loss = answer_loss(model, batch, label_only)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


def _same_loss_packed(model, processor, tmp_path):
    padded, ordered = _batches(processor, tmp_path)
    packed = pack(ordered, rope_index_of(model))
    rows, width = packed["input_ids"].shape
    assert rows < padded["input_ids"].shape[0] and width == padded["input_ids"].shape[1]
    assert packed["position_ids"].shape == (4, rows, width) and "attention_mask" not in packed
    assert (packed["labels"] != -100).sum() == (padded["labels"] != -100).sum()  # the same answer tokens
    model.train()
    for label_only in (True, False):
        want, want_grads = _loss_and_grads(model, padded, label_only)
        got, got_grads = _loss_and_grads(model, packed, label_only)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (label_only, got.item(), want.item())
        assert want_grads.keys() == got_grads.keys() and want_grads
        for name in want_grads:
            assert torch.allclose(got_grads[name], want_grads[name], rtol=1e-3, atol=1e-6), name


def test_packed_loss_and_gradients_equal_padded_qwen2_vl(tiny, tmp_path):
    model, processor = tiny
    assert model.config._attn_implementation == "sdpa"
    _same_loss_packed(model, processor, tmp_path)


def test_packed_loss_equals_padded_with_eager_attention(tiny_dir, tiny, tmp_path):
    _, processor = tiny
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir, attn_implementation="eager")
    _same_loss_packed(model, processor, tmp_path)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_packed_loss_and_gradients_equal_padded_other_mrope_families(family, tmp_path):
    from tests import tiny_families

    cfg, processor = getattr(tiny_families, family)()
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg)
    _same_loss_packed(model, processor, tmp_path)


def test_without_packing_a_sample_would_see_its_row_neighbour(tiny, tmp_path):
    """The restarting positions are what keeps samples apart: the same rows with plain 0..n positions (one causal
    sequence per row) change the answer logits of every sample after a row's first."""
    from vlmtune.train.loss import label_positions

    model, processor = tiny
    _, ordered = _batches(processor, tmp_path)
    packed = pack(ordered, rope_index_of(model))
    rows, width = packed["input_ids"].shape
    joined = dict(packed, position_ids=torch.arange(width).expand(4, rows, width))
    keep = label_positions(packed["labels"])
    model.eval()
    with torch.no_grad():
        apart = model(**{k: v for k, v in packed.items() if k != "labels"}, logits_to_keep=keep).logits
        mixed = model(**{k: v for k, v in joined.items() if k != "labels"}, logits_to_keep=keep).logits
    assert (apart - mixed).abs().max() > 1e-3


def test_collate_orders_samples_row_by_row(tiny, tmp_path):
    _, processor = tiny
    padded, ordered = _batches(processor, tmp_path)
    lengths = padded["attention_mask"].sum(1).tolist()
    rows = plan_rows(lengths)
    order = [i for row in rows for i in row]
    assert ordered[PACK_ROWS].tolist() == [len(row) for row in rows]
    assert torch.equal(ordered["input_ids"], padded["input_ids"][order])
    per_sample = _grids_per_sample(padded)
    assert ordered["image_grid_thw"].tolist() == [g for i in order for g in per_sample[i]]  # images follow samples


def _grids_per_sample(batch: dict, merge: int = 4) -> list[list[list[int]]]:
    """Each sample's image grids in a padded batch (images are in sample order; a grid gives t*h*w/merge tokens)."""
    grids, out, k = batch["image_grid_thw"].tolist(), [], 0
    for need in batch["mm_token_type_ids"].sum(1).tolist():
        mine = []
        while need > 0:
            mine.append(grids[k])
            need -= grids[k][0] * grids[k][1] * grids[k][2] // merge
            k += 1
        out.append(mine)
    return out


def test_packing_needs_an_mrope_model(tmp_path):
    from tests.tiny_families import llava

    cfg, _ = llava()
    assert rope_index_of(AutoModelForImageTextToText.from_config(cfg)) is None


CONFIG = """
model: {path: builtin:tiny-qwen2-vl}
groups:
  projector: {mode: lora, rank: 8, dropout: 0.0, lr: 3.0e-3}
  language_model: {mode: lora, rank: 8, dropout: 0.0, targets: attention, lr: 1.0e-3}
data: {max_length: 512}
train: {max_steps: 4, batch_size: 5, logging_steps: 1, seed: 3, progress_bar: false}
"""


def _records(run: Path) -> list[dict]:
    import json

    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_training_packed_equals_training_padded(base_dir, tmp_path, capsys):
    from vlmtune.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    data = write_jsonl(tmp_path / "mixed.jsonl", _mixed_rows(tmp_path) * 4)  # 20 samples of 30 to 141 tokens
    padded, packed = tmp_path / "padded", tmp_path / "packed"
    assert main(["train", str(config), f"data.train={data}", f"train.output_dir={padded}"]) == 0
    assert main(["train", str(config), f"data.train={data}", f"train.output_dir={packed}", "train.packing=true"]) == 0
    assert "packing: on" in capsys.readouterr().out
    want, got = _records(padded), _records(packed)
    assert len(want) == len(got) == 4
    for a, b in zip(want, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (a["loss"], b["loss"])
        assert a["tokens"] == b["tokens"] and a["answer_tokens"] == b["answer_tokens"]
    # Long and short samples in one batch: the packed rows hold less padding.
    assert sum(r["padding"] for r in got) < sum(r["padding"] for r in want)


def test_packing_on_a_model_without_mrope_is_a_config_error(tmp_path, capsys):
    from tests.tiny_families import save_family
    from vlmtune.cli import main

    model = save_family("llava", tmp_path / "llava")
    rows = [
        {
            "messages": [{"role": "user", "content": "<image>Color?"}, {"role": "assistant", "content": "red"}],
            "images": [str(ASSETS / "red_square.png")],
        }
    ]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{path: {model}}}\ndata: {{train: {data}}}\n"
        f"train: {{max_steps: 1, batch_size: 1, output_dir: {tmp_path / 'out'}, packing: true}}\n",
        encoding="utf-8",
    )
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "train.packing" in err and "llava" in err and "Qwen2-VL" in err
    assert not (tmp_path / "out").exists()  # refused before the run folder is touched
