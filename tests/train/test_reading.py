"""How a stage's training split is read (vlmtune.train.reading, data.load): the choice, its refusals, and a real
run that reads lazily, leaves a bad sample out, reports it and resumes to the weights of a run never stopped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import write_jsonl
from vlmtune.cli import main
from vlmtune.config.data import DataConfig, DataSource
from vlmtune.config.errors import ConfigError
from vlmtune.config.load import load_config
from vlmtune.data.lazy import LazyDataset
from vlmtune.data.sharegpt import DataError
from vlmtune.train import reading
from vlmtune.train.distributed import make_accelerator
from vlmtune.train.loader import make_loader

TEXT = {"messages": [{"role": "user", "content": "Say red."}, {"role": "assistant", "content": "red"}]}


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    big = write_jsonl(tmp_path / "big.jsonl", [TEXT] * 30)
    small = write_jsonl(tmp_path / "small.jsonl", [TEXT] * 5)
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([TEXT] * 30), encoding="utf-8")
    return {"big": big, "small": small, "list": listed}


# name, data.load, sources, group_by_length -> lazy, what is said ("" for nothing)
CHOICES = [
    ("auto small", "auto", ["small"], False, False, ""),
    ("auto over the threshold", "auto", ["big"], False, True, "30 records (over 20; data.load: auto): read lazily"),
    ("auto counts every source", "auto", ["small", "small", "small", "small", "small"], False, True, "25 records"),
    ("auto with max_samples", "auto", [("big", 10)], False, False, ""),
    ("auto with a JSON list", "auto", ["big", "list"], False, False, "is a JSON list, read whole"),
    ("auto grouping by length", "auto", ["big"], True, False, "train.group_by_length needs every sample's length"),
    ("lazy small", "lazy", ["small"], False, True, ""),
    ("upfront big", "upfront", ["big"], False, False, ""),
]


@pytest.mark.parametrize("name,load,sources,grouped,lazy,said", CHOICES, ids=[c[0] for c in CHOICES])
def test_which_splits_are_read_lazily(files, monkeypatch, name, load, sources, grouped, lazy, said):
    monkeypatch.setattr(reading, "LAZY_FROM", 20)  # the threshold (50,000) on small files
    train = [
        DataSource(path=str(files[s[0]]), max_samples=s[1]) if isinstance(s, tuple) else str(files[s]) for s in sources
    ]
    got, why = reading.read_lazily(DataConfig(train=train, load=load), grouped)
    assert got is lazy
    assert said in (why or "") and (why is None) == (said == "")


def test_lazy_refuses_a_json_list_naming_the_key_and_the_source(files):
    with pytest.raises(ConfigError) as info:
        reading.read_lazily(DataConfig(train=str(files["list"]), load="lazy"), False)
    assert "'data.load' is lazy, but source" in str(info.value) and "is a JSON list" in str(info.value)
    assert "convert it to JSONL" in str(info.value)


def test_lazy_with_group_by_length_is_a_config_error_naming_both_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {load: lazy}\ntrain: {group_by_length: true}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "'train.group_by_length'" in str(info.value) and "'data.load' is lazy" in str(info.value)


def test_a_split_whose_every_sample_is_bad_stops_instead_of_looping(tiny, tmp_path):
    _, processor = tiny
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": []}] * 3)
    ds = LazyDataset(str(bad), processor, DataConfig(on_bad_sample="skip"), echo=lambda _: None)
    accelerator = make_accelerator(1, [], str(tmp_path))
    batches = iter(make_loader(ds, processor, 2, False, 0, 0))
    assert reading.take_notes(next(batches), ds, accelerator) is False  # nothing to train on: the step skips it
    with pytest.raises(DataError) as info:
        reading.take_notes(next(batches), ds, accelerator)
    assert "no training sample left: every sample read was left out (3 of 3 read; bad: bad sample 3" in str(info.value)


def _weights(folder: Path) -> dict:
    return load_file(folder / "adapter_model.safetensors")


@pytest.mark.slow
def test_a_lazy_run_skips_and_reports_a_bad_sample_and_resumes_to_the_same_weights(
    tiny_dir, shapes_dir, tmp_path, capsys
):
    rows = [json.loads(x) for x in (shapes_dir / "train.jsonl").read_text().splitlines()[:8]]
    rows = [{**r, "images": [str(shapes_dir / r["images"][0])]} for r in rows]
    rows.insert(3, {**rows[0], "images": [str(tmp_path / "nowhere.png")]})
    data = write_jsonl(tmp_path / "d.jsonl", rows)  # 9 records, line 4 bad: 5 batches of 2 an epoch
    config = tmp_path / "lazy.yaml"
    config.write_text(
        f"model: {{path: {tiny_dir}}}\n"
        f"data: {{train: {data}, load: lazy, on_bad_sample: skip, max_length: 256}}\n"
        f"train: {{batch_size: 2, max_steps: 6, save_steps: 3, logging_steps: 1, output_dir: {tmp_path / 'run'}, "
        "progress_bar: false}\n",
        encoding="utf-8",
    )
    assert main(["train", str(config)]) == 0
    printed = capsys.readouterr().out
    assert f"indexed {data}: 9 records" in printed
    assert f"skipped (data.on_bad_sample: skip) {data}:4: image '{tmp_path / 'nowhere.png'}' does not exist" in printed
    assert "vision cache: not used: the training split is read lazily" in printed
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())["train"]
    assert report["load"] == "lazy" and report["records"] == 9 and report["read"] == 9 and report["kept"] == 8
    assert report["skipped_by_kind"] == {"image missing": 1} and report["skipped"][0]["where"] == f"{data}:4"
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2, 3, 4, 5, 6]

    # The same run stopped after step 3 (its final weights removed): resumed, it ends with the same weights.
    shutil.copytree(tmp_path / "run", tmp_path / "again", ignore=shutil.ignore_patterns("final"))
    assert main(["train", str(config), f"train.output_dir={tmp_path / 'again'}", "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().out
    first, resumed = _weights(tmp_path / "run" / "final"), _weights(tmp_path / "again" / "final")
    assert first.keys() == resumed.keys()
    assert all((first[k] - resumed[k]).abs().max() <= 1e-6 * first[k].abs().max() for k in first)

    # With data.on_bad_sample: error the run stops at the bad sample, naming it (exit code 2).
    code = main(["train", str(config), "data.on_bad_sample=error", f"train.output_dir={tmp_path / 'stop'}"])
    assert code == 2
    assert f"{data}:4: image '{tmp_path / 'nowhere.png'}' does not exist" in capsys.readouterr().err
