"""LLaMA-Factory flat keys -> vlmtune config (vlmtune.config.llamafactory), through load_config and translate directly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from vlmtune.config.errors import ConfigError
from vlmtune.config.llamafactory import LLAMA_FACTORY_KEYS, translate
from vlmtune.config.load import load_config
from vlmtune.model.archs import GROUPS


def _load(tmp_path: Path, raw: dict, overrides: list[str] | None = None):
    """load_config on a YAML file holding ``raw``; returns (config, echoed lines)."""
    path = tmp_path / "lf.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    lines: list[str] = []
    cfg = load_config(path, overrides, echo=lines.append)
    return cfg, lines


def _problems(tmp_path: Path, raw: dict) -> list[str]:
    path = tmp_path / "lf.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, echo=lambda line: None)
    return info.value.problems


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A local model folder as far as config validation is concerned."""
    d = tmp_path / "qwen2-vl"
    d.mkdir()
    (d / "config.json").write_text("{}", encoding="utf-8")
    return d


# ---------------------------------------------------------------------------------------------
# Tuning keys -> group modes
# ---------------------------------------------------------------------------------------------

F = ("frozen", None)
FULL = ("full", None)
ALL = ("lora", "all-linear")
QV = ("lora", ["q_proj", "v_proj"])

# (id, LLaMA-Factory keys, expected (mode, targets) of vision_tower, projector, language_model, lm_head)
TUNING = [
    ("merger", {"lora_target": "merger"}, (F, ALL, F, F)),
    ("projector-alias", {"lora_target": "projector"}, (F, ALL, F, F)),
    ("multi_modal_projector-alias", {"lora_target": "multi_modal_projector"}, (F, ALL, F, F)),
    ("q_proj,v_proj", {"lora_target": "q_proj,v_proj"}, (F, F, QV, F)),
    ("q_proj,v_proj-spaces", {"lora_target": "q_proj, v_proj"}, (F, F, QV, F)),
    ("q_proj,v_proj-yaml-list", {"lora_target": ["q_proj", "v_proj"]}, (F, F, QV, F)),
    ("merger,q_proj,v_proj", {"lora_target": "merger,q_proj,v_proj"}, (F, ALL, QV, F)),
    ("all", {"lora_target": "all"}, (F, ALL, ALL, F)),
    ("default-is-all", {"lora_rank": 8}, (F, ALL, ALL, F)),
    ("all-freeze-projector", {"lora_target": "all", "freeze_multi_modal_projector": True}, (F, F, ALL, F)),
    ("all-freeze-language-model", {"lora_target": "all", "freeze_language_model": True}, (F, ALL, F, F)),
    ("all-vision-unfrozen", {"lora_target": "all", "freeze_vision_tower": False}, (ALL, ALL, ALL, F)),
    ("merger-vision-unfrozen", {"lora_target": "merger", "freeze_vision_tower": False}, (FULL, ALL, F, F)),
    ("names-vision-unfrozen", {"lora_target": "q_proj,v_proj", "freeze_vision_tower": False}, (FULL, F, QV, F)),
    (
        "additional-merger-with-lm-lora",
        {"lora_target": "q_proj,v_proj", "additional_target": "merger"},
        (F, FULL, QV, F),
    ),
    ("additional-merger-default-target", {"additional_target": "merger"}, (F, FULL, ALL, F)),
    ("additional-merger-with-all", {"lora_target": "all", "additional_target": "merger"}, (F, FULL, ALL, F)),
    ("projector-unfrozen", {"lora_target": "q_proj,v_proj", "freeze_multi_modal_projector": False}, (F, FULL, QV, F)),
    ("finetuning-full", {"finetuning_type": "full"}, (F, FULL, FULL, FULL)),
    (
        "finetuning-full-freeze-projector",
        {"finetuning_type": "full", "freeze_multi_modal_projector": True},
        (F, F, FULL, FULL),
    ),
    ("finetuning-full-vision", {"finetuning_type": "full", "freeze_vision_tower": False}, (FULL, FULL, FULL, FULL)),
]


@pytest.mark.parametrize("raw, expected", [c[1:] for c in TUNING], ids=[c[0] for c in TUNING])
def test_tuning_keys_to_groups(tmp_path, raw, expected):
    cfg, lines = _load(tmp_path, raw)
    got = {}
    for g in GROUPS:
        group = cfg.group(g)
        got[g] = (group.mode, group.targets if group.mode == "lora" else None)
    assert got == dict(zip(GROUPS, expected))
    for g, (mode, _) in zip(GROUPS, expected):
        if mode == "lora":  # LLaMA-Factory's defaults, not vlmtune's seed recipe
            assert (cfg.group(g).rank, cfg.group(g).alpha, cfg.group(g).lora_alpha, cfg.group(g).dropout) == (
                8,
                None,
                16.0,
                0.0,
            ), g
    assert lines[0] == "LLaMA-Factory keys translated:"


@pytest.mark.parametrize("raw, expected", [c[1:] for c in TUNING], ids=[c[0] for c in TUNING])
def test_translate_directly(raw, expected):
    before = yaml.safe_dump(raw)
    native, lines, problems = translate(raw)
    assert problems == []
    assert yaml.safe_dump(raw) == before  # input not modified
    assert set(native) == {"groups"}
    for g, (mode, targets) in zip(GROUPS, expected):
        assert native["groups"][g]["mode"] == mode, g
        if mode == "lora":
            assert native["groups"][g]["targets"] == targets


def test_merger_never_targets_the_patchmerger_container():
    native, lines, _ = translate({"lora_target": "merger"})
    projector = native["groups"]["projector"]
    # LoRA on the projector's linear layers (all-linear inside the group), not a module named "merger".
    assert projector["targets"] == "all-linear"
    assert "merger" not in str(native["groups"]["language_model"])
    assert "lora_target: merger -> groups.projector: lora on all-linear" in lines


@pytest.mark.parametrize(
    "raw, ranked",
    [
        ({"lora_target": "merger,q_proj,v_proj"}, ("projector", "language_model")),
        ({"lora_target": "all", "freeze_vision_tower": False}, ("vision_tower", "projector", "language_model")),
    ],
    ids=["projector+lm", "three-groups"],
)
def test_lora_rank_alpha_dropout_apply_to_every_lora_group(tmp_path, raw, ranked):
    cfg, lines = _load(tmp_path, {**raw, "lora_rank": 4, "lora_alpha": 32, "lora_dropout": 0.1})
    for g in ranked:
        group = cfg.group(g)
        assert (group.mode, group.rank, group.alpha, group.lora_alpha, group.dropout) == ("lora", 4, 32.0, 32.0, 0.1), g
    for key in ("lora_rank", "lora_alpha", "lora_dropout"):
        assert sum(line.startswith(f"{key}: ") for line in lines) == 1, (key, lines)


def test_lora_alpha_defaults_to_twice_the_rank(tmp_path):
    cfg, _ = _load(tmp_path, {"lora_target": "merger,q_proj", "lora_rank": 32})
    for g in ("projector", "language_model"):
        assert cfg.group(g).rank == 32 and cfg.group(g).alpha is None and cfg.group(g).lora_alpha == 64.0


# ---------------------------------------------------------------------------------------------
# Run keys
# ---------------------------------------------------------------------------------------------

RUN_KEYS = [
    # (id, LF key, value, vlmtune path, expected value)
    ("dataset", "dataset", "train.jsonl", "data.train", "train.jsonl"),
    ("dataset-list", "dataset", "a,b", "data.train", ["a", "b"]),
    ("eval_dataset", "eval_dataset", "eval.jsonl", "data.eval", "eval.jsonl"),
    ("dataset_dir", "dataset_dir", "data", "data.dataset_dir", "data"),
    ("output_dir", "output_dir", "saves/run1", "train.output_dir", "saves/run1"),
    ("max_steps", "max_steps", 5, "train.max_steps", 5),
    ("num_train_epochs", "num_train_epochs", 3.0, "train.epochs", 3.0),
    ("per_device_train_batch_size", "per_device_train_batch_size", 2, "train.batch_size", 2),
    ("gradient_accumulation_steps", "gradient_accumulation_steps", 4, "train.grad_accum", 4),
    ("learning_rate", "learning_rate", 1.0e-4, "train.learning_rate", 1.0e-4),
    ("learning_rate-yaml-string", "learning_rate", "1e-4", "train.learning_rate", 1.0e-4),
    ("cutoff_len", "cutoff_len", 2048, "data.max_length", 2048),
    ("image_max_pixels", "image_max_pixels", 262144, "data.image_max_pixels", 262144),
    ("image_min_pixels", "image_min_pixels", 1024, "data.image_min_pixels", 1024),
    ("seed", "seed", 7, "train.seed", 7),
    ("lr_scheduler_type", "lr_scheduler_type", "linear", "train.scheduler", "linear"),
    ("warmup_ratio", "warmup_ratio", 0.1, "train.warmup_ratio", 0.1),
    ("logging_steps", "logging_steps", 3, "train.logging_steps", 3),
    ("save_steps", "save_steps", 50, "train.save_steps", 50),
    ("weight_decay", "weight_decay", 0.01, "train.weight_decay", 0.01),
    ("dataloader_num_workers", "dataloader_num_workers", 2, "data.num_workers", 2),
    ("max_samples", "max_samples", 100, "data.max_samples", 100),
    ("video_maxlen", "video_maxlen", 16, "data.video_max_frames", 16),
    ("video_max_pixels", "video_max_pixels", 16384, "data.video_max_pixels", 16384),
    ("trust_remote_code", "trust_remote_code", True, "model.trust_remote_code", True),
]


def _get(cfg, path: str):
    node = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.parametrize("key, value, path, expected", [c[1:] for c in RUN_KEYS], ids=[c[0] for c in RUN_KEYS])
def test_run_key_lands_on_vlmtune_key(tmp_path, key, value, path, expected):
    cfg, lines = _load(tmp_path, {key: value})
    assert _get(cfg, path) == expected
    assert f"{key}: {value} -> {path}" in lines
    # plain run keys leave the default group recipe alone
    assert cfg.group("projector").mode == "full" and cfg.group("language_model").targets == "attention"


def test_model_name_or_path(tmp_path, model_dir):
    cfg, lines = _load(tmp_path, {"model_name_or_path": str(model_dir)})
    assert cfg.model.path == str(model_dir)
    assert f"model_name_or_path: {model_dir} -> model.path" in lines


def test_a_typical_llama_factory_file(tmp_path, model_dir):
    raw = {
        "model_name_or_path": str(model_dir),
        "image_max_pixels": 262144,
        "image_min_pixels": 1024,
        "trust_remote_code": True,
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": 16,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "lora_target": "merger,q_proj,v_proj",
        "freeze_vision_tower": True,
        "dataset": "mllm_demo,shapes",
        "dataset_dir": "data",
        "template": "qwen2_vl",
        "cutoff_len": 2048,
        "output_dir": "saves/qwen2_vl/lora/sft",
        "logging_steps": 10,
        "save_steps": 500,
        "plot_loss": True,
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 8,
        "learning_rate": 1.0e-4,
        "num_train_epochs": 3.0,
        "max_steps": 20,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.1,
        "bf16": True,
        "seed": 3,
        "report_to": "none",
    }
    cfg, lines = _load(tmp_path, raw)
    d = cfg.model_dump()
    assert d["model"]["path"] == str(model_dir) and d["model"]["trust_remote_code"] is True
    assert d["model"]["dtype"] == ("bfloat16" if torch.cuda.is_available() else "auto")  # bf16 is noted on a CPU
    assert d["data"]["train"] == ["mllm_demo", "shapes"] and d["data"]["dataset_dir"] == "data"
    assert (d["data"]["max_length"], d["data"]["image_max_pixels"], d["data"]["image_min_pixels"]) == (
        2048,
        262144,
        1024,
    )
    t = d["train"]
    assert (
        t["output_dir"],
        t["batch_size"],
        t["grad_accum"],
        t["learning_rate"],
        t["epochs"],
        t["max_steps"],
        t["seed"],
    ) == ("saves/qwen2_vl/lora/sft", 1, 8, 1.0e-4, 3.0, 20, 3)
    assert (t["scheduler"], t["warmup_ratio"], t["logging_steps"], t["save_steps"], t["report_to"]) == (
        "cosine",
        0.1,
        10,
        500,
        [],
    )
    g = d["groups"]
    assert g["vision_tower"]["mode"] == "frozen" and g["lm_head"]["mode"] == "frozen"
    assert {k: g["projector"][k] for k in ("mode", "targets", "rank", "alpha", "dropout")} == {
        "mode": "lora",
        "targets": "all-linear",
        "rank": 16,
        "alpha": 16.0,
        "dropout": 0.05,
    }
    assert {k: g["language_model"][k] for k in ("mode", "targets", "rank", "alpha", "dropout")} == {
        "mode": "lora",
        "targets": ["q_proj", "v_proj"],
        "rank": 16,
        "alpha": 16.0,
        "dropout": 0.05,
    }
    # every translated key is printed
    unmentioned = [k for k in raw if not any(line.startswith(f"{k}: ") for line in lines)]
    assert unmentioned == [], (unmentioned, lines)


NOTED = [
    ("stage-sft", {"stage": "sft"}, "stage"),
    ("finetuning_type-lora", {"finetuning_type": "lora"}, "finetuning_type"),
    ("do_train", {"do_train": True}, "do_train"),
    ("template", {"template": "qwen2_vl"}, "template"),
    ("plot_loss", {"plot_loss": True}, "plot_loss"),
    ("overwrite_output_dir", {"overwrite_output_dir": True}, "overwrite_output_dir"),
    ("bf16", {"bf16": True}, "bf16"),
    ("fp16", {"fp16": True}, "fp16"),
    ("report_to-none", {"report_to": "none"}, "report_to"),
    ("report_to-tensorboard", {"report_to": "tensorboard"}, "report_to"),
    ("freeze_vision_tower", {"freeze_vision_tower": True}, "freeze_vision_tower"),
]


@pytest.mark.parametrize("raw, key", [c[1:] for c in NOTED], ids=[c[0] for c in NOTED])
def test_every_accepted_llama_factory_key_is_echoed(tmp_path, raw, key):
    _, lines = _load(tmp_path, raw)
    assert any(line.startswith(f"{key}: ") for line in lines), lines


@pytest.mark.parametrize(
    "raw, path, expected",
    [
        # mixed precision on a machine without a GPU is noted and ignored: float32 (model.dtype auto)
        ({"bf16": True}, "model.dtype", "bfloat16" if torch.cuda.is_available() else "auto"),
        ({"fp16": True}, "model.dtype", "float16" if torch.cuda.is_available() else "auto"),
        ({"report_to": "tensorboard"}, "train.report_to", ["tensorboard"]),
        ({"report_to": "none"}, "train.report_to", []),
    ],
    ids=["bf16", "fp16", "tensorboard", "none"],
)
def test_noted_keys_values(tmp_path, raw, path, expected):
    cfg, _ = _load(tmp_path, raw)
    assert _get(cfg, path) == expected


def test_native_keys_win_over_translated_ones(tmp_path):
    cfg, _ = _load(
        tmp_path,
        {"max_steps": 5, "train": {"max_steps": 9}, "lora_target": "merger", "groups": {"projector": {"rank": 2}}},
    )
    assert cfg.train.max_steps == 9
    assert cfg.group("projector").mode == "lora" and cfg.group("projector").rank == 2


def test_no_flat_keys_no_translation():
    raw = {"train": {"max_steps": 3}, "groups": {"projector": {"mode": "full"}}}
    assert translate(raw) == (raw, [], [])


def test_overrides_are_translated_too(tmp_path):
    cfg, lines = _load(tmp_path, {"lora_target": "merger"}, ["cutoff_len=64"])
    assert cfg.data.max_length == 64
    assert "cutoff_len: 64 -> data.max_length" in lines


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

ERRORS = [
    (
        "additional-and-lora-same-group",
        {"lora_target": "merger", "additional_target": "merger"},
        "'additional_target: merger' trains projector fully but lora_target already puts LoRA on it; choose one",
    ),
    (
        "additional-unknown",
        {"lora_target": "q_proj", "additional_target": "embed_tokens"},
        "'additional_target: embed_tokens' does not name a component group",
    ),
    ("stage-rm", {"stage": "rm"}, "'stage: rm' is not supported; vlmtune trains stage: sft, dpo, kto"),
    ("stage-ppo", {"stage": "ppo"}, "and grpo (train.method: grpo, rewards in train.grpo.rewards) in place of ppo"),
    ("stage-pt", {"stage": "pt"}, "it has no pre-training (pt) or reward-model (rm) stage"),
    ("pref_loss-kto_pair", {"pref_loss": "kto_pair"}, "'pref_loss: kto_pair' is not supported; for KTO use stage: kto"),
    (
        "pref_loss-bco",
        {"pref_loss": "bco"},
        "'pref_loss: bco' is not supported; valid: sigmoid, hinge, ipo, orpo, simpo",
    ),
    (
        "finetuning-freeze",
        {"finetuning_type": "freeze"},
        "'finetuning_type: freeze' is not supported; use lora or full",
    ),
    ("report_to-wandb", {"report_to": "wandb"}, "'report_to: wandb' is not supported; use tensorboard or none"),
    (
        "names-without-group",
        {"lora_target": "merger,q_proj", "freeze_language_model": True},
        "lora_target names q_proj but freeze_language_model: true leaves no group for them",
    ),
    ("lora_rnk", {"lora_rnk": 8}, "unknown key 'lora_rnk' (did you mean 'lora_rank'?)"),
    ("cutof_len", {"cutof_len": 8}, "unknown key 'cutof_len' (did you mean 'cutoff_len'?)"),
]


@pytest.mark.parametrize("raw, fragment", [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_llama_factory_errors(tmp_path, raw, fragment):
    problems = _problems(tmp_path, raw)
    assert len(problems) == 1, problems
    assert fragment in problems[0]


def test_translation_and_schema_problems_reported_together(tmp_path):
    problems = _problems(tmp_path, {"stage": "rm", "lora_rnk": 8, "train": {"max_stepz": 3}})
    assert len(problems) == 3, problems
    assert problems[0].startswith("'stage: rm' is not supported")
    assert any("unknown key 'lora_rnk' (did you mean 'lora_rank'?)" in p for p in problems)
    assert any("unknown key 'train.max_stepz' (did you mean 'max_steps'?)" in p for p in problems)


def test_llama_factory_keys_are_all_known_to_the_translator():
    # every key listed as accepted is handled somewhere (rename, tuning or noted)
    from vlmtune.config.llamafactory import METHOD_KEYS, NOTED_KEYS, RENAMES, TUNING_KEYS
    from vlmtune.config.llamafactory_weights import WEIGHT_KEYS

    assert LLAMA_FACTORY_KEYS == set(RENAMES) | TUNING_KEYS | METHOD_KEYS | NOTED_KEYS | WEIGHT_KEYS
    groups = [set(RENAMES), TUNING_KEYS, METHOD_KEYS, NOTED_KEYS, WEIGHT_KEYS]
    assert all(not (a & b) for i, a in enumerate(groups) for b in groups[i + 1 :])


@pytest.mark.parametrize(
    "key, hint",
    [
        ("max_sample", "max_samples"),
        ("cutoff_length", "cutoff_len"),
        ("video_max_pixel", "video_max_pixels"),
        ("audio_max_pixels", None),  # not image_max_pixels: another medium, another meaning
        ("save_model_only", "save_only_model"),  # the same words; never save_steps
        ("eval_samples", None),  # not max_samples
    ],
)
def test_did_you_mean_only_for_a_close_spelling(tmp_path, key, hint):
    path = tmp_path / "c.yaml"
    path.write_text(f"{key}: 1\nlora_target: merger\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, echo=lambda *_: None)
    text = str(info.value)
    assert f"unknown key '{key}'" in text
    if hint is None:
        assert "did you mean" not in text, text
    else:
        assert f"(did you mean '{hint}'?)" in text, text


def test_streaming_reads_lazily(tmp_path):
    cfg, lines = _load(tmp_path, {"streaming": True})
    assert cfg.data.load == "lazy"
    assert "streaming: True -> data.load=lazy (JSONL read by a byte-offset index)" in lines


# ---------------------------------------------------------------------------------------------
# Preference methods: stage, pref_* and kto_* keys
# ---------------------------------------------------------------------------------------------

# (id, LLaMA-Factory keys, expected {vlmtune key: value})
METHOD_KEYS_CASES = [
    ("stage-sft", {"stage": "sft"}, {"train.method": "sft"}),
    ("stage-dpo", {"stage": "dpo"}, {"train.method": "dpo", "train.dpo.loss": "sigmoid"}),
    ("stage-kto", {"stage": "kto"}, {"train.method": "kto"}),
    ("pref_beta", {"stage": "dpo", "pref_beta": 0.25}, {"train.dpo.beta": 0.25, "train.kto.beta": 0.25}),
    ("pref_beta-kto", {"stage": "kto", "pref_beta": 0.3}, {"train.method": "kto", "train.kto.beta": 0.3}),
    ("pref_loss-ipo", {"stage": "dpo", "pref_loss": "ipo"}, {"train.dpo.loss": "ipo"}),
    ("pref_loss-hinge", {"pref_loss": "hinge"}, {"train.dpo.loss": "hinge"}),
    ("pref_loss-orpo", {"stage": "dpo", "pref_loss": "orpo"}, {"train.dpo.loss": "orpo"}),
    (
        "pref_loss-simpo",
        {"stage": "dpo", "pref_loss": "simpo", "simpo_gamma": 1.5},
        {"train.dpo.loss": "simpo", "train.dpo.simpo_gamma": 1.5},
    ),
    ("pref_ftx", {"stage": "dpo", "pref_ftx": 0.5}, {"train.dpo.sft_weight": 0.5}),
    ("dpo_label_smoothing", {"dpo_label_smoothing": 0.1}, {"train.dpo.label_smoothing": 0.1}),
    (
        "kto-weights",
        {"stage": "kto", "kto_chosen_weight": 1.0, "kto_rejected_weight": 1.33},
        {"train.kto.desirable_weight": 1.0, "train.kto.undesirable_weight": 1.33},
    ),
]


@pytest.mark.parametrize("raw, expected", [c[1:] for c in METHOD_KEYS_CASES], ids=[c[0] for c in METHOD_KEYS_CASES])
def test_method_keys_are_translated_and_echoed(tmp_path, raw, expected):
    cfg, lines = _load(tmp_path, raw)
    assert {path: _get(cfg, path) for path in expected} == expected
    for key in raw:
        assert any(line.startswith(f"{key}: ") for line in lines), (key, lines)


def test_a_llama_factory_dpo_file(tmp_path, model_dir):
    raw = {
        "model_name_or_path": str(model_dir),
        "stage": "dpo",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_target": "all",
        "pref_beta": 0.1,
        "pref_loss": "sigmoid",
        "pref_ftx": 0.2,
        "dataset": "rlhf_v",
        "cutoff_len": 2048,
        "output_dir": "saves/dpo",
    }
    cfg, lines = _load(tmp_path, raw)
    assert cfg.train.method == "dpo"
    assert (cfg.train.dpo.beta, cfg.train.dpo.loss, cfg.train.dpo.sft_weight) == (0.1, "sigmoid", 0.2)
    assert "stage: dpo -> train.method=dpo" in lines
    assert "pref_ftx: 0.2 -> train.dpo.sft_weight" in lines


def test_native_method_keys_win_over_translated_ones(tmp_path):
    cfg, _ = _load(tmp_path, {"stage": "dpo", "pref_beta": 0.3, "train": {"method": "kto", "kto": {"beta": 0.5}}})
    assert cfg.train.method == "kto" and cfg.train.kto.beta == 0.5 and cfg.train.dpo.beta == 0.3


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"pref_beta": 0}, "'train.dpo.beta': Input should be greater than 0"),
        ({"dpo_label_smoothing": 0.5}, "'train.dpo.label_smoothing': Input should be less than 0.5"),
        ({"kto_rejected_weight": -1}, "'train.kto.undesirable_weight': Input should be greater than 0"),
    ],
    ids=["pref_beta-zero", "label_smoothing-half", "kto-negative-weight"],
)
def test_translated_method_values_are_checked_by_the_schema(tmp_path, raw, fragment):
    problems = _problems(tmp_path, raw)
    assert any(fragment in p for p in problems), problems


def test_packing_with_a_preference_stage_is_refused_naming_the_key(tmp_path):
    problems = _problems(tmp_path, {"stage": "dpo", "train": {"packing": True}})
    assert problems == [
        "'train.packing' is true but train.method is dpo: packing lays samples end to end in shared rows; "
        "preference pairs and labelled answers are not packed (each answer is scored on its own); set "
        "train.packing: false"
    ]


# ---------------------------------------------------------------------------------------------
# LoRA variants and quantization
# ---------------------------------------------------------------------------------------------

LORA_GROUPS = ("projector", "language_model")  # lora_target: merger,q_proj,v_proj
# (id, LLaMA-Factory keys, expected settings of every LoRA group, the printed line)
VARIANTS = [
    ("use_dora", {"use_dora": True}, {"dora": True}, "use_dora: True -> groups.<projector|language_model>.dora=true"),
    (
        "use_rslora",
        {"use_rslora": True},
        {"rslora": True},
        "use_rslora: True -> groups.<projector|language_model>.rslora",
    ),
    (
        "pissa_init",
        {"pissa_init": True},
        {"init": "pissa_niter_16"},
        "pissa_init: true (pissa_iter 16, the default) -> groups.<projector|language_model>.init=pissa_niter_16",
    ),
    (
        "pissa_iter",
        {"pissa_init": True, "pissa_iter": 4},
        {"init": "pissa_niter_4"},
        "pissa_init: true, pissa_iter: 4 -> groups.<projector|language_model>.init=pissa_niter_4",
    ),
    ("pissa_iter -1", {"pissa_init": True, "pissa_iter": -1}, {"init": "pissa"}, "init=pissa"),
    ("pissa_iter alone", {"pissa_iter": 4}, {"init": "default"}, "pissa_iter: 4 -> no effect (pissa_init is not true)"),
    (
        "loraplus_lr_ratio",
        {"loraplus_lr_ratio": 16.0},
        {"lr_ratio_b": 16.0},
        "loraplus_lr_ratio: 16.0 -> groups.<projector|language_model>.lr_ratio_b",
    ),
]


@pytest.mark.parametrize("raw, expected, line", [c[1:] for c in VARIANTS], ids=[c[0] for c in VARIANTS])
def test_lora_variant_keys_apply_to_every_lora_group(tmp_path, raw, expected, line):
    cfg, lines = _load(tmp_path, {"lora_target": "merger,q_proj,v_proj", **raw})
    for g in GROUPS:
        settings = cfg.group(g)
        got = {k: getattr(settings, k) for k in expected}
        assert got == (expected if g in LORA_GROUPS else {k: getattr(type(settings)(), k) for k in expected}), g
    assert any(line in printed for printed in lines), lines


def test_lora_variant_keys_alone_mean_lora_on_every_linear_layer(tmp_path):
    # LLaMA-Factory's default lora_target is all: the language model and the projector
    cfg, _ = _load(tmp_path, {"use_dora": True})
    assert [g for g in GROUPS if cfg.group(g).dora] == ["projector", "language_model"]


# (id, LLaMA-Factory keys, model.quantize, model.double_quant)
QUANTIZATION = [
    ("4-bit", {"quantization_bit": 4}, "nf4", True),
    ("4-bit fp4", {"quantization_bit": 4, "quantization_type": "fp4"}, "fp4", True),
    ("4-bit single quant", {"quantization_bit": 4, "double_quantization": False}, "nf4", False),
    ("8-bit", {"quantization_bit": 8, "quantization_method": "bnb"}, "int8", True),
    ("type alone", {"quantization_type": "fp4"}, "none", True),
]


@pytest.mark.parametrize("raw, quantize, double", [c[1:] for c in QUANTIZATION], ids=[c[0] for c in QUANTIZATION])
def test_quantization_keys(tmp_path, raw, quantize, double):
    cfg, lines = _load(tmp_path, {"lora_target": "q_proj", **raw})
    assert (cfg.model.quantize, cfg.model.double_quant) == (quantize, double)
    assert all(any(f"{k}: " in line for line in lines) for k in raw), lines  # every key printed


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (
            {"quantization_bit": 4, "quantization_method": "gptq"},
            "'quantization_method: gptq' is not supported; vlmtune",
        ),
        ({"quantization_bit": 2}, "'quantization_bit: 2' is not supported; bitsandbytes quantizes to 4 or 8 bits"),
        ({"quantization_bit": 4, "quantization_type": "int4"}, "'quantization_type: int4' is not one of nf4, fp4"),
        ({"pissa_init": True, "pissa_iter": 0}, "'pissa_iter: 0' must be a positive number of SVD iterations, or -1"),
        ({"pissa_init": True, "use_dora": True}, "'groups.projector.dora' is true with groups.projector.init pissa"),
    ],
    ids=["gptq", "2-bit", "int4", "pissa_iter-0", "pissa-with-dora"],
)
def test_weight_key_errors_name_the_key(tmp_path, raw, fragment):
    problems = _problems(tmp_path, {"lora_target": "merger", **raw})
    assert any(fragment in p for p in problems), problems
    if "quantization_method" in raw:
        assert "(quantization_method: bnb)" in problems[0]
