"""A split read on demand (vlmtune.data.lazy) gives what the upfront split gives: the same items, the same problems
at the same places, the same max_samples; bad and too-long samples are left out of their batch and counted once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import write_jsonl
from vlmtune.config.data import DataConfig, DataSource
from vlmtune.data.dataset import build_dataset
from vlmtune.data.lazy import NOTE, NOTES, LazyDataset, LazyReport, LeaveOut, Note
from vlmtune.data.sharegpt import DataError, Problem
from vlmtune.train.loader import make_loader

ASSETS = Path(__file__).parents[1] / "assets"
MAX_LENGTH = 60  # a 64x64 image sample fits, the 448x448 one does not (dropped)


@pytest.fixture(scope="module")
def processor(tiny):
    return tiny[1]


def _q(image: str, answer: str = "red") -> dict:
    return {
        "messages": [
            {"role": "user", "content": "<image>What color is the shape?"},
            {"role": "assistant", "content": answer},
        ],
        "images": [image],
    }


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """Good samples and one of several problems, with a BOM, CRLF line ends and blank lines around them."""
    d = tmp_path_factory.mktemp("mixed")
    (d / "images").mkdir()
    for name in ("red_square", "blue_circle", "big_gray", "corrupt"):
        shutil.copy(ASSETS / f"{name}.png", d / "images" / f"{name}.png")
    good, blue = json.dumps(_q("images/red_square.png")).encode(), json.dumps(_q("images/blue_circle.png", "blue"))
    lines = [
        b"\xef\xbb\xbf" + good,  # 1
        b"",
        b'{"messages": [',  # 3: bad JSON
        b'{"messages": "\xff"}',  # 4: not UTF-8
        json.dumps(_q("images/nope.png")).encode(),  # 5: image missing
        json.dumps(_q("images/corrupt.png")).encode() + b"\r",  # 6: image unreadable, CRLF
        b"   ",
        json.dumps({"messages": [{"role": "assistant", "content": "x"}]}).encode(),  # 8: roles out of order
        json.dumps(_q("images/big_gray.png", "gray")).encode(),  # 9: too long, dropped
        blue.encode(),  # 10
        good,  # 11: a duplicate (upfront: a warning; lazy does not look)
    ]
    (d / "mixed.jsonl").write_bytes(b"\n".join(lines))  # no newline after the last line
    return d / "mixed.jsonl"


def _same_item(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def _read_all(ds: LazyDataset) -> list[dict | Note]:
    return [ds[i] for i in range(len(ds))]


def test_lazy_items_are_the_upfront_items(processor, shapes_dir):
    train = [DataSource(path=str(shapes_dir / "train.jsonl"), max_samples=10), str(shapes_dir / "compare.jsonl")]
    data = DataConfig(train=train, max_length=512)
    upfront = build_dataset(train, data, processor, "train")
    lazy = LazyDataset(train, processor, data, "train", echo=lambda _: None)
    assert len(lazy) == len(upfront) == 18
    assert lazy.source_ids() == upfront.source_ids() == [0] * 10 + [1] * 8
    for i in range(len(lazy)):
        item = lazy[i]
        note = item.pop(NOTE)
        assert note == Note(i, upfront.items[i].sample.where, "kept")
        assert "pixel_values" in item and "image_grid_thw" in item
        _same_item(upfront[i], item)


def test_bad_samples_are_left_out_and_counted_as_upfront_skips_them(processor, mixed):
    data = DataConfig(train=str(mixed), max_length=MAX_LENGTH, on_bad_sample="skip")
    upfront = build_dataset(str(mixed), data, processor, "train")
    lazy = LazyDataset(str(mixed), processor, data, "train", echo=lambda _: None)
    assert len(lazy) == 9  # the records: blank lines are not
    loader = make_loader(lazy, processor, 4, False, 0, 0)
    kept = 0
    for batch in loader:
        new, fatal = lazy.take(batch.pop(NOTES))
        rows = len(batch["input_ids"]) if "input_ids" in batch else 0
        assert fatal == [] and len(new) == rows + sum(n.outcome in ("bad", "dropped") for n in new)
        kept += rows
    report = lazy.report
    assert kept == report.found.kept == upfront.report.kept == 3
    assert report.found.skipped == upfront.report.skipped  # the same problems, at the same places, in order
    assert report.dropped == upfront.report.dropped == [f"{mixed}:9"]
    assert report.found.skipped_by_kind() == {
        "bad JSON": 1,
        "not UTF-8": 1,
        "image missing": 1,
        "image unreadable": 1,
        "roles out of order": 1,
    }
    assert report.read == report.records == 9 and report.left_out() == 6
    # Read again (a second epoch): nothing is counted twice.
    lazy.take([lazy[i] if isinstance(lazy[i], Note) else lazy[i][NOTE] for i in range(len(lazy))])
    assert report.read == 9 and len(report.found.skipped) == 5
    assert json.loads(json.dumps(report.to_dict()))["skipped_by_kind"]["image missing"] == 1
    assert report.lines(MAX_LENGTH)[0].endswith("9 of 9 read so far, 3 kept")


def test_with_error_a_bad_sample_stops_naming_its_place(processor, mixed):
    data = DataConfig(train=str(mixed), max_length=MAX_LENGTH)
    lazy = LazyDataset(str(mixed), processor, data, "train", echo=lambda _: None)
    new, fatal = lazy.take([lazy[0][NOTE], lazy[2]])
    assert [n.outcome for n in new] == ["kept", "bad"]
    assert fatal == [Problem(f"{mixed}:4", "not UTF-8", fatal[0].message)]
    assert f"{mixed}:4: not UTF-8 text (invalid start byte at byte 14 of the line)" in str(DataError(fatal))
    _, none = lazy.take([lazy[6]])  # line 9, too long: dropped as data.too_long says, not an error
    assert none == [] and lazy.report.dropped == [f"{mixed}:9"]


def test_a_batch_of_left_out_samples_holds_only_their_notes(processor, mixed):
    lazy = LazyDataset(str(mixed), processor, DataConfig(max_length=MAX_LENGTH), "train", echo=lambda _: None)
    fn = make_loader(lazy, processor, 2, False, 0, 0).collate_fn
    assert isinstance(fn, LeaveOut)
    batch = fn([lazy[1], lazy[2]])
    assert list(batch) == [NOTES] and [n.where for n in batch[NOTES]] == [f"{mixed}:3", f"{mixed}:4"]
    batch = fn([lazy[1], lazy[0]])
    assert batch["input_ids"].shape[0] == 1 and [n.outcome for n in batch[NOTES]] == ["bad", "kept"]


def test_max_samples_counts_across_the_files_of_a_source(processor, tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    text = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(6)
    ]
    write_jsonl(folder / "a.jsonl", text[:3])
    write_jsonl(folder / "b.jsonl", text[3:])
    other = write_jsonl(tmp_path / "c.jsonl", text)
    train = [DataSource(path=str(folder), max_samples=4), str(other)]
    data = DataConfig(train=train, max_samples=2, max_length=128)
    upfront = build_dataset(train, data, processor, "train")
    lazy = LazyDataset(train, processor, data, "train", echo=lambda _: None)
    places = [lazy.place(i)[2] for i in range(len(lazy))]
    assert places == [it.sample.where for it in upfront.items]
    assert places == [f"{folder}/a.jsonl:{n}" for n in (1, 2, 3)] + [f"{folder}/b.jsonl:1"] + [
        f"{other}:{n}" for n in (1, 2)
    ]
    assert lazy.source_ids() == [0, 0, 0, 0, 1, 1]
    _same_item(upfront[5], {k: v for k, v in lazy[5].items() if k != NOTE})


def test_sources_that_hold_nothing_or_do_not_exist_are_reported_together(processor, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n\n")
    with pytest.raises(DataError) as info:
        LazyDataset([str(empty), str(tmp_path / "missing.jsonl")], processor, DataConfig(), echo=lambda _: None)
    assert [p.kind for p in info.value.found] == ["no samples", "file missing"]


def test_reports_of_several_processes_merge_each_place_once():
    a, b = LazyReport(10), LazyReport(10)
    for report, notes in (
        (
            a,
            [
                Note(0, "d:1", "kept"),
                Note(1, "d:2", "bad", (Problem("d:2", "bad JSON", "x"),)),
                Note(2, "d:3", "dropped"),
            ],
        ),
        (b, [Note(1, "d:2", "bad", (Problem("d:2", "bad JSON", "x"),)), Note(3, "d:4", "downscaled")]),
    ):
        for note in notes:
            report.add(note)
    merged = LazyReport.merged([a, b], read=4)
    assert merged.found.skipped == [Problem("d:2", "bad JSON", "x")] and merged.dropped == ["d:3"]
    assert merged.found.downscaled == ["d:4"] and merged.found.kept == 2 and merged.left_out() == 2
