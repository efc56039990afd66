"""Typed run configuration (vlmtune.config.schema): YAML + dotted overrides, every problem reported at once."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from vlmtune.config.data import AugmentConfig, DataConfig, DataSource
from vlmtune.config.errors import ConfigError
from vlmtune.config.load import config_to_yaml, load_config, reference
from vlmtune.config.methods import DPOConfig, GRPOConfig, KTOConfig, RewardSpec
from vlmtune.config.schema import (
    BUILTIN_MODEL,
    DEFAULT_GROUPS,
    GROUPS,
    ArchEntry,
    Config,
    EvalConfig,
    GroupConfig,
    Groups,
    ModelConfig,
    StageConfig,
    TrainConfig,
)
from vlmtune.config.stages import resolve_stages


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _problems(path, overrides=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides or [])
    return info.value.problems


def _models(root: type[BaseModel] = Config) -> list[type[BaseModel]]:
    """Every pydantic model reachable from ``root`` through field annotations (dict values, unions ...)."""
    found: list[type[BaseModel]] = []

    def visit(ann) -> None:
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if ann not in found:
                found.append(ann)
                for f in ann.model_fields.values():
                    visit(f.annotation)
            return
        for arg in typing.get_args(ann):
            visit(arg)

    visit(root)
    return found


# ---------------------------------------------------------------------------------------------
# Defaults, files, overrides
# ---------------------------------------------------------------------------------------------


def test_defaults_validate_to_the_default_recipe():
    cfg = load_config(None, echo=lambda line: pytest.fail(f"no translation expected, got {line!r}"))
    assert cfg.model.path == BUILTIN_MODEL
    assert cfg.data.train == "builtin:shapes:position"
    assert cfg.data.max_length == 1024 and cfg.data.too_long == "drop"
    assert cfg.train.learning_rate == 2e-4 and cfg.train.max_steps is None
    assert {g: cfg.group(g).mode for g in GROUPS} == {
        "vision_tower": "frozen",
        "projector": "full",  # the recipe study's winner (bench/RECIPES.md)
        "language_model": "lora",
        "lm_head": "frozen",
    }
    assert cfg.group("language_model").rank == 16 and cfg.group("language_model").targets == "attention"
    assert cfg.group("language_model").lora_alpha == 32.0  # empty alpha means 2 x rank
    assert cfg.group_lr("projector") == 2e-4
    # Validation of the defaults themselves (no DEFAULT_GROUPS merge) also passes: every group typed, all frozen.
    assert {g: s["mode"] for g, s in Config().model_dump()["groups"].items()} == dict.fromkeys(GROUPS, "frozen")
    assert set(DEFAULT_GROUPS) == set(GROUPS)


def test_yaml_file_then_dotted_overrides(tmp_path):
    path = _write(
        tmp_path / "run.yaml",
        """
train:
  max_steps: 100
  learning_rate: 1.0e-4
groups:
  projector:
    mode: lora
    rank: 4
data:
  max_length: 256
""",
    )
    cfg = load_config(
        path,
        [
            "train.max_steps=5",
            "groups.projector.lr=1e-3",
            "groups.language_model.targets=[q_proj,v_proj]",
            "data.train=[a.jsonl, b.jsonl]",
            "train.save_steps=",
        ],
    )
    assert cfg.train.max_steps == 5  # the override wins over the file
    assert cfg.train.learning_rate == 1e-4  # the file's value, kept
    assert cfg.data.max_length == 256
    assert cfg.group("projector").lr == 1e-3
    assert cfg.group("projector").rank == 4  # file value merged into the default projector group
    assert cfg.group("projector").mode == "lora" and cfg.group("projector").targets == "all-linear"
    assert cfg.group("language_model").targets == ["q_proj", "v_proj"]
    assert cfg.group("language_model").rank == 16
    assert cfg.data.train == ["a.jsonl", "b.jsonl"]
    assert cfg.train.save_steps is None
    assert cfg.group_lr("projector") == 1e-3 and cfg.group_lr("language_model") == 1e-4


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.max_steps", "override 'train.max_steps' is not of the form key.path=value"),
        ("=5", "override '=5' has an empty key"),
    ],
    ids=["no-equals", "empty-key"],
)
def test_malformed_override(override, expected):
    problems = _problems(None, [override])
    assert problems == [expected]


def test_empty_yaml_file_means_defaults(tmp_path):
    path = _write(tmp_path / "empty.yaml", "# nothing\n")
    assert load_config(path).model_dump() == load_config(None).model_dump()


# ---------------------------------------------------------------------------------------------
# Unknown keys, with "did you mean"
# ---------------------------------------------------------------------------------------------

UNKNOWN_KEYS = [
    # (id, override, key named in the message, suggested name or None)
    ("top-level", "modle.path=x", "modle", "model"),
    ("top-level-lf-key", "lora_rnk=4", "lora_rnk", "lora_rank"),
    ("nested-train", "train.lerning_rate=0.1", "train.lerning_rate", "learning_rate"),
    ("nested-data", "data.max_lenght=12", "data.max_lenght", "max_length"),
    ("nested-model", "model.dtyp=float32", "model.dtyp", "dtype"),
    ("in-group", "groups.projector.rnk=4", "groups.projector.rnk", "rank"),
    ("in-group-alpha", "groups.language_model.alhpa=4", "groups.language_model.alhpa", "alpha"),
    ("nothing-close", "train.zzzzzz=1", "train.zzzzzz", None),
]


@pytest.mark.parametrize("override, key, suggestion", [c[1:] for c in UNKNOWN_KEYS], ids=[c[0] for c in UNKNOWN_KEYS])
def test_unknown_key_is_named_with_nearest_valid_key(override, key, suggestion):
    problems = _problems(None, [override])
    assert len(problems) == 1
    assert problems[0].startswith(f"unknown key '{key}'")
    if suggestion:
        assert f"(did you mean '{suggestion}'?)" in problems[0]
    else:
        assert "did you mean" not in problems[0]


def test_unknown_nested_key_lists_the_valid_keys_of_its_level():
    problems = _problems(None, ["groups.projector.rnk=4"])
    assert problems[0].endswith("valid here: " + ", ".join(GroupConfig.model_fields))
    problems = _problems(None, ["train.lerning_rate=1"])
    assert problems[0].endswith("valid here: " + ", ".join(TrainConfig.model_fields))


def test_nested_suggestion_is_never_a_top_level_llama_factory_key():
    # 'lora_rank' is valid only at the top level (a LLaMA-Factory key), never under train.
    problems = _problems(None, ["train.lora_rnk=4"])
    assert problems[0].startswith("unknown key 'train.lora_rnk'")
    assert "lora_rank" not in problems[0]


def test_unknown_group_name_suggests_projector():
    problems = _problems(None, ["groups.projecter.mode=lora"])
    assert problems == [
        "'groups.projecter' is not a component group (did you mean 'projector'?); "
        "groups are vision_tower, projector, language_model, lm_head"
    ]


def test_every_problem_of_one_file_is_reported_together(tmp_path):
    path = _write(
        tmp_path / "bad.yaml",
        """
foo: 1
train:
  lerning_rate: 0.1
  max_steps: 0
  batch_size: two
groups:
  projector:
    rnk: 4
    mode: sometimes
data:
  too_long: cut
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert len(problems) == 7, problems
    text = str(info.value)
    assert text.startswith(f"7 problem(s) in {path}:")
    for fragment in (
        "unknown key 'foo'",
        "unknown key 'train.lerning_rate' (did you mean 'learning_rate'?)",
        "'train.max_steps': Input should be greater than 0 (got 0)",
        "'train.batch_size'",
        "unknown key 'groups.projector.rnk' (did you mean 'rank'?)",
        "'groups.projector.mode'",
        "'data.too_long'",
    ):
        assert sum(fragment in p for p in problems) == 1, (fragment, problems)
    # every problem is one line of the message
    assert all(f"  - {p}" in text for p in problems)


def test_schema_and_cross_field_problems_are_reported_together(tmp_path):
    # One file with a misspelt key AND a misspelt group name: the user should see both at once,
    # not fix one and then meet the other.
    path = _write(
        tmp_path / "bad.yaml",
        """
train:
  lerning_rate: 0.1
groups:
  projecter:
    mode: lora
""",
    )
    problems = _problems(path)
    assert len(problems) == 2, problems
    assert any("unknown key 'train.lerning_rate' (did you mean 'learning_rate'?)" in p for p in problems)
    assert any("'groups.projecter' is not a component group (did you mean 'projector'?)" in p for p in problems)


@pytest.mark.parametrize(
    "override, key, fragment",
    [
        ("train.max_steps=0", "train.max_steps", "Input should be greater than 0 (got 0)"),
        ("train.scheduler=cosine_with_restarts", "train.scheduler", "'cosine', 'linear' or 'constant'"),
        ("data.too_long=cut", "data.too_long", "'drop', 'downscale' or 'truncate'"),
        ("groups.projector.mode=partial", "groups.projector.mode", "'frozen', 'lora' or 'full'"),
        ("groups.language_model.dropout=1.0", "groups.language_model.dropout", "less than 1"),
        ("groups.projector=lora", "groups.projector", "valid dictionary"),
        ("train.report_to=[wandb]", "train.report_to.0", "'tensorboard'"),
    ],
    ids=["gt0", "scheduler", "too_long", "mode", "dropout", "group-not-mapping", "report_to"],
)
def test_bad_value_names_its_key(override, key, fragment):
    problems = _problems(None, [override])
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"'{key}': ")
    assert fragment in problems[0]


@pytest.mark.parametrize(
    "override, key",
    [("groups.language_model.targets=5", "groups.language_model.targets"), ("data.train=[1, 2]", "data.train")],
    ids=["targets-number", "train-list-of-numbers"],
)
def test_bad_union_value_names_the_config_key(override, key):
    # 'targets' is "a name or a list of names": the problem must name the config key the user wrote,
    # not pydantic's union members ('groups.projector.targets.list[str]' is no config key).
    problems = _problems(None, [override])
    named = [p.split("'")[1] for p in problems]
    assert named and all(n == key or n.startswith(key + ".") and n[len(key) + 1 :].isdigit() for n in named), problems


# ---------------------------------------------------------------------------------------------
# Cross-field checks, files
# ---------------------------------------------------------------------------------------------

SEMANTIC = [
    (
        "targets-string",
        ["groups.language_model.targets=q_proj"],
        "'groups.language_model.targets': 'q_proj' is not all-linear, attention or mlp; give a list for module names, e.g. [q_proj]",
    ),
    ("targets-empty-list", ["groups.language_model.targets=[]"], "'groups.language_model.targets' is an empty list"),
    (
        "all-frozen",
        ["groups.projector.mode=frozen", "groups.language_model.mode=frozen"],
        "every group is frozen: set at least one of groups.<group>.mode to lora or full",
    ),
    (
        "packing-length-without-packing",
        ["train.packing_length=2048"],
        "'train.packing_length' is set but train.packing is false: set train.packing: true or drop packing_length",
    ),
]


@pytest.mark.parametrize("overrides, expected", [c[1:] for c in SEMANTIC], ids=[c[0] for c in SEMANTIC])
def test_cross_field_problems(overrides, expected):
    assert _problems(None, overrides) == [expected]


@pytest.mark.parametrize("targets", ["all-linear", "attention", "mlp", "[q_proj]", "[mlp.0, mlp.2]"])
def test_valid_targets(targets):
    cfg = load_config(None, [f"groups.language_model.targets={targets}"])
    assert cfg.group("language_model").targets == yaml.safe_load(targets)


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert _problems(path) == [f"config file '{path}' does not exist"]


@pytest.mark.parametrize(
    "text, found",
    [("- a\n- b\n", "list"), ("just a string\n", "str"), ("42\n", "int")],
    ids=["list", "string", "number"],
)
def test_yaml_that_is_not_a_mapping(tmp_path, text, found):
    path = _write(tmp_path / "c.yaml", text)
    assert _problems(path) == [f"{path}: the top level must be a mapping of keys, found {found}"]


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = _write(tmp_path / "c.yaml", "train:\n  max_steps: [1, 2\nmodel: {}\n")
    problems = _problems(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: not valid YAML:")
    assert "line 2, column 14" in problems[0]  # where the unclosed list starts


def test_model_path_that_is_not_a_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    file = _write(tmp_path / "model.safetensors", "x")
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    assert _problems(None, [f"model.path={missing}"]) == [
        f"'model.path': '{missing}' is not a local folder (vlmtune loads local model folders only; "
        f"download it first, or use {BUILTIN_MODEL})"
    ]
    assert _problems(None, [f"model.path={file}"])[0].startswith(f"'model.path': '{file}' is not a local folder")
    assert _problems(None, [f"model.path={empty}"]) == [f"'model.path': '{empty}' has no config.json"]
    _write(empty / "config.json", "{}")
    assert load_config(None, [f"model.path={empty}"]).model.path == str(empty)


def test_hub_id_is_not_accepted_as_model_path():
    problems = _problems(None, ["model.path=Qwen/Qwen2-VL-2B-Instruct"])
    assert len(problems) == 1 and "'model.path': 'Qwen/Qwen2-VL-2B-Instruct' is not a local folder" in problems[0]


# ---------------------------------------------------------------------------------------------
# Reference and YAML round trip
# ---------------------------------------------------------------------------------------------


NAMED_MODELS = (
    Config,
    ModelConfig,
    ArchEntry,
    DataConfig,
    DataSource,
    AugmentConfig,
    TrainConfig,
    EvalConfig,
    Groups,
    GroupConfig,
    DPOConfig,
    KTOConfig,
    GRPOConfig,
    RewardSpec,
)


def test_every_field_of_every_model_has_a_description():
    models = _models()
    assert set(models) >= {*NAMED_MODELS, StageConfig}
    # the rest are the typed overrides of a stage: partial copies of Groups, GroupConfig, DataConfig, AugmentConfig
    assert {m.__name__ for m in models} - {m.__name__ for m in (*NAMED_MODELS, StageConfig)} == {
        "GroupsOverrides",
        "GroupConfigOverrides",
        "DataOverrides",
        "AugmentConfigOverrides",
        "DPOOverrides",
        "KTOOverrides",
        "GRPOOverrides",
    }
    missing = [
        f"{m.__name__}.{name}"
        for m in models
        for name, f in m.model_fields.items()
        if not (f.description and f.description.strip())
    ]
    assert missing == []
    for m in models:
        assert m.__doc__ and m.__doc__.strip(), m.__name__


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for name, field in model.model_fields.items():
        key = prefix + name
        if name == "groups" and model is Config:
            out += _leaf_keys(GroupConfig, "groups.<group>.")
        elif name == "stages" and model is Config:
            out += _leaf_keys(StageConfig, "stages[].")
        elif model is StageConfig and name in ("groups", "data"):
            out.append((key, field))  # typed overrides of the top-level sections, shown as one key
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += _leaf_keys(field.annotation, key + ".")
        else:
            out.append((key, field))
    return out


def test_reference_lists_every_field_with_its_description_and_default():
    lines = reference()
    text = "\n".join(lines)
    leaves = _leaf_keys(Config)
    # sections of their own: DataConfig.augment, and the methods' settings (at the top level and in a stage)
    nested = {"augment", "dpo", "kto", "grpo"}
    methods = (DPOConfig, KTOConfig, GRPOConfig)
    assert len(leaves) == sum(
        len(set(m.model_fields) - nested)
        for m in (ModelConfig, DataConfig, AugmentConfig, TrainConfig, EvalConfig, GroupConfig, StageConfig)
        + methods
        + methods
    )
    for key, field in leaves:
        entry = [line for line in lines if line.startswith(f"  {key} = ")]
        assert len(entry) == 1, key
        head, _, desc = entry[0].partition("\n")
        default = field.get_default(call_default_factory=True)
        default = default.model_dump(exclude_none=True) if isinstance(default, BaseModel) else default
        assert head == f"  {key} = {default!r}"
        assert desc.strip() == field.description
    # the sections and the groups line
    for name in ("model", "data", "train"):
        assert f"{name}:  {Config.model_fields[name].description}" in lines
    assert f"groups.<{'|'.join(GROUPS)}>:  {Config.model_fields['groups'].description}" in lines
    assert "learning rate of every group that does not set its own lr" in text


def test_config_to_yaml_round_trip(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    _write(model_dir / "config.json", "{}")
    cfg = load_config(
        None,
        [
            f"model.path={model_dir}",
            "model.dtype=bfloat16",
            "groups.vision_tower.mode=full",
            "groups.vision_tower.lr=1e-5",
            "groups.language_model.targets=[q_proj, v_proj]",
            "groups.projector.mode=lora",
            "groups.projector.alpha=8",
            "groups.projector.dropout=0.05",
            "data.train=[a.jsonl, b.jsonl]",
            "data.too_long=downscale",
            "data.image_max_pixels=50176",
            "train.max_steps=7",
            "train.adam_betas=[0.8, 0.95]",
            "train.report_to=[tensorboard]",
            "train.scheduler=linear",
        ],
    )
    text = config_to_yaml(cfg)
    raw = yaml.safe_load(text)
    assert list(raw) == list(Config.model_fields)
    assert raw["train"]["adam_betas"] == [0.8, 0.95]
    path = _write(tmp_path / "config.yaml", text)
    again = load_config(path, echo=lambda line: pytest.fail(f"no translation expected, got {line!r}"))
    assert again.model_dump() == cfg.model_dump()
    assert again == cfg
    assert config_to_yaml(again) == text


def test_defaults_round_trip(tmp_path):
    cfg = load_config(None)
    path = _write(tmp_path / "config.yaml", config_to_yaml(cfg))
    assert load_config(path).model_dump() == cfg.model_dump()


def test_group_helpers():
    cfg = load_config(
        None,
        [
            "train.weight_decay=0.1",
            "groups.projector.weight_decay=0",
            "groups.projector.mode=lora",
            "groups.projector.rank=4",
            "groups.language_model.alpha=3",
        ],
    )
    assert cfg.group_weight_decay("projector") == 0.0  # 0 is a value, not "empty"
    assert cfg.group_weight_decay("language_model") == 0.1
    assert cfg.group("projector").lora_alpha == 8.0
    assert cfg.group("language_model").lora_alpha == 3.0
    with pytest.raises(ValueError, match="'nonexistent' is not a component group; groups are vision_tower"):
        cfg.group("nonexistent")


# ---------------------------------------------------------------------------------------------
# Typed groups, stage overrides and registry entries: checked with the rest of the config
# ---------------------------------------------------------------------------------------------

TYPED_CASES = [
    # name, override, expected problem (exact)
    (
        "stage group name",
        "stages=[{name: a, groups: {projecter: {mode: lora}}}]",
        "stages[0] (a): 'stages.0.groups.projecter' is not a component group (did you mean 'projector'?); "
        "stages.0.groups are vision_tower, projector, language_model, lm_head",
    ),
    (
        "stage data key",
        "stages=[{name: a, data: {max_lenght: 64}}]",
        "stages[0] (a): unknown key 'stages.0.data.max_lenght' (did you mean 'max_length'?); valid here: "
        + ", ".join(DataConfig.model_fields),
    ),
    (
        "stage data value",
        "stages=[{name: a}, {name: b, data: {too_long: cut}}]",
        "stages[1] (b): 'stages.1.data.too_long': Input should be 'drop', 'downscale' or 'truncate' (got 'cut')",
    ),
    (
        "arch_entry group",
        "model.arch_entry={patterns: {projecter: [mlp]}}",
        "'model.arch_entry.patterns.projecter': Input should be 'vision_tower', 'projector', 'language_model' or "
        "'lm_head' (got 'projecter')",
    ),
    (
        "arch_entry key",
        "model.arch_entry={model_type: [x]}",
        "unknown key 'model.arch_entry.model_type' (did you mean 'model_types'?); valid here: model_types, patterns, "
        "layouts, description",
    ),
]


@pytest.mark.parametrize("name,override,expected", TYPED_CASES, ids=[c[0] for c in TYPED_CASES])
def test_typed_sections_are_validated_with_the_config(name, override, expected):
    assert _problems(None, [override]) == [expected]


def test_lora_settings_without_a_mode_make_the_group_lora_and_say_so():
    lines = []
    cfg = load_config(None, ["groups.projector.rank=4", "groups.projector.alpha=8"], echo=lines.append)
    assert cfg.group("projector").mode == "lora" and cfg.group("projector").rank == 4
    assert cfg.group("projector").targets == "all-linear"  # the default recipe's, for when it is LoRA
    assert lines == ["groups.projector: rank, alpha given without a mode -> mode lora (default: full)"]
    # a mode given wins; settings that are not LoRA's leave the default mode; the language model is LoRA anyway
    cfg = load_config(
        None,
        [
            "groups.projector.mode=full",
            "groups.projector.rank=4",
            "groups.vision_tower.lr=1e-5",
            "groups.language_model.rank=8",
        ],
        echo=lambda line: pytest.fail(line),
    )
    assert cfg.group("projector").mode == "full" and cfg.group("vision_tower").mode == "frozen"
    assert cfg.group("language_model").rank == 8


def test_stage_overrides_merge_only_what_they_set():
    cfg = load_config(None, ["stages=[{name: a, groups: {projector: {lr: 1.0e-3}}, data: {max_length: 64}}]"])
    (stage,) = cfg.stages
    assert stage.groups.projector.lr == 1e-3 and stage.groups.projector.rank is None
    (resolved,) = resolve_stages(cfg)
    projector = resolved.cfg.group("projector")
    assert projector.lr == 1e-3 and projector.mode == "full"  # the rest from the top-level (default) group
    assert resolved.cfg.data.max_length == 64 and resolved.cfg.data.train == cfg.data.train


COERCION_CASES = [
    # override, refused (True) or accepted as the user meant (False)
    ("train.batch_size=true", "'train.batch_size': a number is expected here, not true (got True)"),
    ("train.epochs=false", "'train.epochs': a number is expected here, not false (got False)"),
    ("data.num_workers=true", "'data.num_workers': a number is expected here, not true (got True)"),
    ("train.packing=1", "'train.packing': true or false is expected here (got 1)"),
    ("model.trust_remote_code=1", "'model.trust_remote_code': true or false is expected here (got 1)"),
    ("train.progress_bar='no'", "'train.progress_bar': true or false is expected here (got 'no')"),
    (
        "stages=[{name: a, groups: {projector: {rank: true}}}]",
        "stages[0] (a): 'stages.0.groups.projector.rank': a number is expected here, not true (got True)",
    ),
    ("train.learning_rate='1e-3'", None),  # YAML reads 1e-3 without a dot as a string: it means the number
    ("train.max_steps=2.0", None),
    ("data.num_workers=auto", None),
    ("train.max_grad_norm=null", None),
]


@pytest.mark.parametrize("override, expected", COERCION_CASES, ids=[c[0] for c in COERCION_CASES])
def test_values_of_the_wrong_kind_are_not_coerced_silently(override, expected):
    if expected is None:
        load_config(None, [override])
    else:
        assert _problems(None, [override]) == [expected]
