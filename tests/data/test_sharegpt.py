"""Reading multimodal ShareGPT data (vlmtune.data.sharegpt) and resolving data sources (data.sources.resolve)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from vlmtune.config.data import DataConfig
from vlmtune.data.sharegpt import DataError, DuplicateFinder, Format, Problem, Sample, read_file, read_samples
from vlmtune.data.sources import resolve

ASSETS = Path(__file__).parents[1] / "assets"
RED = ASSETS / "red_square.png"
BLUE = ASSETS / "blue_circle.png"


def _resolved(spec, data, split):
    """(first file, record format) of a resolved source."""
    source = resolve(spec, data, split)
    return source.files[0], source.fmt


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A data folder with images/red.png and images/blue.png beside where the data files go."""
    d = tmp_path / "data"
    (d / "images").mkdir(parents=True)
    shutil.copy(RED, d / "images" / "red.png")
    shutil.copy(BLUE, d / "images" / "blue.png")
    return d


def _msg(role, content):
    return {"role": role, "content": content}


def _conv(who, value):
    return {"from": who, "value": value}


def _errors(path, fmt=None) -> list[str]:
    with pytest.raises(DataError) as info:
        read_samples(path, fmt)
    assert str(info.value).startswith(f"{len(info.value.problems)} data problem(s):")
    return info.value.problems


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------

MESSAGES_RECORD = {
    "messages": [_msg("user", "<image>What is it?"), _msg("assistant", "a red square")],
    "images": ["images/red.png"],
}
CONVERSATIONS_RECORD = {
    "conversations": [_conv("human", "<image>What is it?"), _conv("gpt", "a red square")],
    "images": ["images/red.png"],
}


@pytest.mark.parametrize(
    "record, file_name, place",
    [
        (MESSAGES_RECORD, "train.jsonl", ":1"),
        (CONVERSATIONS_RECORD, "train.jsonl", ":1"),
        (MESSAGES_RECORD, "train.json", "[0]"),
        (CONVERSATIONS_RECORD, "train.json", "[0]"),
    ],
    ids=["messages-jsonl", "conversations-jsonl", "messages-json", "conversations-json"],
)
def test_both_spellings_in_json_and_jsonl(data_dir, record, file_name, place):
    path = data_dir / file_name
    if file_name.endswith(".jsonl"):
        write_jsonl(path, [record])
    else:
        path.write_text(json.dumps([record], indent=2), encoding="utf-8")
    samples = read_samples(path)
    assert len(samples) == 1
    s = samples[0]
    assert isinstance(s, Sample)
    assert s.messages == [("user", "<image>What is it?"), ("assistant", "a red square")]
    assert s.images == [data_dir / "images" / "red.png"]
    assert s.where == f"{path}{place}"


def test_json_list_in_a_jsonl_named_file(data_dir):
    path = data_dir / "list.jsonl"
    path.write_text(json.dumps([MESSAGES_RECORD, CONVERSATIONS_RECORD], indent=1), encoding="utf-8")
    samples = read_samples(path)
    assert [s.where for s in samples] == [f"{path}[0]", f"{path}[1]"]


def test_jsonl_places_count_blank_lines(data_dir):
    path = data_dir / "t.jsonl"
    path.write_text(
        "\n" + json.dumps(MESSAGES_RECORD) + "\n\n" + json.dumps(CONVERSATIONS_RECORD) + "\n", encoding="utf-8"
    )
    assert [s.where for s in read_samples(path)] == [f"{path}:2", f"{path}:4"]


def test_image_paths_are_relative_to_the_data_file_not_the_cwd(data_dir, tmp_path, monkeypatch):
    sub = data_dir / "splits"
    sub.mkdir()
    path = write_jsonl(
        sub / "t.jsonl",
        [
            {"messages": [_msg("user", "<image>a"), _msg("assistant", "b")], "images": ["../images/red.png"]},
            {"messages": [_msg("user", "<image>a"), _msg("assistant", "b")], "images": [str(BLUE)]},
            {"messages": [_msg("user", "<image>a"), _msg("assistant", "b")], "images": "../images/blue.png"},
        ],
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    samples = read_samples(path)
    assert samples[0].images == [sub / "../images/red.png"]
    assert samples[0].images[0].resolve() == (data_dir / "images" / "red.png").resolve()
    assert samples[1].images == [BLUE]  # absolute kept as it is
    assert samples[2].images == [sub / "../images/blue.png"]  # a single string is one image


def test_relative_data_path_from_another_cwd(data_dir, monkeypatch):
    write_jsonl(data_dir / "t.jsonl", [MESSAGES_RECORD])
    monkeypatch.chdir(data_dir.parent)
    (s,) = read_samples(Path("data") / "t.jsonl")
    assert s.images == [Path("data") / "images" / "red.png"]
    assert s.images[0].is_file()


def test_multi_image_multi_turn_with_system_prompt(data_dir):
    path = write_jsonl(
        data_dir / "t.jsonl",
        [
            {
                "messages": [
                    _msg("system", "Answer briefly."),
                    _msg("user", "<image><image>Same color?"),
                    _msg("assistant", "no"),
                    _msg("user", "Which is red?"),
                    _msg("assistant", "the first"),
                ],
                "images": ["images/red.png", "images/blue.png"],
            },
            {
                "conversations": [
                    _conv("system", "Be brief."),
                    _conv("human", "First <image> then"),
                    _conv("gpt", "ok"),
                    _conv("human", "<image> second"),
                    _conv("gpt", "blue"),
                ],
                "images": ["images/red.png", "images/blue.png"],
            },
        ],
    )
    a, b = read_samples(path)
    assert a.messages == [
        ("system", "Answer briefly."),
        ("user", "<image><image>Same color?"),
        ("assistant", "no"),
        ("user", "Which is red?"),
        ("assistant", "the first"),
    ]
    assert a.images == [data_dir / "images" / "red.png", data_dir / "images" / "blue.png"]
    assert [r for r, _ in b.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert b.messages[3] == ("user", "<image> second")
    assert b.where == f"{path}:2"


def test_text_only_sample(data_dir):
    path = write_jsonl(data_dir / "t.jsonl", [{"messages": [_msg("user", "hi"), _msg("assistant", "hello")]}])
    (s,) = read_samples(path)
    assert s.images == [] and s.messages == [("user", "hi"), ("assistant", "hello")]


def test_shapes_data_reads(shapes_dir):
    train = read_samples(shapes_dir / "train.jsonl")
    compare = read_samples(shapes_dir / "compare.jsonl")
    assert len(train) == 64 and len(compare) == 8
    assert all(len(s.images) == 1 and s.images[0].is_file() for s in train)
    assert all(len(s.images) == 2 for s in compare)
    assert train[0].messages[0] == ("user", "<image>Where is the shape?")


# ---------------------------------------------------------------------------------------------
# dataset_info.json names
# ---------------------------------------------------------------------------------------------


def _dataset_info(data_dir: Path, info: dict) -> None:
    (data_dir / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")


def test_dataset_info_name_with_columns_and_tags(data_dir):
    write_jsonl(
        data_dir / "custom.jsonl",
        [
            {
                "dialog": [{"speaker": "USER", "text": "<image>Color?"}, {"speaker": "BOT", "text": "red"}],
                "pics": ["images/red.png"],
                "sys": "Be brief.",
            }
        ],
    )
    _dataset_info(
        data_dir,
        {
            "custom": {
                "file_name": "custom.jsonl",
                "formatting": "sharegpt",
                "columns": {"messages": "dialog", "images": "pics", "system": "sys"},
                "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "USER", "assistant_tag": "BOT"},
            },
            "plain": {"file_name": "plain.jsonl"},
        },
    )
    path, fmt = _resolved("custom", DataConfig(dataset_dir=str(data_dir)), "train")
    assert path == data_dir / "custom.jsonl"
    assert fmt == Format(
        formatting="sharegpt",
        messages="dialog",
        images="pics",
        system="sys",
        role_tag="speaker",
        content_tag="text",
        user_tag="USER",
        assistant_tag="BOT",
    )
    (s,) = read_samples(path, fmt)
    assert s.messages == [("system", "Be brief."), ("user", "<image>Color?"), ("assistant", "red")]
    assert s.images == [data_dir / "images" / "red.png"]


def test_dataset_info_llama_factory_sharegpt_entry(data_dir):
    write_jsonl(data_dir / "lf.jsonl", [CONVERSATIONS_RECORD])
    _dataset_info(
        data_dir,
        {
            "lf_demo": {
                "file_name": "lf.jsonl",
                "formatting": "sharegpt",
                "columns": {"messages": "conversations", "images": "images"},
                "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"},
            }
        },
    )
    path, fmt = _resolved("lf_demo", DataConfig(dataset_dir=str(data_dir)), "train")
    (s,) = read_samples(path, fmt)
    assert s.messages == [("user", "<image>What is it?"), ("assistant", "a red square")]


def test_a_file_path_wins_over_dataset_info(data_dir):
    path = write_jsonl(data_dir / "t.jsonl", [MESSAGES_RECORD])
    assert _resolved(str(path), DataConfig(dataset_dir=str(data_dir)), "train") == (path, Format())
    assert _resolved(str(path), DataConfig(), "eval") == (path, Format())


@pytest.mark.parametrize(
    "spec, with_info, expected",
    [
        ("missing", True, "dataset 'missing': not a file and not a name in {info} (names: alpha, beta)"),
        ("missing", False, "dataset 'missing': not a file, and {info} does not exist"),
    ],
    ids=["unknown-name", "no-dataset_info"],
)
def test_dataset_info_errors(data_dir, spec, with_info, expected):
    if with_info:
        _dataset_info(data_dir, {"beta": {"file_name": "b.jsonl"}, "alpha": {"file_name": "a.jsonl"}})
    with pytest.raises(DataError) as info:
        _resolved(spec, DataConfig(dataset_dir=str(data_dir)), "train")
    assert info.value.problems == [expected.format(info=data_dir / "dataset_info.json")]


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"alpha": {"file_name": "a.jsonl"', "{info} is not valid JSON (Expecting"),
        ('["alpha"]', "{info} must map dataset names to objects"),
        ('{"alpha": "a.jsonl"}', "{info} must map dataset names to objects"),
    ],
    ids=["truncated", "a-list", "entry-not-an-object"],
)
def test_a_damaged_dataset_info_is_named(data_dir, content, expected):
    (data_dir / "dataset_info.json").write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        _resolved("alpha", DataConfig(dataset_dir=str(data_dir)), "train")
    (problem,) = info.value.problems
    assert problem.startswith(expected.format(info=data_dir / "dataset_info.json")), problem


def test_unknown_source_without_dataset_dir():
    with pytest.raises(DataError) as info:
        _resolved("nope.jsonl", DataConfig(), "train")
    assert info.value.problems[0].startswith(
        "data file 'nope.jsonl' does not exist (give a JSON/JSONL/Parquet/Arrow path"
    )


# ---------------------------------------------------------------------------------------------
# Errors, each naming its place
# ---------------------------------------------------------------------------------------------

GOOD = MESSAGES_RECORD

BAD_RECORDS = [
    # (id, record, expected problem after "<file>:1: ")
    ("image-missing", {**GOOD, "images": ["images/green.png"]}, "image '{dir}/images/green.png' does not exist"),
    ("image-is-a-folder", {**GOOD, "images": ["images"]}, "image '{dir}/images' is a folder, not an image file"),
    ("image-not-a-path", {**GOOD, "images": [123]}, "'images' must be a list of image paths (strings), got [123]"),
    (
        "image-in-answer",
        {**GOOD, "messages": [_msg("user", "a"), _msg("assistant", "<image>")]},
        "assistant turn 1 holds '<image>'; images go in user turns",
    ),
    ("images-not-a-list", {**GOOD, "images": {"a": 1}}, "'images' must be a list of image paths (strings)"),
    (
        "too-many-placeholders",
        {**GOOD, "messages": [_msg("user", "<image><image>a"), _msg("assistant", "b")]},
        "2 '<image>' placeholder(s) but 1 image(s); each image needs one placeholder where it appears",
    ),
    (
        "no-placeholder",
        {**GOOD, "messages": [_msg("user", "a"), _msg("assistant", "b")]},
        "0 '<image>' placeholder(s) but 1 image(s)",
    ),
    (
        "placeholder-without-image",
        {"messages": [_msg("user", "<image>a"), _msg("assistant", "b")]},
        "1 '<image>' placeholder(s) but 0 image(s)",
    ),
    (
        "roles-out-of-order",
        {**GOOD, "messages": [_msg("user", "<image>a"), _msg("user", "b"), _msg("assistant", "c")]},
        "roles out of order (user -> user -> assistant); expected user, assistant, user, assistant, ...",
    ),
    (
        "assistant-first",
        {**GOOD, "messages": [_msg("assistant", "<image>a"), _msg("user", "b")]},
        "roles out of order (assistant -> user)",
    ),
    (
        "system-not-first",
        {**GOOD, "messages": [_msg("user", "<image>a"), _msg("system", "s"), _msg("assistant", "c")]},
        "a system message may only come first",
    ),
    (
        "ends-with-user",
        {**GOOD, "messages": [_msg("user", "<image>a"), _msg("assistant", "b"), _msg("user", "c")]},
        "the last turn is from the user; a training sample ends with an assistant answer",
    ),
    (
        "unknown-role",
        {**GOOD, "messages": [_msg("user", "<image>a"), _msg("bot", "b")]},
        "turn 1 has role 'bot'; valid: user/human, assistant/gpt, system",
    ),
    (
        "unknown-from",
        {"conversations": [_conv("human", "<image>a"), _conv("robot", "b")], "images": ["images/red.png"]},
        "turn 1 has role 'robot'",
    ),
    (
        "empty-answer",
        {**GOOD, "messages": [_msg("user", "<image>a"), _msg("assistant", "  ")]},
        "assistant turn 1 is empty",
    ),
    (
        "content-parts-without-the-image",  # OpenAI content parts: the listed image needs an image part
        {**GOOD, "messages": [_msg("user", [{"type": "text", "text": "a"}]), _msg("assistant", "b")]},
        '1 image(s) of \'images\' not referred to by a {{"type": "image"}} content part',
    ),
    ("turn-not-object", {**GOOD, "messages": [_msg("user", "<image>a"), "assistant: b"]}, "turn 1 is not an object"),
    ("first-conversation-turn-not-object", {"conversations": [1, _conv("gpt", "b")]}, "turn 0 is not an object"),
    ("no-turns", {"images": []}, "no 'conversations' list of turns (expected 'messages' or 'conversations')"),
    ("empty-messages", {"messages": []}, "no 'messages' list of turns"),
    ("not-an-object", "user: hi", "a sample must be a JSON object, found str"),
]


@pytest.mark.parametrize("record, expected", [c[1:] for c in BAD_RECORDS], ids=[c[0] for c in BAD_RECORDS])
def test_bad_sample_names_its_place(data_dir, record, expected):
    path = write_jsonl(data_dir / "bad.jsonl", [record])
    problems = _errors(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}:1: " + expected.format(dir=data_dir)), problems[0]


def test_missing_data_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    assert _errors(path) == [f"data file '{path}' does not exist"]


def test_bad_json_line_names_file_and_line(data_dir):
    path = data_dir / "t.jsonl"
    path.write_text(json.dumps(GOOD) + '\n{"messages": [\n' + json.dumps(GOOD) + "\nnot json\n", encoding="utf-8")
    problems = _errors(path)
    assert len(problems) == 2
    assert problems[0].startswith(f"{path}:2: bad JSON line:")
    assert problems[1].startswith(f"{path}:4: bad JSON line:")


def test_bad_json_file_names_file_and_line(data_dir):
    path = data_dir / "t.json"
    path.write_text('[\n  {"messages": []},\n  {"messages": [}\n]\n', encoding="utf-8")
    problems = _errors(path)
    assert len(problems) == 1 and problems[0].startswith(f"{path}:3: bad JSON:")


def test_json_file_that_is_not_a_list(data_dir):
    path = data_dir / "t.json"
    path.write_text(json.dumps(GOOD), encoding="utf-8")
    assert _errors(path) == [f"{path}: a .json data file must hold a list of samples, found dict"]


def test_empty_file_holds_no_samples(data_dir):
    path = data_dir / "t.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    assert _errors(path) == [f"{path}: holds no samples"]


def test_not_utf8_jsonl_names_the_line_and_reads_on(data_dir):
    path = data_dir / "t.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"messages": "\xff\xfe"}\n' + json.dumps(GOOD).encode() + b"\n")
    (problem,) = _errors(path)
    assert problem.startswith(f"{path}:2: not UTF-8 text (invalid start byte")


def test_not_utf8_json_list_names_the_file(data_dir):
    path = data_dir / "t.json"
    path.write_bytes(b'[{"messages": "\xff\xfe"}]')
    (problem,) = _errors(path)
    assert problem.startswith(f"{path}: not UTF-8 text")


def test_utf8_bom_is_accepted(data_dir):
    path = data_dir / "t.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert [s.where for s in read_samples(path)] == [f"{path}:1"]


def test_bad_json_place_in_a_json_list(data_dir):
    path = data_dir / "t.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "images": ["images/none.png"]}]), encoding="utf-8")
    assert _errors(path) == [f"{path}[1]: image '{data_dir / 'images' / 'none.png'}' does not exist"]


def test_several_problems_reported_together(data_dir):
    path = write_jsonl(
        data_dir / "t.jsonl",
        [
            GOOD,
            {**GOOD, "images": ["images/nope.png"]},
            {**GOOD, "messages": [_msg("user", "<image>a"), _msg("assistant", "")]},
            GOOD,
            {"messages": [_msg("user", "<image><image>a"), _msg("critic", "b")], "images": ["images/red.png"]},
            {"messages": [_msg("user", "<image><image>a"), _msg("assistant", "b")], "images": ["images/missing.png"]},
        ],
    )
    problems = _errors(path)
    assert problems == [
        f"{path}:2: image '{data_dir / 'images' / 'nope.png'}' does not exist",
        f"{path}:3: assistant turn 1 is empty",
        f"{path}:5: turn 1 has role 'critic'; valid: user/human, assistant/gpt, system",
        f"{path}:6: 2 '<image>' placeholder(s) but 1 image(s); each image needs one placeholder where it appears",
        f"{path}:6: image '{data_dir / 'images' / 'missing.png'}' does not exist",
    ]


def test_many_problems_are_summarised(data_dir):
    path = write_jsonl(data_dir / "t.jsonl", [{**GOOD, "images": [f"images/n{i}.png"]} for i in range(25)])
    with pytest.raises(DataError) as info:
        read_samples(path)
    assert len(info.value.problems) == 25
    text = str(info.value)
    assert text.startswith("25 data problem(s):")
    assert text.count("\n  - ") == 20 and text.endswith("... and 5 more")


def test_empty_answer_place_counts_turns_of_the_file_with_a_system_column(data_dir):
    # The turn number in a message must point at the file's own turn list, also when the system
    # prompt comes from a separate column (it is not one of the file's turns).
    path = write_jsonl(
        data_dir / "t.jsonl",
        [
            {
                "conversations": [_conv("human", "<image>a"), _conv("gpt", "")],
                "images": ["images/red.png"],
                "system": "Be brief.",
            }
        ],
    )
    problems = _errors(path, Format(system="system"))
    assert problems == [f"{path}:1: assistant turn 1 is empty"]


# Each bad record's kind, as `vlmtune data check` counts it and `data.on_bad_sample: skip` reports it.
KIND_OF = {
    "image-missing": "image missing",
    "image-is-a-folder": "image missing",
    "image-not-a-path": "bad sample",
    "image-in-answer": "image in answer",
    "images-not-a-list": "bad sample",
    "too-many-placeholders": "image count",
    "no-placeholder": "image count",
    "placeholder-without-image": "image count",
    "roles-out-of-order": "roles out of order",
    "assistant-first": "roles out of order",
    "system-not-first": "roles out of order",
    "ends-with-user": "roles out of order",
    "unknown-role": "role",
    "unknown-from": "role",
    "empty-answer": "empty answer",
    "content-parts-without-the-image": "bad sample",
    "turn-not-object": "bad sample",
    "first-conversation-turn-not-object": "bad sample",
    "no-turns": "bad sample",
    "empty-messages": "bad sample",
    "not-an-object": "bad sample",
}


@pytest.mark.parametrize("case", BAD_RECORDS, ids=[c[0] for c in BAD_RECORDS])
def test_bad_sample_kind(data_dir, case):
    name, record, _ = case
    path = write_jsonl(data_dir / "bad.jsonl", [GOOD, record, GOOD])
    got = list(read_file(path))
    problems = [g for g in got if isinstance(g, Problem)]
    assert [(p.where, p.kind) for p in problems] == [(f"{path}:2", KIND_OF[name])]
    assert [g.where for g in got if isinstance(g, Sample)] == [f"{path}:1", f"{path}:3"]  # reading goes on


def test_missing_role_key_is_a_role_problem(data_dir):
    path = write_jsonl(data_dir / "t.jsonl", [{**GOOD, "messages": [{"content": "<image>a"}, _msg("assistant", "b")]}])
    (problem,) = list(read_file(path))
    assert problem == Problem(
        f"{path}:1", "role", "turn 0 has no 'role'; valid roles: user/human, assistant/gpt, system"
    )


def test_duplicates_name_the_first_place(data_dir):
    path = write_jsonl(data_dir / "t.jsonl", [GOOD, CONVERSATIONS_RECORD, GOOD])
    finder = DuplicateFinder()
    found = [finder.check(s) for s in read_file(path)]
    # the conversations spelling of the same turns and image is the same sample
    assert [str(p) if p else None for p in found] == [
        None,
        f"{path}:2: duplicate of {path}:1 (same messages and images)",
        f"{path}:3: duplicate of {path}:1 (same messages and images)",
    ]
