"""`vlmtune data check` and the same checks in training (vlmtune.data.check, dataset.check_sample, on_bad_sample)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from vlmtune.commands.data import load_processor, run_check
from vlmtune.config.data import DataConfig
from vlmtune.data.dataset import build_dataset
from vlmtune.data.sharegpt import KINDS, DataError, Problem, Sample, read_file
from vlmtune.data.sources import iter_split

ASSETS = Path(__file__).parents[1] / "assets"
MAX_LENGTH = 60  # a 64x64 image sample is about 46 tokens, the 448x448 one about 97 (computed below, not assumed)


def _m(role, content):
    return {"role": role, "content": content}


def _q(image, answer="red", question="What color is the shape?"):
    return {"messages": [_m("user", "<image>" + question), _m("assistant", answer)], "images": [image]}


# line -> (kind, message fragment); the file below has exactly one problem on each of these lines.
EXPECTED = {
    2: ("bad JSON", "bad JSON line: Expecting value at column 15"),
    3: ("not UTF-8", "not UTF-8 text (invalid start byte"),
    4: ("role", "turn 0 has no 'role'; valid roles: user/human, assistant/gpt, system"),
    5: ("role", "turn 1 has role 'bot'; valid: user/human, assistant/gpt, system"),
    6: ("roles out of order", "roles out of order (user -> user -> assistant)"),
    7: ("empty answer", "assistant turn 1 is empty"),
    8: ("image count", "2 '<image>' placeholder(s) but 1 image(s)"),
    9: ("image missing", "image '{dir}/images/nope.png' does not exist"),
    10: ("image unreadable", "image '{dir}/images/corrupt.png' cannot be opened:"),
    11: ("image unreadable", "image '{dir}/images/truncated.png' cannot be opened: image file is truncated"),
    12: (
        "image too small",
        "image '{dir}/images/tiny.png' is 8x8, smaller than the processor's minimum (16 px a side, 1024 pixels)",
    ),
    13: (
        "too long",
        "97 tokens (64 of them image tokens for 1 image(s)) > data.max_length=60; data.too_long=drop: dropped",
    ),
    14: ("duplicate", "duplicate of {dir}/bad.jsonl:1 (same messages and images)"),
}
GOOD_LINES = (1, 15)


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory) -> Path:
    """bad.jsonl: two good samples (lines 1, 15) and one of each kind of problem (lines 2-14)."""
    d = tmp_path_factory.mktemp("bad")
    (d / "images").mkdir()
    for name in ("red_square", "blue_circle", "big_gray", "corrupt"):
        shutil.copy(ASSETS / f"{name}.png", d / "images" / f"{name.split('_')[-1] if name == 'corrupt' else name}.png")
    # opens (the header is intact) but does not decode: only a full decode finds it
    (d / "images" / "truncated.png").write_bytes((ASSETS / "red_square.png").read_bytes()[:60])
    Image.new("RGB", (8, 8), (255, 0, 0)).save(d / "images" / "tiny.png")
    good = _q("images/red_square.png")
    lines = [
        json.dumps(good).encode(),
        b'{"messages": [',
        b'{"messages": "\xff"}',
        json.dumps(
            {"messages": [{"content": "<image>hi"}, _m("assistant", "x")], "images": ["images/red_square.png"]}
        ).encode(),
        json.dumps(
            {"messages": [_m("user", "<image>hi"), _m("bot", "x")], "images": ["images/red_square.png"]}
        ).encode(),
        json.dumps(
            {
                "messages": [_m("user", "<image>a"), _m("user", "b"), _m("assistant", "c")],
                "images": ["images/red_square.png"],
            }
        ).encode(),
        json.dumps(
            {"messages": [_m("user", "<image>a"), _m("assistant", " ")], "images": ["images/red_square.png"]}
        ).encode(),
        json.dumps(
            {"messages": [_m("user", "<image><image>a"), _m("assistant", "b")], "images": ["images/red_square.png"]}
        ).encode(),
        json.dumps(_q("images/nope.png")).encode(),
        json.dumps(_q("images/corrupt.png")).encode(),
        json.dumps(_q("images/truncated.png")).encode(),
        json.dumps(_q("images/tiny.png")).encode(),
        json.dumps(_q("images/big_gray.png", "gray")).encode(),
        json.dumps(good).encode(),
        json.dumps(_q("images/blue_circle.png", "blue")).encode(),
    ]
    (d / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return d


@pytest.fixture(scope="module")
def processor(tiny):
    return tiny[1]


def _expected(bad_dir: Path) -> list[Problem]:
    path = bad_dir / "bad.jsonl"
    return [Problem(f"{path}:{line}", kind, text.format(dir=bad_dir)) for line, (kind, text) in EXPECTED.items()]


# Kinds exercised by their own tests below rather than in bad.jsonl.
TEMPLATE_KINDS = {"image in answer", "control token"}
# Exercised in tests/data/test_video.py (videos are made there with PyAV).
VIDEO_KINDS = {"video in answer", "video count", "video missing", "video unreadable", "video unsupported"}


# Exercised in tests/data/test_formats.py (a Parquet file that is not one).
FORMAT_KINDS = {"unreadable dataset"}
# Exercised in tests/data/test_preference_data.py (a sample against each method).
METHOD_KINDS = {"not a pair", "no label", "labelled data", "pair data", "same answers"}


def test_every_kind_is_exercised():
    exercised = {k for k, _ in EXPECTED.values()} | {"file missing", "no samples", "bad sample"} | TEMPLATE_KINDS
    assert exercised | VIDEO_KINDS | FORMAT_KINDS | METHOD_KINDS == set(KINDS)


def test_text_that_would_teach_the_template_wrong_is_an_error(tiny_dir, tmp_path, capsys):
    image = str(ASSETS / "red_square.png")
    rows = [
        {"messages": [_m("user", "<image>What is it?"), _m("assistant", "This: <image>")], "images": [image, image]},
        {"messages": [_m("user", "<image>Say <|im_end|> then stop."), _m("assistant", "ok")], "images": [image]},
        {"messages": [_m("user", "<image>Which?"), _m("assistant", "red <|image_pad|> square")], "images": [image]},
        {"messages": [_m("user", "<image>Plain <b>html</b> is text."), _m("assistant", "fine")], "images": [image]},
    ]
    path = tmp_path / "template.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert run_check(str(path), [f"model.path={tiny_dir}"], progress=False) == 1
    out = capsys.readouterr().out
    assert f"{path}:1: assistant turn 1 holds '<image>'; images go in user turns" in out
    assert f"{path}:2: user turn 0 contains '<|im_end|>': the model's chat template uses it as a control token" in out
    assert f"{path}:3: assistant turn 1 contains '<|image_pad|>'" in out
    assert f"{path}:4:" not in out  # ordinary angle brackets are text
    assert "3 error(s) in 3 sample(s)" in out


def test_check_reports_each_problem_at_its_line(bad_dir, tiny_dir, capsys):
    code = run_check(
        str(bad_dir / "bad.jsonl"), [f"model.path={tiny_dir}", f"data.max_length={MAX_LENGTH}"], progress=False
    )
    out = capsys.readouterr().out
    assert code == 1
    problem_lines = [line.strip() for line in out.splitlines() if line.startswith(f"  {bad_dir}")]
    assert len(problem_lines) == len(EXPECTED), problem_lines
    for line, expected in zip(problem_lines, _expected(bad_dir)):
        assert line.startswith(f"{expected.where}: {expected.message}"), (line, expected)
    for good in GOOD_LINES:
        assert f"bad.jsonl:{good}:" not in out
    # the summary: 15 records, 11 errors, 2 warnings, every kind counted once
    assert "train  15       7       11      2" in out
    for kind in {k for k, _ in EXPECTED.values()}:
        count = sum(1 for k, _ in EXPECTED.values() if k == kind)
        assert any(line.split("  ")[0] == kind and line.split()[-2] == str(count) for line in out.splitlines()), kind
    assert "over 60" in out and "1 (1 dropped; data.too_long=drop)" in out
    assert "11 error(s) in 11 sample(s)" in out


def test_check_of_a_config_with_a_missing_file_and_an_eval_split(bad_dir, tiny_dir, tmp_path, capsys):
    good = bad_dir / "good.jsonl"
    good.write_text(json.dumps(_q(str(bad_dir / "images" / "blue_circle.png"), "blue")) + "\n", encoding="utf-8")
    evals = tmp_path / "eval.jsonl"
    evals.write_text(json.dumps(_q(str(bad_dir / "images" / "blue_circle.png"), "blue")) + "\n", encoding="utf-8")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {{path: {tiny_dir}}}\ndata: {{train: [{good}, {tmp_path / 'gone.jsonl'}], eval: {evals}}}\n"
    )
    assert run_check(str(cfg), [], progress=False) == 1
    out = capsys.readouterr().out
    assert f"  data file '{tmp_path / 'gone.jsonl'}' does not exist" in out
    # an eval sample that repeats a train sample is named (train/eval leakage)
    assert f"  {evals}:1: duplicate of {good}:1 (same messages and images)  (warning)" in out


def test_check_of_a_config_covers_every_stages_data(bad_dir, tiny_dir, tmp_path, capsys):
    good = bad_dir / "good.jsonl"
    good.write_text(json.dumps(_q(str(bad_dir / "images" / "blue_circle.png"), "blue")) + "\n", encoding="utf-8")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {{path: {tiny_dir}}}\ndata: {{train: {good}}}\n"
        "stages:\n  - {name: align, steps: 1}\n"
        f"  - {{name: joint, steps: 1, data: {{train: {tmp_path / 'stage2.jsonl'}}}}}\n"
    )
    assert run_check(str(cfg), [], progress=False) == 1
    out = capsys.readouterr().out
    assert f"  data file '{tmp_path / 'stage2.jsonl'}' does not exist" in out  # found before stage 1 would train
    assert "joint:train" in out and "\ntrain " in out  # the first stage's split, then the second's, by name


def test_clean_data_exits_0_with_length_table(tiny_dir, shapes_dir, capsys):
    code = run_check(str(shapes_dir / "train.jsonl"), [f"model.path={tiny_dir}"], progress=False)
    out = capsys.readouterr().out
    assert code == 0 and out.rstrip().endswith("no errors")
    assert "train  64       64      0       0" in out
    row = next(
        line for line in out.splitlines() if line.startswith("train") and len(line.split()) == 10
    )  # the length table
    measured, low, p50, p90, p99, high = row.split()[1:7]
    assert measured == "64" and int(low) <= int(p50) <= int(p90) <= int(p99) <= int(high)
    assert row.split()[8] == "16.0" and row.split()[9] == "0"  # 64x64 images -> 16 tokens each; none over


def test_builtin_processor_without_building_the_base(tiny_dir):
    from transformers import AutoProcessor

    from vlmtune.config.schema import ModelConfig

    built = load_processor(ModelConfig())
    saved = AutoProcessor.from_pretrained(tiny_dir)
    assert built.tokenizer.get_vocab() == saved.tokenizer.get_vocab()
    assert built.image_processor.size == saved.image_processor.size


# ---------------------------------------------------------------------------------------------
# Training uses the same checks
# ---------------------------------------------------------------------------------------------


def test_training_data_with_error_lists_every_error_in_file_order(bad_dir, processor):
    with pytest.raises(DataError) as info:
        build_dataset(str(bad_dir / "bad.jsonl"), DataConfig(max_length=MAX_LENGTH), processor, "train")
    errors = [p for p in _expected(bad_dir) if p.is_error]
    assert [(p.where, p.kind) for p in info.value.found] == [(p.where, p.kind) for p in errors]
    assert str(info.value).startswith("11 data problem(s):")


def test_training_data_with_skip_keeps_the_rest_and_reports_counts(bad_dir, processor):
    ds = build_dataset(
        str(bad_dir / "bad.jsonl"), DataConfig(max_length=MAX_LENGTH, on_bad_sample="skip"), processor, "train"
    )
    path = bad_dir / "bad.jsonl"
    assert [it.sample.where for it in ds.items] == [f"{path}:1", f"{path}:14", f"{path}:15"]
    report = ds.report
    assert report.kept == 3 and report.dropped == [f"{path}:13"]
    assert report.skipped_by_kind() == {
        "bad JSON": 1,
        "not UTF-8": 1,
        "role": 2,
        "roles out of order": 1,
        "empty answer": 1,
        "image count": 1,
        "image missing": 1,
        "image unreadable": 2,
        "image too small": 1,
    }
    assert report.skipped_samples() == [f"{path}:{n}" for n in range(2, 13)]
    lines = report.lines(MAX_LENGTH)
    assert lines[0] == (
        "11 bad sample(s) skipped (data.on_bad_sample: skip): bad JSON 1, not UTF-8 1, role 2, roles out of order 1, "
        "empty answer 1, image count 1, image missing 1, image unreadable 2, image too small 1"
    )
    assert lines[1] == f"  skipped {path}:2: bad JSON line: Expecting value at column 15"
    assert f"1 sample(s) over max_length={MAX_LENGTH} dropped (image tokens are never cut): {path}:13" in lines
    assert (
        lines[-1]
        == f"1 duplicate sample(s) kept (each trains as often as it appears): {path}:14: duplicate of {path}:1 (same messages and images)"
    )
    data = json.loads(json.dumps(report.to_dict()))
    assert data["skipped_samples"] == 11 and data["skipped_by_kind"]["image unreadable"] == 2
    assert data["skipped"][0] == {
        "where": f"{path}:2",
        "kind": "bad JSON",
        "message": "bad JSON line: Expecting value at column 15",
    }
    assert data["duplicates"] == [
        {"where": f"{path}:14", "kind": "duplicate", "message": f"duplicate of {path}:1 (same messages and images)"}
    ]
    for i in range(len(ds)):
        assert len(ds[i]["input_ids"]) == ds.lengths()[i]


def test_skip_never_skips_a_missing_file(bad_dir, processor, tmp_path):
    with pytest.raises(DataError) as info:
        build_dataset(
            [str(bad_dir / "bad.jsonl"), str(tmp_path / "gone.jsonl")],
            DataConfig(max_length=MAX_LENGTH, on_bad_sample="skip"),
            processor,
            "train",
        )
    (problem,) = info.value.problems
    assert problem.startswith(f"data file '{tmp_path / 'gone.jsonl'}' does not exist")


def test_header_only_mode_misses_truncated_images(bad_dir, processor):
    ds = build_dataset(
        str(bad_dir / "bad.jsonl"),
        DataConfig(max_length=MAX_LENGTH, on_bad_sample="skip", decode_images=False),
        processor,
        "train",
    )
    assert ds.report.skipped_by_kind()["image unreadable"] == 1  # corrupt.png fails to open; truncated.png opens


def test_reading_streams(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(_q(str(ASSETS / "red_square.png"))) + "\n", encoding="utf-8")
    stream = read_file(path)
    first = next(stream)
    assert isinstance(first, Sample)
    with path.open("a", encoding="utf-8") as f:  # lines written after reading began are read: nothing was slurped
        f.write("not json\n")
    assert [str(p) for p in stream] == [f"{path}:2: bad JSON line: Expecting value at column 1"]
    lazy = iter_split([str(path), str(tmp_path / "later.jsonl")], DataConfig(), "train")
    assert isinstance(next(lazy), Sample)


@pytest.mark.slow
def test_training_with_skip_completes_and_reports(bad_dir, tiny_dir, tmp_path, capsys):
    from vlmtune.cli import main

    root = Path(__file__).resolve().parents[2]
    code = main(
        [
            "train",
            str(root / "examples/quickstart.yaml"),
            f"model.path={tiny_dir}",
            f"data.train={bad_dir / 'bad.jsonl'}",
            "data.eval=null",
            f"data.max_length={MAX_LENGTH}",
            "data.on_bad_sample=skip",
            "train.max_steps=2",
            "train.batch_size=2",
            f"train.output_dir={tmp_path / 'run'}",
            "train.progress_bar=false",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "train data: 3 samples" in out
    assert "11 bad sample(s) skipped (data.on_bad_sample: skip): bad JSON 1, not UTF-8 1, role 2" in out


@pytest.mark.slow
def test_cli_data_check_exit_status(bad_dir, tiny_dir, capsys):
    from vlmtune.cli import main

    assert main(["data", "check", str(bad_dir / "bad.jsonl"), f"model.path={tiny_dir}", "--no-progress"]) == 1
    assert (
        f"{bad_dir / 'bad.jsonl'}:9: image '{bad_dir / 'images' / 'nope.png'}' does not exist"
        in capsys.readouterr().out
    )


def test_an_image_claiming_an_absurd_size_is_unreadable_not_decoded(tiny_dir, tmp_path, capsys):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    # A 60-byte PNG whose header claims 40000x40000 pixels (1.6 GB decoded): refused from the header alone.
    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    (tmp_path / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(_q(str(tmp_path / "huge.png"))) + "\n", encoding="utf-8")
    assert run_check(str(path), [f"model.path={tiny_dir}"], progress=False) == 1
    out = capsys.readouterr().out
    assert f"{path}:1: image '{tmp_path / 'huge.png'}' cannot be opened:" in out
    assert "1600000000 pixels" in out
