"""A LLaMA-Factory user's own files: its example YAML and a data folder laid out like its ``data/`` (dataset_info.json
with sharegpt and alpaca entries, hub-only entries, ranking and KTO data), read and trained by vlmtune."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vlmtune.cli import main
from vlmtune.config.data import DataConfig
from vlmtune.config.load import load_config
from vlmtune.data.shapes import write_video
from vlmtune.data.sharegpt import DataError, Sample
from vlmtune.data.sources import iter_split, resolve

# LLaMA-Factory's examples/train_lora/qwen2vl_lora_sft.yaml, as shipped, with only its paths replaced.
EXAMPLE = """\
### model
model_name_or_path: {model}
image_max_pixels: 262144
video_max_pixels: 16384
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: mllm_demo,identity,alpaca_en_demo  # video: mllm_video_demo
dataset_dir: {data}
template: qwen2_vl
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: {out}
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null
"""

# Entries as LLaMA-Factory's data/dataset_info.json writes them.
DATASET_INFO = {
    "identity": {"file_name": "identity.json"},
    "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
    "mllm_demo": {
        "file_name": "mllm_demo.json",
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    },
    "mllm_video_demo": {
        "file_name": "mllm_video_demo.json",
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "videos": "videos"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    },
    "kto_en_demo": {
        "file_name": "kto_en_demo.json",
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "kto_tag": "label"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    },
    "dpo_en_demo": {
        "file_name": "dpo_en_demo.json",
        "ranking": True,
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
    },
    "alpaca_en": {"hf_hub_url": "llamafactory/alpaca_en", "ms_hub_url": "llamafactory/alpaca_en"},
    "glaive_toolcall_en": {"hf_hub_url": "llamafactory/glaive_toolcall_en", "formatting": "sharegpt"},
    "with_history": {
        "file_name": "history.json",
        "columns": {
            "prompt": "instruction",
            "query": "input",
            "response": "output",
            "history": "history",
            "system": "system",
        },
    },
}


@pytest.fixture(scope="module")
def lf_data(tmp_path_factory) -> Path:
    """A LLaMA-Factory-style data folder: images under mllm_demo_data/, JSON files, dataset_info.json."""
    root = tmp_path_factory.mktemp("lf") / "data"
    (root / "mllm_demo_data").mkdir(parents=True)
    for i, colour in enumerate(("red", "green", "blue"), start=1):
        Image.new("RGB", (64, 48), colour).save(root / "mllm_demo_data" / f"{i}.jpg")
    frames = [Image.new("RGB", (64, 48), (40 * k, 0, 0)) for k in range(6)]
    write_video(root / "mllm_demo_data" / "1.mp4", frames)

    def dump(name: str, records: list) -> None:
        (root / name).write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")

    dump(
        "mllm_demo.json",
        [
            {
                "messages": [
                    {"content": "<image>Who are they?", "role": "user"},
                    {"content": "They are players.", "role": "assistant"},
                    {"content": "What are they doing?<image>", "role": "user"},
                    {"content": "They are playing.", "role": "assistant"},
                ],
                "images": ["mllm_demo_data/1.jpg", "mllm_demo_data/2.jpg"],
            },
            {
                "messages": [
                    {"content": "<image>What colour is it?", "role": "user"},
                    {"content": "It is blue.", "role": "assistant"},
                ],
                "images": ["mllm_demo_data/3.jpg"],
            },
        ],
    )
    dump(
        "identity.json",
        [
            {
                "instruction": "hi",
                "input": "",
                "output": "Hello! I am {{name}}, an AI assistant developed by {{author}}.",
            },
            {"instruction": "Who are you?", "input": "", "output": "I am {{name}}, made by {{author}}."},
        ],
    )
    dump(
        "alpaca_en_demo.json",
        [
            {"instruction": "Describe a colour.", "input": "red", "output": "Red is warm."},
            {"instruction": "Name a shape.", "input": "", "output": "A circle."},
        ],
    )
    dump(
        "mllm_video_demo.json",
        [
            {
                "messages": [
                    {"content": "<video>Why is this video funny?", "role": "user"},
                    {"content": "Because it gets redder.", "role": "assistant"},
                ],
                "videos": ["mllm_demo_data/1.mp4"],
            }
        ],
    )
    dump(
        "kto_en_demo.json",
        [
            {"messages": [{"content": "Q", "role": "user"}, {"content": "good", "role": "assistant"}], "label": True},
            {"messages": [{"content": "Q", "role": "user"}, {"content": "bad", "role": "assistant"}], "label": False},
        ],
    )
    dump(
        "dpo_en_demo.json",
        [
            {
                "conversations": [{"from": "human", "value": "Q"}],
                "chosen": {"from": "gpt", "value": "good"},
                "rejected": {"from": "gpt", "value": "bad"},
            }
        ],
    )
    dump(
        "history.json",
        [
            {
                "instruction": "And now?",
                "input": "",
                "output": "Blue.",
                "system": "Answer in one word.",
                "history": [["Colour of the sea?", "Blue."]],
            }
        ],
    )
    dump("dataset_info.json", DATASET_INFO)  # type: ignore[arg-type]
    return root


def _read(spec, lf_data: Path, **data) -> tuple[list[Sample], list]:
    got = list(iter_split(spec, DataConfig(dataset_dir=str(lf_data), **data), "train"))
    return [g for g in got if isinstance(g, Sample)], [g for g in got if not isinstance(g, Sample)]


def test_the_example_dataset_line_reads_sharegpt_and_alpaca_entries(lf_data):
    samples, problems = _read(["mllm_demo", "identity", "alpaca_en_demo"], lf_data)
    assert problems == []
    assert len(samples) == 6
    first = samples[0]
    assert first.images == [lf_data / "mllm_demo_data/1.jpg", lf_data / "mllm_demo_data/2.jpg"]
    assert [r for r, _ in first.messages] == ["user", "assistant", "user", "assistant"]
    # alpaca: instruction and input joined with a newline, as LLaMA-Factory does; text-only (no image)
    assert samples[4].messages == [("user", "Describe a colour.\nred"), ("assistant", "Red is warm.")]
    assert samples[5].messages == [("user", "Name a shape."), ("assistant", "A circle.")]
    assert samples[2].images == [] and samples[2].messages[1][1].startswith("Hello! I am {{name}}")
    assert [s.source for s in samples] == [0, 0, 1, 1, 2, 2]


def test_alpaca_history_and_system(lf_data):
    (sample,), problems = _read("with_history", lf_data)
    assert problems == []
    assert sample.messages == [
        ("system", "Answer in one word."),
        ("user", "Colour of the sea?"),
        ("assistant", "Blue."),
        ("user", "And now?"),
        ("assistant", "Blue."),
    ]


def test_max_samples_reads_the_first_records_of_each_source(lf_data):
    samples, _ = _read(["mllm_demo", "identity", "alpaca_en_demo"], lf_data, max_samples=1)
    assert [s.where.rsplit("/", 1)[-1] for s in samples] == [
        "mllm_demo.json[0]",
        "identity.json[0]",
        "alpaca_en_demo.json[0]",
    ]


@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "alpaca_en",
            "dataset 'alpaca_en' is not a local file: it comes from the Hugging Face hub (hf_hub_url: "
            "llamafactory/alpaca_en) / the ModelScope hub (ms_hub_url: llamafactory/alpaca_en); vlmtune reads local data "
            "only: download it and give the entry a file_name",
        ),
    ],
    ids=["hub-only"],
)
def test_entries_vlmtune_cannot_read_are_refused_by_name(lf_data, name, expected):
    with pytest.raises(DataError) as info:
        resolve(name, DataConfig(dataset_dir=str(lf_data)), "train")
    (problem,) = info.value.problems
    assert problem.startswith(f"{lf_data / 'dataset_info.json'} '{name}': {expected}"), problem


def test_ranking_and_kto_entries_are_read_as_pairs_and_labelled_answers(lf_data):
    (pair,), problems = _read("dpo_en_demo", lf_data)
    assert problems == [] and pair.messages == [("user", "Q"), ("assistant", "good")] and pair.rejected == "bad"
    good, bad = _read("kto_en_demo", lf_data)[0]
    assert (good.kto_label, good.messages[-1], bad.kto_label, bad.messages[-1]) == (
        True,
        ("assistant", "good"),
        False,
        ("assistant", "bad"),
    )


def test_the_example_yaml_loads_with_every_key_translated_or_noted(lf_data, tiny_dir, tmp_path):
    path = tmp_path / "qwen2vl_lora_sft.yaml"
    path.write_text(EXAMPLE.format(model=tiny_dir, data=lf_data, out=tmp_path / "saves"), encoding="utf-8")
    lines: list[str] = []
    cfg = load_config(path, echo=lines.append)
    keys = [
        line.split(":")[0].strip() for line in EXAMPLE.splitlines() if line and not line.startswith("#") and ":" in line
    ]
    for key in keys:
        assert any(line.startswith(f"{key}: ") for line in lines), (key, lines)
    assert cfg.data.max_samples == 1000 and cfg.data.num_workers == 4 and cfg.data.video_max_pixels == 16384
    assert cfg.data.train == ["mllm_demo", "identity", "alpaca_en_demo"]
    assert any(line.startswith("preprocessing_num_workers: 16 -> no effect") for line in lines)
    assert cfg.model.dtype == "auto"  # bf16 on a CPU: noted, float32


@pytest.mark.parametrize(
    "file_key, override",
    [
        ({"train": {"output_dir": "from-file"}}, "output_dir={out}"),
        ({"output_dir": "from-file"}, "train.output_dir={out}"),
    ],
    ids=["flat-override-over-native-file", "native-override-over-flat-file"],
)
def test_the_command_line_wins_whatever_vocabulary(tmp_path, file_key, override):
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"lora_target": "merger", **file_key}), encoding="utf-8")
    out = tmp_path / "cli-out"
    cfg = load_config(path, [override.format(out=out)], echo=lambda *_: None)
    assert cfg.train.output_dir == str(out)


@pytest.mark.slow
def test_the_example_trains_images_and_text_only_samples_together(lf_data, tiny_dir, tmp_path, capsys):
    path = tmp_path / "qwen2vl_lora_sft.yaml"
    out = tmp_path / "saves"
    path.write_text(EXAMPLE.format(model=tiny_dir, data=lf_data, out=out), encoding="utf-8")
    assert main(["train", str(path), "train.progress_bar=false", "num_train_epochs=1"]) == 0
    printed = capsys.readouterr().out
    assert "train data: 6 samples" in printed
    assert (out / "final" / "adapter_model.safetensors").is_file()
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in losses)


def test_the_video_demo_is_read_as_video_not_text(lf_data, tiny):
    from vlmtune.data.dataset import build_dataset

    (sample,), problems = _read("mllm_video_demo", lf_data)
    assert problems == [] and sample.videos == [lf_data / "mllm_demo_data/1.mp4"]
    _, processor = tiny
    item = build_dataset("mllm_video_demo", DataConfig(dataset_dir=str(lf_data)), processor, "train")[0]
    video_pad = processor.tokenizer.convert_tokens_to_ids(processor.video_token)
    assert item["input_ids"].count(video_pad) > 0 and "pixel_values_videos" in item
    assert "<video>" not in processor.tokenizer.decode(item["input_ids"])
