"""GRPO rewards: built-ins on examples, regex, the user's own functions from a module file, and their errors."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from vlmtune.train.rewards import RewardFn, build_rewards, builtin_reward, import_reward, regex_reward, score

R1 = "<think>The capital of France.\nIt is Paris.</think>\n<answer> Paris </answer>"


def run(fn, completions, references):
    n = len(completions)
    return fn(prompts=[""] * n, completions=completions, references=references, metadata=[{}] * n)


@pytest.mark.parametrize(
    ("name", "completion", "reference", "expected"),
    [
        ("exact_match", R1, "paris", 1.0),  # inside <answer>, trimmed and case-folded
        ("exact_match", "  PARIS\n", "paris", 1.0),  # no tags: the whole completion
        ("exact_match", "The answer is Paris", "Paris", 0.0),
        ("exact_match", "<answer>a</answer> then <answer>B \n c</answer>", "b c", 1.0),  # the last pair
        ("exact_match", "<answer>Paris", "Paris", 0.0),  # no closing tag: the whole completion
        ("contains", "The answer is  PARIS.", "paris", 1.0),
        ("contains", "<answer>Lyon</answer> Paris", "paris", 0.0),  # only the answer is searched
        ("contains", "<answer>it is new  york</answer>", "New York", 1.0),
        ("format", R1, "", 1.0),
        ("format", "  <think></think><answer></answer>\n", "", 1.0),
        ("format", "<answer>Paris</answer>", "", 0.0),
        ("format", "<think>a</think><answer>b</answer> and more", "", 0.0),
        ("format", "intro <think>a</think><answer>b</answer>", "", 0.0),
        # reference "a b" has 2 words: -min(1, max(0, words - 2) / 3)
        ("length_penalty", "x", "a b", 0.0),
        ("length_penalty", "x y", "a b", 0.0),
        ("length_penalty", "x y z", "a b", -1 / 3),
        ("length_penalty", "x  y\nz w", "a b", -2 / 3),
        ("length_penalty", "1 2 3 4 5", "a b", -1.0),
        ("length_penalty", " ".join("w" * 50), "a b", -1.0),  # at most -1
    ],
)
def test_builtins(name, completion, reference, expected):
    assert run(builtin_reward(name), [completion], [reference]) == [pytest.approx(expected)]


def test_unknown_builtin():
    with pytest.raises(ValueError, match="unknown built-in reward 'exact'.*exact_match"):
        builtin_reward("exact")


def test_regex_reward_searches_anywhere():
    fn = regex_reward(r"\d+ apples")
    assert run(fn, ["I have 12 apples", "no apples", "3 apples\n"], ["", "", ""]) == [1.0, 0.0, 1.0]


USER_MODULE = """
def length_bonus(prompts, completions, references, metadata):
    return [len(c) + m["bonus"] for c, m in zip(completions, metadata)]

def too_few(**kwargs):
    return [1.0]

def with_none(*, completions, **kwargs):
    return [None for _ in completions]

def not_a_list(**kwargs):
    return 1.0

def with_nan(*, completions, **kwargs):
    return [float("nan") for _ in completions]

class Scorers:
    @staticmethod
    def one(*, completions, **kwargs):
        return [1 for _ in completions]

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_rewards.py").write_text(USER_MODULE)
    (tmp_path / "broken_rewards.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("user_rewards", "broken_rewards"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return "user_rewards"


def test_import_reward_gets_the_users_function(user_module):
    fn = import_reward("user_rewards:length_bonus")
    assert fn(prompts=["p"], completions=["abc"], references=["r"], metadata=[{"bonus": 0.5}]) == [3.5]
    assert run(import_reward("user_rewards:Scorers.one"), ["a", "b"], ["", ""]) == [1, 1]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("user_rewards.length_bonus", r"rewards\[2\]\.function: 'user_rewards.length_bonus' is not 'package"),
        ("user_rewards:", "is not 'package.module:function'"),
        ("no_such_module_here:fn", r"rewards\[2\]\.function: cannot import module 'no_such_module_here': Module"),
        ("broken_rewards:fn", "cannot import module 'broken_rewards': RuntimeError: boom at import"),
        ("user_rewards:missing", "module 'user_rewards' has no attribute 'missing'"),
        ("user_rewards:NOT_A_FUNCTION", "'user_rewards:NOT_A_FUNCTION' is a int, not a function"),
    ],
)
def test_import_errors_name_the_key_and_the_cause(user_module, path, message):
    with pytest.raises(ValueError, match=message) as info:
        import_reward(path, "train.grpo.rewards[2].function")
    assert "train.grpo.rewards[2].function" in str(info.value)


def spec(name=None, regex=None, function=None, weight=1.0, label=None):
    return SimpleNamespace(name=name, regex=regex, function=function, weight=weight, label=label)


def test_build_and_score(user_module):
    fns = build_rewards(
        [
            spec(name="exact_match"),
            spec(regex=r"\d", weight=0.5),
            spec(function="user_rewards:length_bonus", weight=2.0, label="bonus"),
            SimpleNamespace(name="format"),  # missing attributes count as None; weight 1
        ]
    )
    assert [(f.label, f.weight) for f in fns] == [("exact_match", 1.0), ("regex", 0.5), ("bonus", 2.0), ("format", 1.0)]
    assert all(isinstance(f, RewardFn) for f in fns)
    total, each = score(
        fns,
        prompts=["q1", "q2"],
        completions=["<answer>42</answer>", "forty"],
        references=["42", "42"],
        metadata=[{"bonus": 1.0}, {"bonus": 0.0}],
    )
    # row 0: exact 1, regex 1, bonus len("<answer>42</answer>") + 1 = 19 + 1 = 20, format 0
    #   total = 1 + 0.5 * 1 + 2 * 20 + 0 = 41.5
    # row 1: exact 0, regex 0, bonus len("forty") + 0 = 5, format 0 -> total 2 * 5 = 10
    assert {k: v.tolist() for k, v in each.items()} == {
        "exact_match": [1.0, 0.0],
        "regex": [1.0, 0.0],
        "bonus": [20.0, 5.0],
        "format": [0.0, 0.0],
    }
    assert total.tolist() == [41.5, 10.0]


def test_default_labels_are_told_apart_by_index():
    fns = build_rewards([spec(regex="a"), spec(name="format"), spec(regex="b"), spec(name="format", label="strict")])
    assert [f.label for f in fns] == ["regex", "format", "regex_2", "strict"]


def test_build_collects_every_problem(user_module):
    with pytest.raises(ValueError) as info:
        build_rewards(
            [
                spec(name="exact_match", regex="x"),
                spec(),
                spec(name="exact"),
                spec(regex="(unclosed"),
                spec(function="no_such_module_here:fn"),
                spec(name="contains"),
                spec(regex="a", label="contains"),
            ]
        )
    problems = info.value.problems
    assert len(problems) == 6, problems
    assert problems[0].startswith("train.grpo.rewards[0]: set exactly one of name, regex, function (set: name, regex)")
    assert problems[1].startswith("train.grpo.rewards[1]: set exactly one") and "(set: none)" in problems[1]
    assert problems[2].startswith("train.grpo.rewards[2].name: unknown built-in reward 'exact'")
    assert problems[3].startswith("train.grpo.rewards[3].regex: '(unclosed' is not a valid regular expression")
    assert problems[4].startswith("train.grpo.rewards[4].function: cannot import module 'no_such_module_here'")
    assert problems[5] == (
        "train.grpo.rewards[6].label: 'contains' is already the label of train.grpo.rewards[5]; set another"
    )


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("too_few", r"reward 'too_few' returned 1 values for 2 completions: \[1.0\]"),
        ("with_none", r"reward 'with_none' returned None at index 0; expected a finite number: \[None, None\]"),
        ("not_a_list", r"reward 'not_a_list' returned 1.0; expected a list of 2 floats"),
        ("with_nan", r"reward 'with_nan' returned nan at index 0"),
    ],
)
def test_score_names_a_bad_function_and_what_it_returned(user_module, function, message):
    fns = build_rewards([spec(function=f"user_rewards:{function}")])
    with pytest.raises(ValueError, match=message):
        score(fns, ["p", "p"], ["a", "b"], ["r", "r"], [{}, {}])


def test_score_checks_input_lengths():
    with pytest.raises(ValueError, match="2 completions but 1 prompts, 2 references, 2 metadata"):
        score(build_rewards([spec(name="format")]), ["p"], ["a", "b"], ["r", "r"], [{}, {}])
