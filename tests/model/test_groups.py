"""Component grouping (vlmtune.model.archs / vlmtune.model.groups) against the real Qwen2-VL and Qwen2.5-VL module trees.

The four published configs in ``real_configs.py`` are built on the meta device (no weights, no hub
access), so the parameter names and sizes are exactly those of the released checkpoints under the
installed transformers. Expected sizes are computed from the config fields with the architecture's
formulas, independently of the code under test.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn

from tests.real_configs import REAL_CONFIGS
from vlmtune.model.archs import GROUPS, REGISTRY, Layout, find_arch
from vlmtune.model.groups import (
    assign_groups,
    group_of,
    linear_modules,
    matches_target_name,
    module_kind,
    owner_modules,
    pattern_match_length,
)

REPO_IDS = list(REAL_CONFIGS)

# Parameter counts the hub shows for each checkpoint ("Model size"), for a rough cross-check.
PUBLISHED_SIZE = {
    "Qwen/Qwen2-VL-2B-Instruct": 2.21e9,
    "Qwen/Qwen2-VL-7B-Instruct": 8.29e9,
    "Qwen/Qwen2.5-VL-3B-Instruct": 3.75e9,
    "Qwen/Qwen2.5-VL-7B-Instruct": 8.29e9,
}

TIED = {
    "Qwen/Qwen2-VL-2B-Instruct": True,
    "Qwen/Qwen2-VL-7B-Instruct": False,
    "Qwen/Qwen2.5-VL-3B-Instruct": True,
    "Qwen/Qwen2.5-VL-7B-Instruct": False,
}

NESTED = REGISTRY["qwen2_vl"].layouts[0]
FLAT = REGISTRY["qwen2_vl"].layouts[1]


# ---------------------------------------------------------------------------------------------
# Building the real models (meta device), once per module
# ---------------------------------------------------------------------------------------------

_BUILT: dict[str, tuple] = {}


def _build(repo_id: str):
    if repo_id not in _BUILT:
        data = copy.deepcopy(REAL_CONFIGS[repo_id])
        cfg = transformers.AutoConfig.for_model(**data)
        with torch.device("meta"):
            model = transformers.AutoModelForImageTextToText.from_config(cfg)
        _BUILT[repo_id] = (cfg, model)
    return _BUILT[repo_id]


@pytest.fixture(params=REPO_IDS)
def real(request):
    repo_id = request.param
    cfg, model = _build(repo_id)
    names = [n for n, _ in model.named_parameters()]
    groups = assign_groups(names, find_arch(cfg.model_type))
    return repo_id, cfg, model, names, groups


def _expected_sizes(data: dict) -> dict[str, int]:
    """Parameter count of each group, from the published config fields alone."""
    vc = data["vision_config"]
    qwen25 = data["model_type"] == "qwen2_5_vl"
    patch_embed = (
        vc["in_chans"]
        * vc["temporal_patch_size"]
        * vc["patch_size"] ** 2
        * (vc["hidden_size"] if qwen25 else vc["embed_dim"])
    )  # Conv3d, no bias
    if qwen25:  # RMSNorm (weight only), SwiGLU vision MLP
        e, i, out = vc["hidden_size"], vc["intermediate_size"], vc["out_hidden_size"]
        block = 2 * e + (3 * e * e + 3 * e) + (e * e + e) + 2 * (e * i + i) + (i * e + e)
        ln_q = e
    else:  # LayerNorm (weight + bias), fc1/fc2 vision MLP
        e, out = vc["embed_dim"], vc["hidden_size"]
        i = e * vc["mlp_ratio"]
        block = 4 * e + (3 * e * e + 3 * e) + (e * e + e) + (e * i + i) + (i * e + e)
        ln_q = 2 * e
    merged = e * vc["spatial_merge_size"] ** 2
    projector = ln_q + (merged * merged + merged) + (merged * out + out)

    h, v, n_layers = data["hidden_size"], data["vocab_size"], data["num_hidden_layers"]
    head_dim = h // data["num_attention_heads"]
    kv = data["num_key_value_heads"] * head_dim
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * data["intermediate_size"] + 2 * h
    language_model = v * h + n_layers * layer + h
    return {
        "vision_tower": patch_embed + vc["depth"] * block,
        "projector": projector,
        "language_model": language_model,
        "lm_head": 0 if data["tie_word_embeddings"] else v * h,
    }


def _group_sizes(model: nn.Module, groups) -> dict[str, int]:
    sizes = dict.fromkeys(GROUPS, 0)
    for name, p in model.named_parameters():
        sizes[groups.param_groups[name]] += p.numel()
    return sizes


# ---------------------------------------------------------------------------------------------
# The four published checkpoints
# ---------------------------------------------------------------------------------------------


def test_real_configs_are_the_published_families():
    assert [d["model_type"] for d in REAL_CONFIGS.values()] == ["qwen2_vl", "qwen2_vl", "qwen2_5_vl", "qwen2_5_vl"]
    assert {k: d["tie_word_embeddings"] for k, d in REAL_CONFIGS.items()} == TIED


def test_every_parameter_in_exactly_one_group(real):
    _, cfg, _, names, groups = real
    assert len(names) == len(set(names))
    assert groups.arch is find_arch(cfg.model_type)
    assert groups.layout == NESTED
    assert list(groups.param_groups) == names
    assert set(groups.param_groups.values()) <= set(GROUPS)
    per_group = [groups.params_in(g) for g in GROUPS]
    assert sum(len(p) for p in per_group) == len(names)
    assert sorted(n for p in per_group for n in p) == sorted(names)


def test_projector_is_exactly_the_merger(real):
    _, _, _, names, groups = real
    merger = [n for n in names if n.startswith("model.visual.merger.")]
    assert merger  # non-empty
    assert groups.params_in("projector") == merger
    assert "model.visual.merger.mlp.0.weight" in merger
    assert "model.visual.merger.mlp.2.bias" in merger
    for n in names:
        if n.startswith("model.visual.") and not n.startswith("model.visual.merger."):
            assert groups.param_groups[n] == "vision_tower", n
    vision = groups.params_in("vision_tower")
    assert vision and all(n.startswith("model.visual.") for n in vision)
    assert "model.visual.patch_embed.proj.weight" in vision
    assert "model.visual.blocks.0.attn.qkv.weight" in vision


def test_language_model_group_and_embeddings(real):
    _, _, _, names, groups = real
    assert groups.param_groups["model.language_model.embed_tokens.weight"] == "language_model"
    assert groups.param_groups["model.language_model.norm.weight"] == "language_model"
    lm = groups.params_in("language_model")
    assert lm == [n for n in names if n.startswith("model.language_model.")]


def test_lm_head_own_parameter_or_tied(real):
    repo_id, cfg, model, names, groups = real
    embed = model.get_submodule("model.language_model.embed_tokens").weight
    assert isinstance(model.get_submodule("lm_head"), nn.Linear)
    if TIED[repo_id]:
        assert cfg.tie_word_embeddings is True
        # transformers ties lm_head.weight to the input embedding: one tensor, which
        # named_parameters() reports once, under the embedding's name.
        assert model.lm_head.weight is embed
        assert "lm_head.weight" not in names
        assert groups.params_in("lm_head") == []
        all_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
        assert "lm_head.weight" in all_names
        assert groups.group_of("lm_head.weight") == "lm_head"
    else:
        assert cfg.tie_word_embeddings is False
        assert model.lm_head.weight is not embed
        assert groups.params_in("lm_head") == ["lm_head.weight"]
        assert names[-1] == "lm_head.weight"


def test_group_sizes_match_architecture_and_published_size(real):
    repo_id, _, model, _, groups = real
    sizes = _group_sizes(model, groups)
    assert sizes == _expected_sizes(REAL_CONFIGS[repo_id])
    assert all(sizes[g] > 0 for g in ("vision_tower", "projector", "language_model"))
    total = sum(sizes.values())
    assert total == sum(p.numel() for p in model.parameters())
    assert abs(total - PUBLISHED_SIZE[repo_id]) / PUBLISHED_SIZE[repo_id] < 0.10, total


def test_group_sizes_of_qwen2_vl_2b_pinned():
    cfg, model = _build("Qwen/Qwen2-VL-2B-Instruct")
    groups = assign_groups([n for n, _ in model.named_parameters()], find_arch(cfg.model_type))
    assert _group_sizes(model, groups) == {
        "vision_tower": 631_183_360,
        "projector": 34_087_936,
        "language_model": 1_543_714_304,
        "lm_head": 0,
    }


def test_projector_linear_modules(real):
    _, _, model, _, groups = real
    assert linear_modules(model, groups, "projector") == ["model.visual.merger.mlp.0", "model.visual.merger.mlp.2"]


def test_vision_tower_linear_modules_exclude_patch_embed_and_merger(real):
    repo_id, cfg, model, _, groups = real
    assert isinstance(model.get_submodule("model.visual.patch_embed.proj"), nn.Conv3d)
    vision = linear_modules(model, groups, "vision_tower")
    assert not any(n.startswith("model.visual.patch_embed") for n in vision)
    assert not any(n.startswith("model.visual.merger") for n in vision)
    assert all(n.startswith("model.visual.blocks.") for n in vision)
    depth = REAL_CONFIGS[repo_id]["vision_config"]["depth"]
    if cfg.model_type == "qwen2_vl":
        per_block = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    else:
        per_block = ["attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert vision == [f"model.visual.blocks.{i}.{leaf}" for i in range(depth) for leaf in per_block]


def test_language_model_and_lm_head_linear_modules(real):
    repo_id, _, model, _, groups = real
    lm = linear_modules(model, groups, "language_model")
    leaves = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    n_layers = REAL_CONFIGS[repo_id]["num_hidden_layers"]
    assert lm == [f"model.language_model.layers.{i}.{leaf}" for i in range(n_layers) for leaf in leaves]
    # The lm_head module exists (and is a Linear) whether or not its weight is tied.
    assert linear_modules(model, groups, "lm_head") == ["lm_head"]


def test_owner_modules_of_real_models(real):
    _, _, model, _, groups = real
    vision = owner_modules(model, groups, "vision_tower")
    assert vision[0] == "model.visual.patch_embed.proj" and not any("merger" in m for m in vision)
    assert owner_modules(model, groups, "projector") == [
        "model.visual.merger.ln_q",
        "model.visual.merger.mlp.0",
        "model.visual.merger.mlp.2",
    ]
    assert owner_modules(model, groups, "language_model")[0] == "model.language_model.embed_tokens"


def test_peft_prefixed_names_resolve_the_same(real):
    _, cfg, _, names, groups = real
    wrapped = assign_groups(["base_model.model." + n for n in names], find_arch(cfg.model_type))
    assert wrapped.layout == groups.layout
    assert wrapped.param_groups == groups.param_groups
    assert groups.group_of("base_model.model.model.visual.merger.mlp.0") == "projector"
    assert groups.group_of("base_model.model.model.visual.blocks.3.attn.qkv") == "vision_tower"


# ---------------------------------------------------------------------------------------------
# The older flat layout (visual / model / lm_head)
# ---------------------------------------------------------------------------------------------


def _to_flat(name: str) -> str:
    if name.startswith("model.visual."):
        return name[len("model.") :]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    assert name.startswith("lm_head"), name
    return name


def test_flat_layout_names_get_the_same_groups(real):
    _, cfg, _, names, groups = real
    flat_names = [_to_flat(n) for n in names]
    assert len(set(flat_names)) == len(flat_names)
    assert "visual.merger.mlp.0.weight" in flat_names
    assert "model.embed_tokens.weight" in flat_names
    flat = assign_groups(flat_names, find_arch(cfg.model_type))
    assert flat.layout == FLAT
    assert flat.layout.name.startswith("flat")
    assert groups.layout.name.startswith("nested")
    for original, renamed in zip(names, flat_names):
        assert flat.param_groups[renamed] == groups.param_groups[original], (original, renamed)
    assert flat.params_in("projector") == [n for n in flat_names if n.startswith("visual.merger.")]


def test_layout_not_covering_everything_is_an_error():
    with pytest.raises(ValueError, match=r"no layout places every parameter.*vision_head\.w"):
        assign_groups(["model.visual.blocks.0.w", "vision_head.w"], find_arch("qwen2_vl"))


# ---------------------------------------------------------------------------------------------
# Pattern matching, table driven (peft REGEX_TEST_CASES style)
# ---------------------------------------------------------------------------------------------

# (pattern, name, expected number of components matched; 0 = no match)
PATTERN_CASES = [
    ("model.visual", "model.visual.blocks.0.attn.qkv.weight", 2),
    ("model.visual.merger", "model.visual.merger.mlp.0.weight", 3),
    ("model.visual.merger", "model.visual.blocks.0.attn.qkv.weight", 0),
    ("lm_head", "lm_head.weight", 1),
    ("lm_head", "lm_head", 1),  # a module path equal to the pattern
    # whole components only, never substrings
    ("model.visual", "model.visual_x.w", 0),
    ("model.visual", "model.visualx", 0),
    ("model.language_model", "model.language_model_extra.weight", 0),
    ("lm_head", "lm_head_2.weight", 0),
    ("visual", "model.visual.blocks.0.w", 0),  # anchored at the root, not found anywhere
    ("model.visual.merger.mlp", "model.visual.merger", 0),  # pattern longer than the name
    ("model.visual", "model", 0),
    # "*" is exactly one component
    ("model.*.merger", "model.visual.merger.ln_q.weight", 3),
    ("*.visual.*.mlp", "model.visual.merger.mlp.0.weight", 4),
    ("*", "lm_head.weight", 1),
    ("model.*", "model", 0),
    ("model.*.merger", "model.visual.blocks.merger", 0),
]


@pytest.mark.parametrize("pattern,name,expected", PATTERN_CASES)
def test_pattern_match_length(pattern, name, expected):
    assert pattern_match_length(pattern, name) == expected


# (layout, name, expected group)
GROUP_CASES = [
    (NESTED, "model.visual.merger.mlp.0.weight", "projector"),  # longest match wins over model.visual
    (NESTED, "model.visual.merger.ln_q.weight", "projector"),
    (NESTED, "model.visual.merger", "projector"),
    (NESTED, "model.visual.blocks.0.attn.qkv.weight", "vision_tower"),
    (NESTED, "model.visual.patch_embed.proj.weight", "vision_tower"),
    (NESTED, "model.visual", "vision_tower"),
    (NESTED, "model.language_model.embed_tokens.weight", "language_model"),
    (NESTED, "model.language_model.layers.0.self_attn.q_proj.weight", "language_model"),
    (NESTED, "lm_head.weight", "lm_head"),
    (NESTED, "model.visual_x.w", None),
    (NESTED, "model.visualmerger.w", None),
    (NESTED, "model.visual_merger.mlp.0.weight", None),
    (NESTED, "model.lm_head.weight", None),
    (NESTED, "lm_head_extra.weight", None),
    (NESTED, "visual.merger.mlp.0.weight", None),  # flat name under the nested layout
    (FLAT, "visual.merger.mlp.0.weight", "projector"),
    (FLAT, "visual.blocks.0.attn.qkv.weight", "vision_tower"),
    (FLAT, "model.embed_tokens.weight", "language_model"),
    (FLAT, "lm_head.weight", "lm_head"),
    (FLAT, "visual_x.w", None),
    # Under the flat layout "model" covers every nested name: the nested layout must be tried first.
    (FLAT, "model.visual.merger.mlp.0.weight", "language_model"),
]


@pytest.mark.parametrize("layout,name,expected", GROUP_CASES)
def test_group_of(layout, name, expected):
    assert group_of(name, layout) == expected


WILD = Layout(
    name="wildcards",
    patterns={
        "vision_tower": ("*.vision_tower",),
        "projector": ("*.vision_tower.*.proj", "model.mm_projector"),
        "language_model": ("model",),
        "lm_head": ("lm_head",),
    },
)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("model.vision_tower.encoder.layers.0.w", "vision_tower"),  # 2 components beat "model" (1)
        ("model.vision_tower.head.proj.weight", "projector"),  # 4 beat 2
        ("model.vision_tower.head.projx.weight", "vision_tower"),
        ("model.mm_projector.0.weight", "projector"),
        ("model.layers.0.w", "language_model"),
        ("other.vision_tower.w", "vision_tower"),
        ("other.w", None),
    ],
)
def test_group_of_with_wildcards(name, expected):
    assert group_of(name, WILD) == expected


def test_patterns_are_in_the_registry_as_documented():
    for arch_name in ("qwen2_vl", "qwen2_5_vl"):
        nested, flat = REGISTRY[arch_name].layouts
        assert nested.patterns == {
            "vision_tower": ("model.visual",),
            "projector": ("model.visual.merger",),
            "language_model": ("model.language_model",),
            "lm_head": ("lm_head",),
        }
        assert flat.patterns == {
            "vision_tower": ("visual",),
            "projector": ("visual.merger",),
            "language_model": ("model",),
            "lm_head": ("lm_head",),
        }
        assert set(nested.patterns) == set(GROUPS) == set(flat.patterns)


# ---------------------------------------------------------------------------------------------
# module_kind and target-name matching
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,expected",
    [
        ("model.language_model.layers.0.self_attn.q_proj", "attention"),
        ("model.language_model.layers.27.self_attn.o_proj", "attention"),
        ("model.visual.blocks.0.attn.qkv", "attention"),
        ("model.visual.blocks.0.attn.proj", "attention"),
        ("model.visual.merger.mlp.0", "mlp"),
        ("model.visual.merger.mlp.2", "mlp"),
        ("model.language_model.layers.0.mlp.gate_proj", "mlp"),
        ("model.visual.blocks.0.mlp.fc1", "mlp"),
        ("model.visual.blocks.0.mlp.down_proj", "mlp"),
        ("lm_head", None),
        ("model.visual.patch_embed.proj", None),
        ("model.language_model.self_attention_x.q_proj", None),  # container names match whole components
        ("model.language_model.layers.0.mlpx.gate_proj", None),
        ("model.visual.blocks.0.attn", None),  # the container itself: only its parents count
    ],
)
def test_module_kind(name, expected):
    assert module_kind(name, find_arch("qwen2_vl")) == expected
    assert module_kind(name, find_arch("qwen2_5_vl")) == expected


@pytest.mark.parametrize(
    "module_name,target,expected",
    [
        ("model.language_model.layers.0.self_attn.q_proj", "q_proj", True),
        ("model.language_model.layers.0.self_attn.q_proj", "self_attn.q_proj", True),
        ("model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.0.self_attn.q_proj", True),
        ("model.visual.merger.mlp.0", "mlp.0", True),
        ("model.language_model.layers.0.self_attn.xq_proj", "q_proj", False),
        ("model.language_model.layers.0.self_attn.q_proj", "proj", False),
        ("model.visual.merger.mlp.0", "merger", False),
        ("lm_head", "lm_head", True),
    ],
)
def test_matches_target_name(module_name, target, expected):
    assert matches_target_name(module_name, target) is expected


# ---------------------------------------------------------------------------------------------
# owner_modules on a tiny real model (CPU, real weights)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            bos_token_id=1,
            eos_token_id=2,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            tie_word_embeddings=False,
        ),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=8, spatial_merge_size=2),
        image_token_id=100,
        video_token_id=101,
        vision_start_token_id=102,
        vision_end_token_id=103,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(cfg)
    groups = assign_groups([n for n, _ in model.named_parameters()], find_arch(cfg.model_type))
    return model, groups


def test_tiny_model_is_what_was_asked(tiny):
    model, groups = tiny
    assert next(model.parameters()).device.type == "cpu"
    assert model.get_submodule("model.visual.merger.mlp.0").in_features == 32 * 4
    assert model.get_submodule("model.visual.merger.mlp.2").out_features == 64
    assert len(model.get_submodule("model.visual.blocks")) == 2
    assert len(model.get_submodule("model.language_model.layers")) == 2
    assert groups.layout == NESTED


def test_owner_modules_tiny(tiny):
    model, groups = tiny
    assert owner_modules(model, groups, "projector") == [
        "model.visual.merger.ln_q",
        "model.visual.merger.mlp.0",
        "model.visual.merger.mlp.2",
    ]
    assert owner_modules(model, groups, "lm_head") == ["lm_head"]
    # never a ModuleList or a container: every owner holds parameters of its own
    for group in GROUPS:
        for name in owner_modules(model, groups, group):
            assert list(model.get_submodule(name).parameters(recurse=False)), name


@pytest.mark.parametrize("group", GROUPS)
def test_owner_modules_cover_exactly_the_group(tiny, group):
    model, groups = tiny
    chosen = owner_modules(model, groups, group)
    covered = sorted(f"{m}.{n}" for m in chosen for n, _ in model.get_submodule(m).named_parameters())
    assert covered == sorted(groups.params_in(group))
    # No chosen module sits inside another chosen one.
    assert not any(a != b and a.startswith(b + ".") for a in chosen for b in chosen)


# ---------------------------------------------------------------------------------------------
# Unknown model types
# ---------------------------------------------------------------------------------------------


def test_unknown_model_type_lists_supported():
    with pytest.raises(ValueError) as err:
        find_arch("mllama")
    msg = str(err.value)
    assert "'mllama'" in msg
    assert (
        "Supported: gemma3, idefics3, internvl, llava, llava_next, llava_onevision, mistral3, paligemma, "
        "qwen2_5_vl, qwen2_vl, qwen3_vl, smolvlm."
    ) in msg
    assert "model.arch_entry" in msg


def test_known_model_types_resolve():
    assert find_arch("qwen2_vl").name == "qwen2_vl"
    assert find_arch("qwen2_5_vl").name == "qwen2_5_vl"
