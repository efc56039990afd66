"""Tests for the synthetic shapes dataset (vlmtune.data.shapes)."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
from PIL import Image

from vlmtune.data import shapes
from vlmtune.data.shapes import (
    COLORS,
    POSITIONS,
    PREFERENCE_TASKS,
    SHAPES,
    SIZES,
    TASKS,
    corpus_texts,
    generate_shapes,
)

CAPTIONS = {f"a {z} {c} {s} at the {p}" for s in SHAPES for c in COLORS for z in SIZES for p in POSITIONS}
ANSWERS = {
    "caption": CAPTIONS,
    "attributes": {f"{c}, {s}, {z}, {p}" for s in SHAPES for c in COLORS for z in SIZES for p in POSITIONS},
    "color": set(COLORS),
    "shape": set(SHAPES),
    "size": set(SIZES),
    "position": set(POSITIONS),
    "compare": {"yes", "no"},
    "pretrain": CAPTIONS
    | {f"{c}, {s}, {z}, {p}" for s in SHAPES for c in COLORS for z in SIZES for p in POSITIONS}
    | set(SHAPES)
    | set(SIZES)
    | set(POSITIONS),
}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _shape_pixels(img: Image.Image) -> list[tuple[int, int, tuple[int, int, int]]]:
    """(x, y, rgb) of every pixel that is not background."""
    w, h = img.size
    px = img.load()
    return [(x, y, px[x, y]) for y in range(h) for x in range(w) if px[x, y] != shapes.BACKGROUND]


def _dominant(img: Image.Image) -> str:
    """The colour name of the shape in an image."""
    counts = collections.Counter(rgb for _, _, rgb in _shape_pixels(img.convert("RGB")))
    rgb = counts.most_common(1)[0][0]
    return next(name for name, value in COLORS.items() if value == rgb)


def _folder_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_tasks_constant():
    assert TASKS == (
        "caption",
        "attributes",
        "color",
        "shape",
        "size",
        "position",
        "compare",
        "pretrain",
        "motion",
        "color-pairs",
        "color-kto",
    )


def test_same_arguments_give_identical_bytes(tmp_path):
    for task in ("pretrain", "compare"):
        a = generate_shapes(tmp_path / "a", 40, task, seed=3, name=task)
        b = generate_shapes(tmp_path / "b", 40, task, seed=3, name=task)
        assert a.name == b.name == f"{task}.jsonl"
    files_a, files_b = _folder_bytes(tmp_path / "a"), _folder_bytes(tmp_path / "b")
    assert files_a == files_b
    assert len(files_a) == 2 + 40 + 80  # two JSONL files, 1 image per pretrain and 2 per compare sample


def test_different_seed_gives_different_data(tmp_path):
    a = generate_shapes(tmp_path / "a", 20, "caption", seed=0)
    b = generate_shapes(tmp_path / "b", 20, "caption", seed=1)
    assert a.read_bytes() != b.read_bytes()


IMAGE_TASKS = [t for t in TASKS if t not in ("motion", *PREFERENCE_TASKS)]  # motion: tests/data/test_video.py


@pytest.mark.parametrize("task", IMAGE_TASKS)
def test_format_paths_and_answer_vocabulary(tmp_path, task):
    path = generate_shapes(tmp_path, 60, task, seed=1, image_size=48)
    rows = _rows(path)
    assert len(rows) == 60
    seen = set()
    for row in rows:
        assert set(row) == {"messages", "images"}
        msgs = row["messages"]
        roles = [m["role"] for m in msgs]
        body = roles[1:] if roles[0] == "system" else roles
        assert body == ["user", "assistant"] * (len(body) // 2) and body
        placeholders = sum(m["content"].count("<image>") for m in msgs)
        assert placeholders == len(row["images"]) == (2 if task == "compare" else 1)
        for rel in row["images"]:
            assert not Path(rel).is_absolute()
            with Image.open(path.parent / rel) as img:
                assert img.format == "PNG" and img.size == (48, 48) and img.mode == "RGB"
        for m in msgs:
            if m["role"] == "assistant":
                assert m["content"] in ANSWERS[task]
                seen.add(m["content"])
    # Small answer sets must be fully covered by 60 samples (position: 4, compare: 2, ...).
    if task not in ("caption", "attributes", "pretrain"):
        assert seen == ANSWERS[task]


def test_preference_tasks_pair_the_right_colour_with_a_wrong_one(tmp_path):
    pairs = _rows(generate_shapes(tmp_path, 40, "color-pairs", seed=2, name="pairs"))
    for pair in pairs:
        assert set(pair) == {"messages", "chosen", "rejected", "images"}
        assert [m["role"] for m in pair["messages"]] == ["user"]
        assert pair["chosen"]["content"] in COLORS and pair["rejected"]["content"] in COLORS
        assert pair["chosen"]["content"] != pair["rejected"]["content"]
        with Image.open(tmp_path / pair["images"][0]) as img:
            assert _dominant(img) == pair["chosen"]["content"]
    assert len(pairs) == 40
    kto = _rows(generate_shapes(tmp_path, 40, "color-kto", seed=2, name="kto"))
    assert sum(r["kto_tag"] for r in kto) == 20  # an exact half desirable
    for row in kto:
        with Image.open(tmp_path / row["images"][0]) as img:
            assert (_dominant(img) == row["messages"][-1]["content"]) == row["kto_tag"]


@pytest.mark.parametrize("task", ["color", "shape", "size", "position", "caption", "attributes"])
def test_answers_match_the_pixels(tmp_path, task):
    path = generate_shapes(tmp_path, 24, task, seed=5)
    for row in _rows(path):
        answer = row["messages"][-1]["content"]
        with Image.open(path.parent / row["images"][0]) as img:
            pixels = _shape_pixels(img.convert("RGB"))
        colour = collections.Counter(rgb for _, _, rgb in pixels).most_common(1)[0][0]
        xs, ys = [x for x, _, _ in pixels], [y for _, y, _ in pixels]
        # The shape stays inside its quadrant, so its bounding box gives the position.
        vertical = "top" if max(ys) < 32 else "bottom" if min(ys) >= 32 else None
        horizontal = "left" if max(xs) < 32 else "right" if min(xs) >= 32 else None
        size = "small" if len(pixels) < 250 else "large"
        facts = {"color": colour, "position": f"{vertical} {horizontal}", "size": size}
        if task == "color":
            assert COLORS[answer] == facts["color"]
        elif task == "position":
            assert answer == facts["position"]
        elif task == "size":
            assert answer == facts["size"]
        elif task == "caption":
            assert answer.startswith(f"a {size} ") and answer.endswith(f" at the {facts['position']}")
        elif task == "attributes":
            colour_name, _, size_name, position = answer.split(", ")
            assert (COLORS[colour_name], size_name, position) == (facts["color"], size, facts["position"])
        else:
            # Triangles fill about half their box, circles ~0.79, squares all of it.
            fill = len(pixels) / ((max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1))
            expected = "triangle" if fill < 0.62 else "circle" if fill < 0.9 else "square"
            assert answer == expected


def test_compare_is_balanced_and_correct(tmp_path):
    path = generate_shapes(tmp_path, 40, "compare", seed=2)
    rows = _rows(path)
    answers = [r["messages"][-1]["content"] for r in rows]
    assert answers.count("yes") == answers.count("no") == 20
    assert rows[0]["messages"][0]["content"] == "<image><image>Do the two shapes have the same color?"
    for row, answer in zip(rows, answers):
        colours = []
        for rel in row["images"]:
            with Image.open(path.parent / rel) as img:
                pixels = _shape_pixels(img.convert("RGB"))
            colours.append(collections.Counter(rgb for _, _, rgb in pixels).most_common(1)[0][0])
        assert (colours[0] == colours[1]) == (answer == "yes")


def test_pretrain_mixture(tmp_path):
    rows = _rows(generate_shapes(tmp_path, 400, "pretrain", seed=0))
    two_turn = sum(len([m for m in r["messages"] if m["role"] == "user"]) == 2 for r in rows)
    system = sum(r["messages"][0]["role"] == "system" for r in rows)
    assert 15 <= two_turn <= 70 and 15 <= system <= 70  # about 10% each
    questions = {m["content"].replace("<image>", "") for r in rows for m in r["messages"] if m["role"] == "user"}
    assert questions == {shapes.QUESTIONS[t] for t in ("caption", "attributes", "shape", "size", "position")}
    assert "What color is the shape?" not in questions  # colour is the held-out task
    for r in rows:
        if len(r["messages"]) >= 4:
            first, second = [m["content"] for m in r["messages"] if m["role"] == "user"]
            assert first.startswith("<image>") and "<image>" not in second and first[7:] != second


def test_names_keep_splits_apart(tmp_path):
    train = generate_shapes(tmp_path, 5, "color", seed=0, name="train")
    before = _folder_bytes(tmp_path)
    test = generate_shapes(tmp_path, 5, "color", seed=1, name="test")
    after = _folder_bytes(tmp_path)
    assert all(after[k] == v for k, v in before.items())  # nothing of "train" was overwritten
    train_imgs = {i for r in _rows(train) for i in r["images"]}
    test_imgs = {i for r in _rows(test) for i in r["images"]}
    assert len(train_imgs) == len(test_imgs) == 5 and not train_imgs & test_imgs


def test_unknown_task_and_bad_arguments(tmp_path):
    with pytest.raises(
        ValueError, match="'colour'.*caption, attributes, color, shape, size, position, compare, pretrain"
    ):
        generate_shapes(tmp_path, 3, "colour")
    with pytest.raises(ValueError, match="num_samples"):
        generate_shapes(tmp_path, -1, "color")
    with pytest.raises(ValueError, match="plain file name"):
        generate_shapes(tmp_path, 1, "color", name="../x")


def test_corpus_covers_every_generated_text(tmp_path):
    corpus = set(corpus_texts())
    assert len(corpus) == len(corpus_texts())
    assert {"system", "user", "assistant", "You are a helpful assistant.", "yes", "no"} <= corpus
    assert CAPTIONS <= corpus
    for task in IMAGE_TASKS:  # motion's question is new text; its answers are corpus words (test_video.py)
        for row in _rows(generate_shapes(tmp_path, 50, task, seed=4, name=task)):
            for m in row["messages"]:
                assert m["role"] in corpus
                assert m["content"].replace("<image>", "") in corpus
