"""VLMDataset's length policy, builtin sources and image errors (vlmtune.data.dataset) with the real tiny processor.

Token lengths with the tiny processor (default system prompt, 64x64 image = 16 image tokens,
448x448 = 64 image tokens, halved pixel budgets 8192 / 4096 / 2048 -> 25 / 16 / 4 tokens) are computed
in the tests from encode_text of the whole conversation, never hard-coded into the policy checks.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from vlmtune.config.data import DataConfig
from vlmtune.data import shapes
from vlmtune.data.collate import IGNORE, encode_text, image_token_counts, to_chat
from vlmtune.data.dataset import LengthReport, VLMDataset, build_dataset
from vlmtune.data.sharegpt import DataError, Format, Sample, read_samples
from vlmtune.data.sources import resolve
from vlmtune.paths import cache_dir

ASSETS = Path(__file__).parents[1] / "assets"
RED, BLUE, BIG, CORRUPT = (ASSETS / n for n in ("red_square.png", "blue_circle.png", "big_gray.png", "corrupt.png"))


def _resolved(spec, data, split):
    """(first file, record format) of a resolved source."""
    source = resolve(spec, data, split)
    return source.files[0], source.fmt


@pytest.fixture(scope="module")
def processor(tiny):
    return tiny[1]


def _image_id(processor) -> int:
    return processor.tokenizer.convert_tokens_to_ids(processor.image_token)


def _full(processor, sample: Sample, sizes, max_pixels=None):
    """Token ids and labels of the whole sample with images at the given pixel budget."""
    counts = image_token_counts(processor, sizes, None, max_pixels)
    return encode_text(processor, to_chat(sample), counts)


TEXT = Sample(messages=[("user", "Describe a square."), ("assistant", "a small blue square")], where="d.jsonl:1")
RED_Q = Sample(
    messages=[("user", "<image>What color is the shape?"), ("assistant", "red")], images=[RED], where="d.jsonl:2"
)
BIG_Q = Sample(
    messages=[("user", "<image>What color is the shape?"), ("assistant", "gray")], images=[BIG], where="d.jsonl:3"
)
MULTI = Sample(
    messages=[
        ("user", "<image>Describe the image."),
        ("assistant", "a large red square at the top left"),
        ("user", "Where is the shape?"),
        ("assistant", "top left"),
    ],
    images=[RED],
    where="d.jsonl:4",
)
LATE_IMAGE = Sample(
    messages=[
        ("user", "<image>Describe the image."),
        ("assistant", "a large red square at the top left"),
        ("user", "<image>And this one?"),
        ("assistant", "a small blue circle"),
    ],
    images=[RED, BLUE],
    where="d.jsonl:5",
)


# ---------------------------------------------------------------------------------------------
# Samples that fit
# ---------------------------------------------------------------------------------------------


def test_samples_that_fit_are_kept_with_predicted_lengths(processor):
    ds = VLMDataset([TEXT, RED_Q, BIG_Q, MULTI, LATE_IMAGE], processor, DataConfig(max_length=1024))
    assert len(ds) == 5 and ds.report.kept == 5
    assert ds.report == LengthReport(kept=5)
    assert ds.report.lines(1024) == []
    for i in range(len(ds)):
        item = ds[i]
        assert len(item["input_ids"]) == len(item["labels"]) == ds.lengths()[i]
    assert ds.lengths()[1] == len(_full(processor, RED_Q, [(64, 64)]).input_ids)
    assert ds[1]["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert ds[2]["image_grid_thw"].tolist() == [[1, 16, 16]]
    assert ds[4]["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]
    assert "pixel_values" not in ds[0]


# ---------------------------------------------------------------------------------------------
# drop
# ---------------------------------------------------------------------------------------------


def test_drop_counts_and_names_the_sample(processor):
    text_len = len(_full(processor, TEXT, []).input_ids)
    red_len = len(_full(processor, RED_Q, [(64, 64)]).input_ids)
    limit = red_len - 1
    assert text_len <= limit
    ds = VLMDataset([TEXT, RED_Q], processor, DataConfig(max_length=limit, too_long="drop"))
    assert len(ds) == 1 and ds.report.kept == 1
    assert ds.report.dropped == ["d.jsonl:2"]
    assert ds.report.downscaled == [] and ds.report.truncated == []
    assert ds.report.lines(limit) == [
        f"1 sample(s) over max_length={limit} dropped (image tokens are never cut): d.jsonl:2"
    ]
    assert ds[0]["input_ids"] == _full(processor, TEXT, []).input_ids


def test_exactly_max_length_fits(processor):
    red_len = len(_full(processor, RED_Q, [(64, 64)]).input_ids)
    ds = VLMDataset([RED_Q], processor, DataConfig(max_length=red_len))
    assert len(ds) == 1 and ds.lengths() == [red_len]


def test_report_lines_name_the_first_five():
    report = LengthReport(kept=3, dropped=[f"f:{i}" for i in range(7)], truncated=["g:1"])
    assert report.lines(64) == [
        "7 sample(s) over max_length=64 dropped (image tokens are never cut): f:0, f:1, f:2, f:3, f:4 ...",
        "1 sample(s) over max_length=64 text-truncated (image tokens are never cut): g:1",
    ]


# ---------------------------------------------------------------------------------------------
# downscale
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fits_at, grid",
    [(8192, [1, 10, 10]), (4096, [1, 8, 8]), (2048, [1, 4, 4])],
    ids=["one-halving", "two-halvings", "three-halvings"],
)
def test_downscale_shrinks_until_it_fits(processor, fits_at, grid):
    limit = len(_full(processor, BIG_Q, [(448, 448)], fits_at).input_ids)
    assert len(_full(processor, BIG_Q, [(448, 448)], fits_at * 2).input_ids) > limit  # one step less does not fit
    ds = VLMDataset([BIG_Q, TEXT], processor, DataConfig(max_length=limit, too_long="downscale"))
    assert len(ds) == 2
    assert ds.report.downscaled == ["d.jsonl:3"] and ds.report.dropped == []
    assert ds.report.lines(limit) == [
        f"1 sample(s) over max_length={limit} downscaled (image tokens are never cut): d.jsonl:3"
    ]
    item = ds[0]
    assert len(item["input_ids"]) == ds.lengths()[0] == limit
    assert item["image_grid_thw"].tolist() == [grid]
    assert item["input_ids"].count(_image_id(processor)) == grid[1] * grid[2] // 4
    assert item["pixel_values"].shape[0] == grid[1] * grid[2]
    # the text is whole: the answer is still there
    assert processor.tokenizer.decode([lab for lab in item["labels"] if lab != IGNORE]) == "gray<|im_end|>\n"


def test_downscale_respects_configured_max_pixels(processor):
    limit = len(_full(processor, BIG_Q, [(448, 448)], 4096).input_ids)
    ds = VLMDataset([BIG_Q], processor, DataConfig(max_length=limit, too_long="downscale", image_max_pixels=8192))
    assert ds.report.downscaled == ["d.jsonl:3"]
    assert ds[0]["image_grid_thw"].tolist() == [[1, 8, 8]]


def test_configured_max_pixels_applies_without_downscaling(processor):
    ds = VLMDataset([BIG_Q], processor, DataConfig(image_max_pixels=8192))
    assert ds.report == LengthReport(kept=1)
    assert ds[0]["image_grid_thw"].tolist() == [[1, 10, 10]]
    assert len(ds[0]["input_ids"]) == ds.lengths()[0] == len(_full(processor, BIG_Q, [(448, 448)], 8192).input_ids)


@pytest.mark.parametrize(
    "min_pixels, max_pixels, grids",
    [
        (16384, None, [[1, 16, 16], [1, 16, 16]]),
        (8192, None, [[1, 12, 12], [1, 16, 16]]),
        (4096, 8192, [[1, 8, 8], [1, 10, 10]]),
        (None, 2048, [[1, 4, 4], [1, 4, 4]]),
    ],
    ids=["min-16384", "min-8192", "min-4096-max-8192", "max-2048"],
)
def test_pixel_bounds_predicted_lengths_match_getitem(processor, min_pixels, max_pixels, grids):
    ds = VLMDataset([RED_Q, BIG_Q], processor, DataConfig(image_min_pixels=min_pixels, image_max_pixels=max_pixels))
    assert len(ds) == 2
    for i, grid in enumerate(grids):
        item = ds[i]
        assert item["image_grid_thw"].tolist() == [grid]
        assert len(item["input_ids"]) == ds.lengths()[i]
        assert item["input_ids"].count(_image_id(processor)) == grid[1] * grid[2] // 4


def test_downscale_that_cannot_fit_drops(processor):
    smallest = len(_full(processor, BIG_Q, [(448, 448)], 1024).input_ids)
    ds = VLMDataset([BIG_Q], processor, DataConfig(max_length=smallest - 1, too_long="downscale"))
    assert len(ds) == 0 and ds.report.dropped == ["d.jsonl:3"] and ds.report.downscaled == []


def test_downscale_text_only_sample_is_dropped(processor):
    text_len = len(_full(processor, TEXT, []).input_ids)
    ds = VLMDataset([TEXT], processor, DataConfig(max_length=text_len - 1, too_long="downscale"))
    assert len(ds) == 0 and ds.report.dropped == ["d.jsonl:1"]


# ---------------------------------------------------------------------------------------------
# truncate
# ---------------------------------------------------------------------------------------------


def test_truncate_cuts_text_after_the_image(processor):
    full = _full(processor, MULTI, [(64, 64)])
    image_end = full.image_spans[-1][1]
    first_label = next(i for i, lab in enumerate(full.labels) if lab != IGNORE)
    limit = first_label + 3  # inside the first answer, well after the image
    assert image_end < limit < len(full.input_ids)
    ds = VLMDataset([MULTI], processor, DataConfig(max_length=limit, too_long="truncate"))
    assert ds.report.truncated == ["d.jsonl:4"] and ds.report.dropped == []
    assert ds.report.lines(limit) == [
        f"1 sample(s) over max_length={limit} text-truncated (image tokens are never cut): d.jsonl:4"
    ]
    item = ds[0]
    assert len(item["input_ids"]) == len(item["labels"]) == ds.lengths()[0] == limit
    assert item["input_ids"] == full.input_ids[:limit]
    assert item["labels"] == full.labels[:limit]
    assert item["input_ids"].count(_image_id(processor)) == 16  # the image is whole
    assert item["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert sum(lab != IGNORE for lab in item["labels"]) == 3


def test_truncate_never_cuts_inside_an_image(processor):
    full = _full(processor, LATE_IMAGE, [(64, 64), (64, 64)])
    (s1, e1), (s2, e2) = full.image_spans
    assert e1 < s2
    limit = s2 + 5  # inside the second image; the first answer is within the limit
    assert any(lab != IGNORE for lab in full.labels[:limit])
    ds = VLMDataset([LATE_IMAGE], processor, DataConfig(max_length=limit, too_long="truncate"))
    assert len(ds) == 0
    assert ds.report.dropped == ["d.jsonl:5"] and ds.report.truncated == []


def test_truncate_without_any_answer_left_drops(processor):
    full = _full(processor, RED_Q, [(64, 64)])
    first_label = next(i for i, lab in enumerate(full.labels) if lab != IGNORE)
    assert full.image_spans[0][1] <= first_label
    ds = VLMDataset([RED_Q], processor, DataConfig(max_length=first_label, too_long="truncate"))
    assert len(ds) == 0 and ds.report.dropped == ["d.jsonl:2"]


# ---------------------------------------------------------------------------------------------
# Image tokens alone over the limit: dropped whatever the policy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["drop", "downscale", "truncate"])
@pytest.mark.parametrize(
    "sample, limit",
    [(BIG_Q, 3), (RED_Q, 3), (RED_Q, 10)],
    ids=["448px-limit3", "64px-limit3", "64px-limit10"],
)
def test_image_tokens_over_the_limit_drop_under_every_policy(processor, policy, sample, limit):
    ds = VLMDataset([sample], processor, DataConfig(max_length=limit, too_long=policy))
    assert len(ds) == 0 and ds.report.kept == 0
    assert ds.report.dropped == [sample.where]
    assert ds.report.downscaled == [] and ds.report.truncated == []
    assert ds.report.lines(limit) == [
        f"1 sample(s) over max_length={limit} dropped (image tokens are never cut): {sample.where}"
    ]


def test_mixed_policies_report_counts(processor):
    red_len = len(_full(processor, RED_Q, [(64, 64)]).input_ids)
    samples = [TEXT, RED_Q, BIG_Q, MULTI, LATE_IMAGE]
    ds = VLMDataset(samples, processor, DataConfig(max_length=red_len, too_long="drop"))
    assert ds.report.kept == len(ds) == 2
    assert ds.report.dropped == ["d.jsonl:3", "d.jsonl:4", "d.jsonl:5"]


# ---------------------------------------------------------------------------------------------
# Builtin sources
# ---------------------------------------------------------------------------------------------


def test_builtin_source_resolves_and_generates(processor):
    data = DataConfig(builtin_train_samples=6, builtin_eval_samples=3)
    path, fmt = _resolved("builtin:shapes:position", data, "train")
    assert fmt == Format()
    assert path == cache_dir() / "shapes" / f"position-train-6-s0-{shapes.fingerprint()}" / "train.jsonl"
    assert str(path).startswith(os.environ["VLMTUNE_CACHE"])
    train = read_samples(path, fmt)
    assert len(train) == 6
    assert all(s.messages[0] == ("user", "<image>" + shapes.QUESTIONS["position"]) for s in train)
    assert all(s.messages[1][1] in shapes.POSITIONS for s in train)
    # cached: a second resolve does not write again
    mtime = path.stat().st_mtime_ns
    assert _resolved("builtin:shapes:position", data, "train")[0] == path
    assert path.stat().st_mtime_ns == mtime
    # eval is a different draw of its own size
    eval_path, _ = _resolved("builtin:shapes:position", data, "eval")
    assert eval_path == cache_dir() / "shapes" / f"position-eval-3-s1-{shapes.fingerprint()}" / "eval.jsonl"
    evals = read_samples(eval_path)
    assert len(evals) == 3
    assert {s.images[0].read_bytes() for s in evals}.isdisjoint({s.images[0].read_bytes() for s in train})
    ds = build_dataset("builtin:shapes:position", data, processor, "train")
    assert len(ds) == 6 and ds.report.kept == 6

    assert ds[0]["image_grid_thw"].tolist() == [[1, 8, 8]]


def test_builtin_data_drawn_by_another_generator_is_not_reused(monkeypatch):
    """Cached builtin data is keyed by the generator's fingerprint: data drawn on another background (an earlier
    version's) lives in another folder and is never read for this one."""
    data = DataConfig(builtin_train_samples=4)
    path, _ = _resolved("builtin:shapes:color", data, "train")
    first = Image.open(read_samples(path)[0].images[0]).convert("RGB").getpixel((0, 0))
    assert first == shapes.BACKGROUND
    monkeypatch.setattr(shapes, "BACKGROUND", (220, 220, 220))
    shapes.fingerprint.cache_clear()
    try:
        other, _ = _resolved("builtin:shapes:color", data, "train")
        assert other.parent != path.parent
        assert Image.open(read_samples(other)[0].images[0]).convert("RGB").getpixel((0, 0)) == (220, 220, 220)
    finally:
        shapes.fingerprint.cache_clear()


def test_builtin_compare_has_two_images(processor):
    data = DataConfig(builtin_train_samples=2)
    ds = build_dataset(["builtin:shapes:compare"], data, processor, "train")
    assert len(ds) == 2
    assert ds[0]["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]
    assert ds[0]["input_ids"].count(_image_id(processor)) == 32


def test_unknown_builtin_task_lists_valid_ones():
    with pytest.raises(DataError) as info:
        _resolved("builtin:shapes:colour", DataConfig(), "train")
    valid = ", ".join(f"builtin:shapes:{t}" for t in shapes.TASKS)
    assert info.value.problems == [f"'builtin:shapes:colour': unknown builtin task 'colour'; valid: {valid}"]
    assert "builtin:shapes:color" in info.value.problems[0]


def test_build_dataset_reports_every_source_problem(processor, tmp_path):
    with pytest.raises(DataError) as info:
        build_dataset(["builtin:shapes:nope", str(tmp_path / "missing.jsonl")], DataConfig(), processor, "train")
    problems = info.value.problems
    assert len(problems) == 2
    assert problems[0].startswith("'builtin:shapes:nope': unknown builtin task 'nope'")
    assert problems[1].startswith(f"data file '{tmp_path / 'missing.jsonl'}' does not exist")


def test_build_dataset_from_files(processor, shapes_dir):
    ds = build_dataset(
        [str(shapes_dir / "train.jsonl"), str(shapes_dir / "compare.jsonl")], DataConfig(), processor, "train"
    )
    assert len(ds) == 64 + 8
    assert ds.items[0].sample.where == f"{shapes_dir / 'train.jsonl'}:1"
    assert ds.items[-1].sample.where == f"{shapes_dir / 'compare.jsonl'}:8"


# ---------------------------------------------------------------------------------------------
# Images that cannot be decoded
# ---------------------------------------------------------------------------------------------


def test_corrupt_image_at_construction_names_sample_and_path(processor, tmp_path):
    sample = Sample(messages=RED_Q.messages, images=[CORRUPT], where="bad.jsonl:9")
    with pytest.raises(DataError) as info:
        VLMDataset([RED_Q, sample], processor, DataConfig())
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"bad.jsonl:9: image '{CORRUPT}' cannot be opened:")


def test_getitem_of_corrupt_image_names_sample_and_path(processor, tmp_path):
    image = tmp_path / "shape.png"
    shutil.copy(RED, image)
    sample = Sample(messages=RED_Q.messages, images=[image], where="data.jsonl:12")
    ds = VLMDataset([sample], processor, DataConfig())
    assert len(ds) == 1
    shutil.copy(CORRUPT, image)  # the file goes bad after the length check
    with pytest.raises(ValueError) as info:
        ds[0]
    assert str(info.value).startswith(f"data.jsonl:12: image '{image}' cannot be decoded:")


def test_getitem_detects_an_image_that_changed_size(processor, tmp_path):
    image = tmp_path / "shape.png"
    shutil.copy(RED, image)
    sample = Sample(messages=RED_Q.messages, images=[image], where="data.jsonl:3")
    ds = VLMDataset([sample], processor, DataConfig())
    shutil.copy(BIG, image)
    with pytest.raises(RuntimeError, match=r"data.jsonl:3: \d+ tokens after decoding its images, \d+ predicted"):
        ds[0]
