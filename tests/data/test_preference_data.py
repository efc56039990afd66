"""Preference and KTO data (vlmtune.data.formats, sharegpt, sources, kinds, check): LLaMA-Factory's ranking and
kto_tag records, TRL's preference, unpaired and prompt-completion records, read from real files with real images,
and what each method needs of a sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import write_jsonl
from vlmtune.commands.data import run_check
from vlmtune.config.data import DataConfig
from vlmtune.data.kinds import method_problems, sample_kind
from vlmtune.data.sharegpt import KINDS, WARNING_KINDS, DataError, Problem, Sample
from vlmtune.data.sources import iter_split, resolve


@pytest.fixture
def folder(tmp_path) -> Path:
    """A data folder with two real PNGs under img/."""
    (tmp_path / "img").mkdir()
    for colour in ("red", "blue"):
        Image.new("RGB", (32, 32), colour).save(tmp_path / "img" / f"{colour}.png")
    return tmp_path


def _read(spec, **data) -> tuple[list[Sample], list[Problem]]:
    got = list(iter_split(spec, DataConfig(**data), "train"))
    return [g for g in got if isinstance(g, Sample)], [g for g in got if isinstance(g, Problem)]


def _info(folder: Path, entries: dict) -> None:
    (folder / "dataset_info.json").write_text(json.dumps(entries), encoding="utf-8")


def _fields(sample: Sample) -> tuple:
    return sample.messages, sample.rejected, sample.kto_label


# ---------------------------------------------------------------------------------------------
# a. LLaMA-Factory ShareGPT ranking records
# ---------------------------------------------------------------------------------------------


def test_sharegpt_ranking_records_in_a_plain_file(folder):
    path = write_jsonl(
        folder / "ranking.jsonl",
        [
            {
                "conversations": [{"from": "human", "value": "<image>Which colour?"}],
                "chosen": {"from": "gpt", "value": "red"},
                "rejected": {"from": "gpt", "value": "blue"},
                "images": ["img/red.png"],
            },
            {
                "messages": [
                    {"role": "system", "content": "Answer in one word."},
                    {"role": "user", "content": "<image>Colour?"},
                    {"role": "assistant", "content": "Red."},
                    {"role": "user", "content": "And <image>?"},
                ],
                "chosen": "Blue.",
                "rejected": "Red.",
                "images": ["img/red.png", str(folder / "img" / "blue.png")],
            },
        ],
    )
    (first, second), problems = _read(str(path))
    assert problems == []
    assert _fields(first) == ([("user", "<image>Which colour?"), ("assistant", "red")], "blue", None)
    assert first.images == [folder / "img" / "red.png"]  # relative to the file
    assert second.messages[0] == ("system", "Answer in one word.") and second.messages[-1] == ("assistant", "Blue.")
    assert second.rejected == "Red." and second.images == [folder / "img/red.png", folder / "img/blue.png"]
    assert [sample_kind(s) for s in (first, second)] == ["pair", "pair"]


def test_sharegpt_ranking_entry_of_dataset_info(folder):
    (folder / "data").mkdir()
    write_jsonl(
        folder / "data" / "prefs.jsonl",
        [
            {
                "dialog": [{"speaker": "USER", "text": "<image>Colour?"}],
                "good": {"speaker": "BOT", "text": "red"},
                "bad": {"speaker": "BOT", "text": "green"},
                "pics": ["img/red.png"],
                "sys": "Be brief.",
            }
        ],
    )
    _info(
        folder,
        {
            "prefs": {
                "file_name": "data/prefs.jsonl",
                "ranking": True,
                "formatting": "sharegpt",
                "columns": {
                    "messages": "dialog",
                    "chosen": "good",
                    "rejected": "bad",
                    "images": "pics",
                    "system": "sys",
                },
                "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "USER", "assistant_tag": "BOT"},
            }
        },
    )
    (sample,), problems = _read("prefs", dataset_dir=str(folder))
    assert problems == []
    assert _fields(sample) == (
        [("system", "Be brief."), ("user", "<image>Colour?"), ("assistant", "red")],
        "green",
        None,
    )
    assert sample.images == [folder / "img" / "red.png"]  # relative to dataset_dir, as LLaMA-Factory reads it


# ---------------------------------------------------------------------------------------------
# b. LLaMA-Factory alpaca ranking records
# ---------------------------------------------------------------------------------------------


def test_alpaca_ranking_records_in_a_file_and_through_dataset_info(folder):
    record = {
        "instruction": "<image>Name the colour.",
        "input": "One word.",
        "chosen": "Red",
        "rejected": "Blue",
        "images": ["img/red.png"],
    }
    path = write_jsonl(folder / "alpaca_pref.jsonl", [record])
    _info(
        folder,
        {
            "alpaca_pref": {
                "file_name": "alpaca_pref.jsonl",
                "ranking": True,
                "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"},
            }
        },
    )
    for spec in (str(path), "alpaca_pref"):
        (sample,), problems = _read(spec, dataset_dir=str(folder))
        assert problems == [], spec
        assert _fields(sample) == ([("user", "<image>Name the colour.\nOne word."), ("assistant", "Red")], "Blue", None)
        assert sample.images == [folder / "img" / "red.png"]


# ---------------------------------------------------------------------------------------------
# c. TRL preference records; e. TRL prompt-completion
# ---------------------------------------------------------------------------------------------


def test_trl_preference_records_with_text_and_conversational_answers(folder):
    path = write_jsonl(
        folder / "trl.jsonl",
        [
            {"prompt": "<image>What colour?", "chosen": "red", "rejected": "blue", "images": ["img/red.png"]},
            {
                "prompt": [
                    {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": "and "}, {"type": "image"}],
                    },
                ],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "red and blue"}]}],
                "rejected": [{"role": "assistant", "content": "two reds"}],
                "images": ["img/red.png", "img/blue.png"],
            },
        ],
    )
    (text, chat), problems = _read(str(path))
    assert problems == []
    assert _fields(text) == ([("user", "<image>What colour?"), ("assistant", "red")], "blue", None)
    assert _fields(chat) == (
        [("system", "Be brief."), ("user", "<image>and <image>"), ("assistant", "red and blue")],
        "two reds",
        None,
    )
    assert chat.images == [folder / "img/red.png", folder / "img/blue.png"]  # the image parts take the column's order


def test_trl_prompt_completion_is_an_sft_sample(folder):
    path = write_jsonl(
        folder / "pc.jsonl",
        [
            {"prompt": "<image>Colour?", "completion": "red", "images": ["img/red.png"]},
            {
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
                "completion": [{"role": "assistant", "content": "blue"}],
                "images": ["img/blue.png"],
            },
        ],
    )
    samples, problems = _read(str(path))
    assert problems == []
    assert [_fields(s) for s in samples] == [
        ([("user", "<image>Colour?"), ("assistant", "red")], None, None),
        ([("user", "<image>Colour?"), ("assistant", "blue")], None, None),
    ]
    assert [sample_kind(s) for s in samples] == ["sft", "sft"]
    assert samples[1].images == [folder / "img/blue.png"]


# ---------------------------------------------------------------------------------------------
# d. KTO: LLaMA-Factory's kto_tag column, a plain file's kto_tag, TRL's unpaired label
# ---------------------------------------------------------------------------------------------


def test_kto_labels_through_dataset_info_columns(folder):
    write_jsonl(
        folder / "kto.jsonl",
        [
            {
                "messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "red"}],
                "label": True,
                "images": ["img/red.png"],
            },
            {
                "messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "blue"}],
                "label": False,
                "images": ["img/red.png"],
            },
        ],
    )
    write_jsonl(folder / "kto_alpaca.jsonl", [{"instruction": "Colour of the sky?", "output": "green", "tag": False}])
    _info(
        folder,
        {
            "kto": {
                "file_name": "kto.jsonl",
                "formatting": "sharegpt",
                "columns": {"messages": "messages", "kto_tag": "label", "images": "images"},
                "tags": {
                    "role_tag": "role",
                    "content_tag": "content",
                    "user_tag": "user",
                    "assistant_tag": "assistant",
                },
            },
            "kto_alpaca": {"file_name": "kto_alpaca.jsonl", "columns": {"kto_tag": "tag"}},
        },
    )
    samples, problems = _read(["kto", "kto_alpaca"], dataset_dir=str(folder))
    assert problems == []
    assert [(s.messages[-1][1], s.kto_label, s.rejected) for s in samples] == [
        ("red", True, None),
        ("blue", False, None),
        ("green", False, None),
    ]
    assert samples[0].images == [folder / "img/red.png"]
    assert [sample_kind(s) for s in samples] == ["labelled"] * 3


def test_kto_labels_in_plain_files(folder):
    path = write_jsonl(
        folder / "kto_plain.jsonl",
        [
            {"prompt": "<image>Colour?", "completion": "red", "label": True, "images": ["img/red.png"]},
            {"prompt": [{"role": "user", "content": "Sky?"}], "completion": "green", "label": False},
            {"conversations": [{"from": "human", "value": "Sea?"}, {"from": "gpt", "value": "blue"}], "kto_tag": True},
            # a label that is not a boolean on a conversation is the record's own metadata, not a KTO label
            {
                "messages": [{"role": "user", "content": "Grass?"}, {"role": "assistant", "content": "green"}],
                "label": "x",
            },
        ],
    )
    samples, problems = _read(str(path))
    assert problems == []
    assert [(s.messages[-1][1], s.kto_label) for s in samples] == [
        ("red", True),
        ("green", False),
        ("blue", True),
        ("green", None),
    ]


# ---------------------------------------------------------------------------------------------
# Bad records: each named, with what would be valid
# ---------------------------------------------------------------------------------------------

Q = [{"from": "human", "value": "Colour?"}]
ASK = [{"role": "user", "content": "Colour?"}]

# (id, record, kind, message fragment)
BAD_RECORDS = [
    (
        "chosen-without-rejected",
        {"conversations": Q, "chosen": "red"},
        "bad sample",
        "'chosen' is given but 'rejected' is missing; a preference pair needs both answers",
    ),
    (
        "rejected-without-chosen",
        {"prompt": "Colour?", "rejected": "blue"},
        "bad sample",
        "'rejected' is given but 'chosen' is missing",
    ),
    (
        "rejected-a-number",
        {"conversations": Q, "chosen": "red", "rejected": 3},
        "bad sample",
        "'rejected' must be an assistant message or text, got 3",
    ),
    (
        "rejected-a-user-turn",
        {"conversations": Q, "chosen": "red", "rejected": {"from": "human", "value": "blue"}},
        "bad sample",
        "'rejected' has role 'human'; an answer is the assistant's (assistant / gpt)",
    ),
    (
        "chosen-two-messages",
        {"prompt": ASK, "chosen": [{"role": "assistant", "content": "a"}] * 2, "rejected": "b"},
        "bad sample",
        "'chosen' must be one assistant message (or its text), got a list of 2",
    ),
    (
        "image-part-in-an-answer",
        {"prompt": ASK, "chosen": [{"role": "assistant", "content": [{"type": "image"}]}], "rejected": "b"},
        "bad sample",
        "'chosen' part 0 is {'type': 'image'}; an answer is text parts only",
    ),
    (
        "ranking-turns-end-with-an-answer",
        {"conversations": [*Q, {"from": "gpt", "value": "red"}], "chosen": "red", "rejected": "blue"},
        "bad sample",
        "a preference record's 'conversations' end with the user's question (its answers are 'chosen' and "
        "'rejected'), but the last turn is the assistant's",
    ),
    (
        "prompt-ends-with-an-answer",
        {"prompt": [*ASK, {"role": "assistant", "content": "red"}], "completion": "blue"},
        "bad sample",
        "'prompt' ends with an assistant turn; it ends with the user's question",
    ),
    (
        "prompt-not-text",
        {"prompt": 5, "completion": "red"},
        "bad sample",
        "'prompt' must be text or a list of messages ({role, content}), got 5",
    ),
    (
        "label-not-a-boolean",
        {"prompt": "Colour?", "completion": "red", "label": "good"},
        "bad sample",
        "'label' (a KTO label) must be true (desirable) or false (undesirable), got 'good'",
    ),
    (
        "kto_tag-not-a-boolean",
        {"conversations": [*Q, {"from": "gpt", "value": "red"}], "kto_tag": 1},
        "bad sample",
        "'kto_tag' (a KTO label) must be true (desirable) or false (undesirable), got 1",
    ),
    (
        "pair-and-label",
        {"prompt": "Colour?", "chosen": "red", "rejected": "blue", "label": True},
        "bad sample",
        "both a preference pair ('chosen', 'rejected') and a KTO label",
    ),
    (
        "empty-rejected",
        {"prompt": "Colour?", "chosen": "red", "rejected": "  "},
        "empty answer",
        "assistant turn 'rejected' (the rejected answer) is empty",
    ),
    (
        "image-in-rejected",
        {"prompt": "Colour?", "chosen": "red", "rejected": "<image> blue"},
        "image in answer",
        "assistant turn 'rejected' (the rejected answer) holds '<image>'; images go in user turns",
    ),
    (
        "image-part-without-an-image",
        {"prompt": [{"role": "user", "content": [{"type": "image"}]}], "chosen": "red", "rejected": "blue"},
        "bad sample",
        "turn 0 part 0: an image part without its image, and no images column left",
    ),
]


@pytest.mark.parametrize("record, kind, fragment", [c[1:] for c in BAD_RECORDS], ids=[c[0] for c in BAD_RECORDS])
def test_bad_preference_records_are_named(folder, record, kind, fragment):
    path = write_jsonl(folder / "bad.jsonl", [record])
    samples, problems = _read(str(path))
    assert samples == [] and len(problems) == 1, problems
    (problem,) = problems
    assert (problem.where, problem.kind) == (f"{path}:1", kind)
    assert fragment in problem.message, problem.message


def test_bad_records_of_dataset_info_entries_are_named(folder):
    write_jsonl(folder / "r.jsonl", [{"conversations": [*Q, {"from": "gpt", "value": "red"}]}])
    write_jsonl(folder / "k.jsonl", [{"conversations": [*Q, {"from": "gpt", "value": "red"}]}])
    _info(
        folder,
        {
            "r": {"file_name": "r.jsonl", "formatting": "sharegpt", "ranking": True},
            "k": {"file_name": "k.jsonl", "formatting": "sharegpt", "columns": {"kto_tag": "label"}},
            "both": {"file_name": "k.jsonl", "formatting": "sharegpt", "ranking": True, "columns": {"kto_tag": "t"}},
        },
    )
    _, (ranking,) = _read("r", dataset_dir=str(folder))
    assert ranking.message == (
        "a ranking dataset's record needs 'chosen' and 'rejected' answers (dataset_info.json ranking: true)"
    )
    _, (label,) = _read("k", dataset_dir=str(folder))
    assert label.message == (
        "no 'label' (the KTO label, columns.kto_tag): give true (desirable) or false (undesirable)"
    )
    with pytest.raises(DataError) as info:
        resolve("both", DataConfig(dataset_dir=str(folder)), "train")
    assert "dataset 'both': ranking: true and columns.kto_tag: a dataset holds preference pairs" in str(info.value)


def test_duplicates_count_the_rejected_answer_and_the_label(folder):
    pair = {"prompt": "Colour?", "chosen": "red", "rejected": "blue"}
    path = write_jsonl(
        folder / "dups.jsonl",
        [
            pair,
            {**pair, "rejected": "green"},  # another pair on the same prompt and chosen answer
            {"prompt": "Colour?", "completion": "red", "label": True},
            {"prompt": "Colour?", "completion": "red", "label": False},
            {"prompt": "Colour?", "completion": "red"},
            pair,
        ],
    )
    samples, problems = _read(str(path))
    assert len(samples) == 6
    assert [(p.where, p.kind) for p in problems] == [(f"{path}:6", "duplicate")]


# ---------------------------------------------------------------------------------------------
# What each method needs of a sample (vlmtune.data.kinds)
# ---------------------------------------------------------------------------------------------

SFT = Sample([("user", "Colour?"), ("assistant", "red")], where="d.jsonl:1")
PAIR = Sample([("user", "Colour?"), ("assistant", "red")], where="d.jsonl:2", rejected="blue")
SAME = Sample([("user", "Colour?"), ("assistant", "red")], where="d.jsonl:3", rejected=" red ")
GOOD = Sample([("user", "Colour?"), ("assistant", "red")], where="d.jsonl:4", kto_label=True)
BAD = Sample([("user", "Colour?"), ("assistant", "blue")], where="d.jsonl:5", kto_label=False)

# (method, sample, problem kind or None, message fragment)
METHOD_CASES = [
    ("sft", SFT, None, ""),
    ("sft", PAIR, None, ""),  # SFT trains the chosen answer
    ("sft", BAD, "labelled data", "a KTO-labelled answer (kto_tag: undesirable); SFT would train the undesirable"),
    ("sft", GOOD, "labelled data", "train it with method: kto"),
    ("dpo", PAIR, None, ""),
    ("dpo", SFT, "not a pair", "no rejected answer: method dpo trains preference pairs"),
    ("dpo", GOOD, "not a pair", "a KTO-labelled answer (kto_tag: desirable), not a pair"),
    ("dpo", SAME, "same answers", "the chosen and rejected answers are the same text"),
    ("kto", GOOD, None, ""),
    ("kto", BAD, None, ""),
    ("kto", SFT, "no label", "no KTO label: method kto trains answers labelled desirable (true) or undesirable"),
    ("kto", PAIR, "no label", "a preference pair (chosen and rejected answers), not an answer labelled"),
    ("grpo", SFT, None, ""),
    ("grpo", GOOD, "labelled data", "GRPO scores sampled answers against the sample's last answer"),
    ("grpo", PAIR, "pair data", "so the rejected answer would be ignored: train pairs with method: dpo"),
]


@pytest.mark.parametrize(
    "method, sample, kind, fragment",
    METHOD_CASES,
    ids=[f"{c[0]}-{sample_kind(c[1])}-{c[2] or 'ok'}-{c[1].where[-1]}" for c in METHOD_CASES],
)
def test_method_problems(method, sample, kind, fragment):
    problems = method_problems(sample, method)
    if kind is None:
        assert problems == []
        return
    (problem,) = problems
    assert (problem.where, problem.kind) == (sample.where, kind)
    assert fragment in problem.message and problem.kind in KINDS
    assert problem.is_error == (kind != "same answers")


def test_every_method_kind_is_known_and_only_same_answers_warns():
    kinds = {c[2] for c in METHOD_CASES if c[2]}
    assert kinds <= set(KINDS) and kinds & WARNING_KINDS == {"same answers"}
    with pytest.raises(ValueError, match="method 'ppo' is not one of sft, dpo, kto, grpo"):
        method_problems(SFT, "ppo")


# ---------------------------------------------------------------------------------------------
# vlmtune data check with a DPO config
# ---------------------------------------------------------------------------------------------


def test_data_check_of_a_dpo_config_names_every_sample_that_is_not_a_pair(folder, tiny_dir, capsys):
    image = ["img/red.png"]
    path = write_jsonl(
        folder / "dpo.jsonl",
        [
            {"prompt": "<image>Colour?", "chosen": "red", "rejected": "blue", "images": image},
            {
                "messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "red"}],
                "images": image,
            },
            {"prompt": "<image>Shape?", "chosen": "square", "rejected": "square", "images": image},
            {"prompt": "<image>Size?", "completion": "small", "label": False, "images": image},
        ],
    )
    cfg = folder / "dpo.yaml"
    cfg.write_text(f"model: {{path: {tiny_dir}}}\ntrain: {{method: dpo}}\ndata: {{train: {path}}}\n", encoding="utf-8")
    assert run_check(str(cfg), [], progress=False) == 1
    out = capsys.readouterr().out
    assert f"  {path}:2: no rejected answer: method dpo trains preference pairs" in out
    assert f"  {path}:3: the chosen and rejected answers are the same text" in out
    assert "give two different answers or drop the pair  (warning)" in out
    assert f"  {path}:4: a KTO-labelled answer (kto_tag: undesirable), not a pair" in out
    assert f"{path}:1:" not in out
    assert "train: 2 error(s), 1 warning(s)" in out
    rows = [line.split() for line in out.splitlines()]
    assert ["not", "a", "pair", "2", "error"] in rows and ["same", "answers", "1", "warning"] in rows
    assert ["train", "dpo", "1", "2", "1"] in rows  # samples by kind: 1 sft, 2 pairs, 1 labelled


def test_data_check_checks_each_stage_against_its_own_method(folder, tiny_dir, capsys):
    path = write_jsonl(
        folder / "pairs.jsonl",
        [{"prompt": "<image>Colour?", "chosen": "red", "rejected": "blue", "images": ["img/red.png"]}],
    )
    cfg = folder / "stages.yaml"
    cfg.write_text(
        f"model: {{path: {tiny_dir}}}\ndata: {{train: {path}}}\n"
        "stages:\n  - {name: sft, steps: 1}\n  - {name: prefs, steps: 1, method: kto}\n",
        encoding="utf-8",
    )
    assert run_check(str(cfg), [], progress=False) == 1
    out = capsys.readouterr().out
    # the same data: fine for SFT (the chosen answer trains), no label for the KTO stage
    assert "prefs:train: 1 error(s), 0 warning(s)" in out
    assert f"  {path}:1: a preference pair (chosen and rejected answers), not an answer labelled" in out
    assert out.count(f"{path}:1:") == 1
    kinds = [line.split() for line in out.splitlines() if line.startswith(("train ", "prefs:train "))]
    assert ["train", "sft", "0", "1", "0"] in kinds and ["prefs:train", "kto", "0", "1", "0"] in kinds, kinds
