"""Generation: the prompt is the training encoding up to the answer, batching (left padding) changes nothing,
predict writes one line per sample, and the chat loop takes image files by name."""

from __future__ import annotations

import json
from pathlib import Path

from vlmtune.cli import main
from vlmtune.commands.loading import load_eval_data
from vlmtune.config.schema import Config
from vlmtune.eval.alignment import encode
from vlmtune.eval.generate import GenerationSettings, chat, generate, item_prompt, predict

ROOT = Path(__file__).resolve().parents[2]


def _items(processor, path: Path, n: int):
    return load_eval_data(Config(), str(path), processor, n)


def test_prompt_is_the_training_encoding_up_to_the_answer(tiny, shapes_dir):
    _, processor = tiny
    for item in _items(processor, shapes_dir / "compare.jsonl", 2) + _items(processor, shapes_dir / "eval.jsonl", 2):
        prompt = item_prompt(processor, item)["input_ids"]
        full = encode(processor, item)
        first_label = next(i for i, label in enumerate(full["labels"]) if label != -100)
        assert prompt == full["input_ids"][:first_label]


def test_batched_generation_equals_one_at_a_time(tiny, shapes_dir):
    model, processor = tiny
    # prompts of different lengths (one and two images), so the batch is left-padded
    items = _items(processor, shapes_dir / "eval.jsonl", 3) + _items(processor, shapes_dir / "compare.jsonl", 3)
    prompts = [item_prompt(processor, it) for it in items]
    assert len({len(p["input_ids"]) for p in prompts}) > 1
    settings = GenerationSettings(max_new_tokens=5)
    batched = generate(model, processor, prompts, settings, batch_size=6)
    single = [generate(model, processor, [p], settings, batch_size=1)[0] for p in prompts]
    assert batched == single and any(batched)


def test_predict_writes_one_line_per_sample(tiny, shapes_dir, tmp_path):
    model, processor = tiny
    items = _items(processor, shapes_dir / "eval.jsonl", 5)
    out = tmp_path / "preds.jsonl"
    predict(model, processor, items, out, GenerationSettings(max_new_tokens=3), batch_size=2, progress=False)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 5
    source = [json.loads(line) for line in (shapes_dir / "eval.jsonl").read_text().splitlines()][:5]
    for line, row, item in zip(lines, source, items):
        assert set(line) == {"sample", "images", "prompt", "history", "reference", "prediction"}
        assert line["reference"] == row["messages"][-1]["content"] and line["prompt"] == row["messages"][-2]["content"]
        assert line["sample"] == item.sample.where and isinstance(line["prediction"], str)


def test_sampling_is_seeded(tiny, shapes_dir):
    model, processor = tiny
    prompts = [item_prompt(processor, it) for it in _items(processor, shapes_dir / "eval.jsonl", 4)]
    runs = [
        generate(model, processor, prompts, GenerationSettings(max_new_tokens=6, do_sample=True, seed=s), 4)
        for s in (1, 1, 2)
    ]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_chat_takes_image_files_by_name(tiny, tmp_path):
    model, processor = tiny
    said: list[str] = []
    inputs = iter(
        [
            f"/image {ROOT / 'tests/assets/red_square.png'}",
            "What color is the shape?",
            f"/image {tmp_path / 'nowhere.png'}",
            "And its shape?",
            "/quit",
        ]
    )
    history = chat(
        model, processor, GenerationSettings(max_new_tokens=3), read=lambda _: next(inputs), write=said.append
    )
    assert [r for r, _ in history] == ["user", "assistant", "user", "assistant"]
    assert history[0][1] == "<image>What color is the shape?" and history[2][1] == "And its shape?"
    assert sum(line.startswith("assistant> ") for line in said) == 2
    assert any(f"cannot use '{tmp_path / 'nowhere.png'}'" in line for line in said)


def test_predict_cli(tiny_dir, shapes_dir, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    code = main(
        [
            "predict",
            "--checkpoint",
            str(tiny_dir),
            "--data",
            str(shapes_dir / "eval.jsonl"),
            "--out",
            str(out),
            "--limit",
            "4",
            "--max-new-tokens",
            "2",
        ]
    )
    assert code == 0
    assert len(out.read_text().splitlines()) == 4
    assert f"wrote 4 predictions to {out}" in capsys.readouterr().out
