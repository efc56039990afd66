"""The methods' settings (vlmtune.config.methods): train.method, train.dpo / kto / grpo, rewards, stage overrides and
the cross-field rules, through load_config on real YAML files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlmtune.config.errors import ConfigError
from vlmtune.config.load import config_to_yaml, load_config
from vlmtune.config.methods import METHODS, REWARD_NAMES, GRPOConfig, RewardSpec
from vlmtune.config.stages import resolve_stages


def _load(tmp_path: Path, raw: dict):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return load_config(path, echo=lambda line: None)


def _problems(tmp_path: Path, raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, raw)
    return info.value.problems


def test_defaults_are_sft_with_the_papers_settings(tmp_path):
    cfg = _load(tmp_path, {})
    assert cfg.train.method == "sft" and METHODS == ("sft", "dpo", "kto", "grpo")
    assert (cfg.train.dpo.beta, cfg.train.dpo.loss, cfg.train.dpo.cache_reference) == (0.1, "sigmoid", True)
    assert (cfg.train.kto.beta, cfg.train.kto.desirable_weight, cfg.train.kto.undesirable_weight) == (0.1, 1.0, 1.0)
    g = cfg.train.grpo
    assert (g.group_size, g.beta, g.epsilon, g.epsilon_high, g.loss, g.num_iterations) == (
        4,
        0.04,
        0.2,
        None,
        "grpo",
        1,
    )
    assert [r.label for r in g.rewards] == ["exact_match"]


def test_rewards_as_names_regexes_and_functions(tmp_path):
    cfg = _load(
        tmp_path,
        {
            "train": {
                "method": "grpo",
                "grpo": {
                    "group_size": 8,
                    "rewards": [
                        "exact_match",
                        {"name": "length_penalty", "weight": -0.1},
                        {"regex": r"^\d+$", "weight": 0.5},
                        {"function": "my_rewards.scoring:answer_score"},
                        {"function": "rewards:score"},
                    ],
                },
            }
        },
    )
    rewards = cfg.train.grpo.rewards
    assert [r.label for r in rewards] == [
        "exact_match",
        "length_penalty",
        r"regex:^\d+$",
        "my_rewards.scoring:answer_score",
        "rewards:score",
    ]
    assert [r.weight for r in rewards] == [1.0, -0.1, 0.5, 1.0, 1.0]
    # the saved config loads back to the same rewards
    path = tmp_path / "saved.yaml"
    path.write_text(config_to_yaml(cfg), encoding="utf-8")
    assert load_config(path).train.grpo.rewards == rewards


# (id, train.grpo.rewards, the problem)
BAD_REWARDS = [
    (
        "unknown-name",
        ["exact"],
        "'train.grpo.rewards.0.name': Input should be 'exact_match', 'contains', 'format' or 'length_penalty'",
    ),
    ("bad-regex", [{"regex": "(a"}], "'train.grpo.rewards.0.regex': not a valid regular expression (missing )"),
    (
        "function-without-colon",
        [{"function": "my_rewards.score"}],
        "'train.grpo.rewards.0.function': a function is given as 'package.module:function'",
    ),
    ("function-bad-module", [{"function": "my-rewards:score"}], "'train.grpo.rewards.0.function'"),
    (
        "two-kinds",
        [{"name": "contains", "regex": "x"}],
        "'train.grpo.rewards.0': a reward is exactly one of name (exact_match, contains, format, length_penalty), "
        "regex or function; name and regex are both given",
    ),
    ("none", [{"weight": 2.0}], "'train.grpo.rewards.0': a reward is exactly one of name"),
    ("empty-list", [], "'train.grpo.rewards': List should have at least 1 item"),
    ("typo", [{"regx": "a"}], "unknown key 'train.grpo.rewards.0.regx' (did you mean 'regex'?)"),
]


@pytest.mark.parametrize("rewards, fragment", [c[1:] for c in BAD_REWARDS], ids=[c[0] for c in BAD_REWARDS])
def test_bad_rewards_are_named(tmp_path, rewards, fragment):
    problems = _problems(tmp_path, {"train": {"method": "grpo", "grpo": {"rewards": rewards}}})
    assert len(problems) == 1 and fragment in problems[0], problems


def test_reward_names_and_labels():
    assert set(REWARD_NAMES) == {"exact_match", "contains", "format", "length_penalty"}
    assert RewardSpec.model_validate("format").label == "format"
    assert GRPOConfig.model_validate({"rewards": ["contains", {"regex": "a+"}]}).rewards[1].label == "regex:a+"


# (id, config, the problem)
BAD_SETTINGS = [
    ("method", {"train": {"method": "ppo"}}, "'train.method': Input should be 'sft', 'dpo', 'kto' or 'grpo'"),
    ("dpo-loss", {"train": {"dpo": {"loss": "kto_pair"}}}, "'train.dpo.loss': Input should be 'sigmoid', 'ipo'"),
    ("dpo-beta", {"train": {"dpo": {"beta": 0}}}, "'train.dpo.beta': Input should be greater than 0"),
    ("label-smoothing", {"train": {"dpo": {"label_smoothing": 0.5}}}, "'train.dpo.label_smoothing'"),
    ("kto-weight", {"train": {"kto": {"desirable_weight": 0}}}, "'train.kto.desirable_weight'"),
    ("group-size", {"train": {"grpo": {"group_size": 1}}}, "'train.grpo.group_size': Input should be greater"),
    ("top-p", {"train": {"grpo": {"top_p": 1.5}}}, "'train.grpo.top_p': Input should be less than or equal to 1"),
    ("epsilon", {"train": {"grpo": {"epsilon": 1}}}, "'train.grpo.epsilon': Input should be less than 1"),
    ("grpo-loss", {"train": {"grpo": {"loss": "ppo"}}}, "'train.grpo.loss': Input should be 'grpo', 'dr_grpo'"),
    ("switch", {"train": {"dpo": {"cache_reference": 1}}}, "'train.dpo.cache_reference': true or false"),
]


@pytest.mark.parametrize("raw, fragment", [c[1:] for c in BAD_SETTINGS], ids=[c[0] for c in BAD_SETTINGS])
def test_bad_method_settings_are_named(tmp_path, raw, fragment):
    problems = _problems(tmp_path, raw)
    assert len(problems) == 1 and fragment in problems[0], problems


PACKING = (
    "'train.packing' is true but train.method is {method}: packing lays samples end to end in shared rows; "
    "{what} are not packed (each answer is scored on its own); set train.packing: false"
)
LAZY = (
    "'data.load' is lazy but train.method is {method}: {method} reads its training data upfront (every sample "
    "checked and paired with what the method needs before the first step); set data.load: upfront (or auto)"
)


@pytest.mark.parametrize("method", ["dpo", "kto", "grpo"])
def test_packing_and_lazy_reading_are_refused_for_preference_and_rl_methods(tmp_path, method):
    what = "rollouts (a prompt's sampled answers)" if method == "grpo" else "preference pairs and labelled answers"
    problems = _problems(tmp_path, {"train": {"method": method, "packing": True}, "data": {"load": "lazy"}})
    assert problems == [PACKING.format(method=method, what=what), LAZY.format(method=method)]


@pytest.mark.parametrize("method", ["dpo", "kto", "grpo"])
def test_auto_reading_and_caching_beside_augmentation_are_accepted(tmp_path, method):
    cfg = _load(
        tmp_path,
        {"train": {"method": method}, "data": {"load": "auto", "augment": {"enabled": True}}},
    )
    assert cfg.train.dpo.cache_reference and cfg.data.augment.enabled


def test_sft_keeps_packing_and_lazy_reading(tmp_path):
    cfg = _load(tmp_path, {"train": {"packing": True}, "data": {"load": "lazy"}})
    assert cfg.train.method == "sft" and cfg.train.packing


def test_a_stage_sets_its_method_and_overrides_the_methods_settings(tmp_path):
    cfg = _load(
        tmp_path,
        {
            "train": {"dpo": {"beta": 0.2, "sft_weight": 0.1}, "grpo": {"group_size": 6}},
            "stages": [
                {"name": "sft"},
                {"name": "dpo", "method": "dpo", "dpo": {"beta": 0.05, "loss": "ipo"}},
                {"name": "grpo", "method": "grpo", "grpo": {"rewards": ["contains", {"regex": "yes"}]}},
            ],
        },
    )
    sft, dpo, grpo = (s.cfg.train for s in resolve_stages(cfg))
    assert (sft.method, dpo.method, grpo.method) == ("sft", "dpo", "grpo")
    assert (dpo.dpo.beta, dpo.dpo.loss, dpo.dpo.sft_weight) == (0.05, "ipo", 0.1)  # the rest from train.dpo
    assert sft.dpo.beta == 0.2
    assert grpo.grpo.group_size == 6 and [r.label for r in grpo.grpo.rewards] == ["contains", "regex:yes"]
    assert [r.label for r in sft.grpo.rewards] == ["exact_match"]


def test_a_stages_method_is_checked_with_the_stage_named(tmp_path):
    problems = _problems(
        tmp_path,
        {
            "train": {"packing": True},
            "stages": [{"name": "warmup"}, {"name": "prefs", "method": "kto", "kto": {"beta": 0.2}}],
        },
    )
    assert problems == [
        "stages[1] (prefs): " + PACKING.format(method="kto", what="preference pairs and labelled answers")
    ]


def test_a_stages_bad_method_settings_name_the_stage(tmp_path):
    problems = _problems(
        tmp_path,
        {"stages": [{"name": "a", "method": "grpo", "grpo": {"group_size": 1, "rewards": ["exact"]}}]},
    )
    assert len(problems) == 2, problems
    assert all(p.startswith("stages[0] (a): 'stages.0.grpo.") for p in problems), problems
