"""Formats beyond ShareGPT (vlmtune.data.formats, vlmtune.data.hf): OpenAI content parts, TRL's messages + images,
Hugging Face datasets on disk (save_to_disk, Parquet, Arrow) with image bytes; media as data, never fetched."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import datasets
import pytest
from PIL import Image

from tests.conftest import write_jsonl
from vlmtune.cli import main
from vlmtune.config.data import DataConfig
from vlmtune.data.dataset import build_dataset
from vlmtune.data.sharegpt import Problem, Sample
from vlmtune.data.sources import iter_split


def _png(colour: str, size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path) -> Path:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(_png("red"))
    return tmp_path


def _read(spec) -> tuple[list[Sample], list[Problem]]:
    got = list(iter_split(str(spec), DataConfig(), "train"))
    return [g for g in got if isinstance(g, Sample)], [g for g in got if isinstance(g, Problem)]


def _user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


ANSWER = {"role": "assistant", "content": [{"type": "text", "text": "red"}]}


def test_openai_content_parts_with_paths_data_uris_and_file_urls(folder):
    data_uri = "data:image/png;base64," + base64.b64encode(_png("blue")).decode()
    path = write_jsonl(
        folder / "openai.jsonl",
        [
            {
                "messages": [
                    _user({"type": "image", "image": "img/red.png"}, {"type": "text", "text": "Colour?"}),
                    ANSWER,
                ]
            },
            {
                "messages": [
                    _user(
                        {"type": "text", "text": "Colour of "}, {"type": "image_url", "image_url": {"url": data_uri}}
                    ),
                    ANSWER,
                ]
            },
            {"messages": [_user({"type": "image_url", "image_url": f"file://{folder / 'img/red.png'}"}), ANSWER]},
        ],
    )
    samples, problems = _read(path)
    assert problems == []
    assert samples[0].messages == [("user", "<image>Colour?"), ("assistant", "red")]
    assert samples[0].images == [folder / "img/red.png"]
    assert samples[1].messages[0] == ("user", "Colour of <image>")
    with Image.open(samples[1].images[0]) as im:  # the data: URI was written once into the cache
        assert im.getpixel((0, 0)) == (0, 0, 255)
    assert samples[2].images == [folder / "img/red.png"]


def test_trl_messages_with_an_images_column(folder):
    path = write_jsonl(
        folder / "trl.jsonl",
        [
            {
                "messages": [_user({"type": "image"}, {"type": "text", "text": "Colour?"}), ANSWER],
                "images": ["img/red.png"],
            }
        ],
    )
    (sample,), problems = _read(path)
    assert problems == [] and sample.images == [folder / "img/red.png"]
    assert sample.messages[0] == ("user", "<image>Colour?")


@pytest.mark.parametrize(
    "parts, expected",
    [
        (
            [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}],
            "is a https URL; vlmtune reads local files only",
        ),
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}], "base64 payload does not decode"),
        ([{"type": "input_audio", "input_audio": {}}], "has type 'input_audio'; valid: text, image, image_url, video"),
        ([{"type": "image"}], "an image part without its image, and no images column left"),
        ([{"text": "no type"}], 'must be an object with a "type"'),
    ],
    ids=["http", "bad-base64", "audio", "image-part-without-image", "no-type"],
)
def test_openai_problems_name_the_line_and_part(folder, parts, expected):
    path = write_jsonl(folder / "bad.jsonl", [{"messages": [_user(*parts), ANSWER]}])
    samples, (problem,) = _read(path)
    assert samples == []
    assert str(problem).startswith(f"{path}:1: turn 0 part 0") and expected in str(problem), str(problem)


def _hf_rows(folder: Path) -> datasets.Dataset:
    features = datasets.Features(
        {
            "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
            "images": datasets.Sequence(datasets.Image()),
        }
    )
    rows = {
        "messages": [
            [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": c}]
            for c in ("red", "green")
        ],
        "images": [[{"bytes": _png("red"), "path": None}], [{"bytes": None, "path": str(folder / "img/red.png")}]],
    }
    return datasets.Dataset.from_dict(rows, features=features)


@pytest.mark.parametrize("kind", ["parquet", "save_to_disk", "arrow"])
def test_hf_datasets_on_disk_with_image_bytes(folder, kind):
    ds = _hf_rows(folder)
    if kind == "parquet":
        spec = folder / "train.parquet"
        ds.to_parquet(str(spec))
    elif kind == "save_to_disk":
        spec = folder / "saved"
        ds.save_to_disk(str(spec))
    else:
        ds.save_to_disk(str(folder / "saved"))
        spec = next((folder / "saved").glob("*.arrow"))
    before = sorted(p.name for p in spec.parent.iterdir()) if spec.is_file() else sorted(p.name for p in spec.iterdir())
    samples, problems = _read(spec)
    assert problems == []
    assert [s.messages[1][1] for s in samples] == ["red", "green"]
    assert samples[0].where == f"{spec}[0]"
    with Image.open(samples[0].images[0]) as im:
        assert im.getpixel((0, 0)) == (255, 0, 0)
    # a path-only image is embedded as bytes when the dataset is written; the bytes are what is read
    with Image.open(samples[1].images[0]) as im:
        assert im.getpixel((0, 0)) == (255, 0, 0)
    after = sorted(p.name for p in spec.parent.iterdir()) if spec.is_file() else sorted(p.name for p in spec.iterdir())
    assert after == before  # nothing written into the user's dataset folder


def test_a_file_that_is_not_a_dataset_is_named(folder):
    bad = folder / "broken.parquet"
    bad.write_bytes(b"not parquet at all")
    samples, (problem,) = _read(bad)
    assert samples == [] and str(problem).startswith(f"{bad}: cannot be read as a Hugging Face dataset")
    assert problem.kind == "unreadable dataset"


def test_every_format_trains_as_the_same_tokens(folder, tiny):
    """The same conversation as ShareGPT, OpenAI parts and a Parquet row encodes to the same ids and labels."""
    _, processor = tiny
    sharegpt = write_jsonl(
        folder / "sg.jsonl",
        [
            {
                "messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "red"}],
                "images": ["img/red.png"],
            }
        ],
    )
    openai = write_jsonl(
        folder / "oa.jsonl",
        [{"messages": [_user({"type": "image", "image": "img/red.png"}, {"type": "text", "text": "Colour?"}), ANSWER]}],
    )
    parquet = folder / "one.parquet"
    _hf_rows(folder).select([0]).to_parquet(str(parquet))
    items = [build_dataset(str(p), DataConfig(), processor, "train")[0] for p in (sharegpt, openai, parquet)]
    for item in items[1:]:
        assert item["input_ids"] == items[0]["input_ids"] and item["labels"] == items[0]["labels"]
        assert item["pixel_values"].equal(items[0]["pixel_values"])


def test_data_check_reads_a_parquet_file(folder, tiny_dir, capsys):
    spec = folder / "train.parquet"
    _hf_rows(folder).to_parquet(str(spec))
    assert main(["data", "check", str(spec), f"model.path={tiny_dir}", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "train  2        2       0       0" in printed and "no errors" in printed, printed


def test_preference_records_are_read_as_pairs(folder):
    path = write_jsonl(folder / "pref.jsonl", [{"prompt": "Q", "chosen": "good", "rejected": "bad"}])
    (sample,), problems = _read(path)
    assert problems == [] and sample.messages == [("user", "Q"), ("assistant", "good")] and sample.rejected == "bad"
    assert json.loads(path.read_text())["chosen"] == "good"
