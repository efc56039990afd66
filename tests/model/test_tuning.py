"""Target resolution (table-driven), the peft wrapping per group, and the plan's errors."""

from __future__ import annotations

import copy

import pytest
from torch import nn

from vlmtune.config.errors import ConfigError
from vlmtune.config.load import load_config
from vlmtune.model.groups import assign_groups
from vlmtune.model.load import arch_for
from vlmtune.model.tuning import apply_plan, build_plan, plan_table

LM_ATTN = [
    f"model.language_model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
]
LM_MLP = [f"model.language_model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")]
MERGER = ["model.visual.merger.mlp.0", "model.visual.merger.mlp.2"]
VISION_ATTN = [f"model.visual.blocks.{i}.attn.{p}" for i in range(2) for p in ("qkv", "proj")]
VISION_MLP = [f"model.visual.blocks.{i}.mlp.{p}" for i in range(2) for p in ("fc1", "fc2")]


def _plan(tiny, overrides):
    model = copy.deepcopy(tiny[0])
    cfg = load_config(None, overrides)
    gmap = assign_groups([n for n, _ in model.named_parameters()], arch_for(model, cfg.model))
    return model, gmap, cfg, build_plan(model, gmap, cfg)


# name, overrides, expected LoRA modules per group (sorted)
PL = "groups.projector.mode=lora"  # the default recipe trains the projector fully
TARGET_CASES = [
    ("default recipe", [], {"language_model": LM_ATTN}),
    ("projector lora", [PL], {"projector": MERGER, "language_model": LM_ATTN}),
    (
        "lm all-linear",
        [PL, "groups.language_model.targets=all-linear"],
        {"projector": MERGER, "language_model": LM_ATTN + LM_MLP},
    ),
    ("lm mlp", [PL, "groups.language_model.targets=mlp"], {"projector": MERGER, "language_model": LM_MLP}),
    (
        "explicit leaf names",
        [PL, "groups.language_model.targets=[q_proj,v_proj]"],
        {"projector": MERGER, "language_model": [n for n in LM_ATTN if n.endswith(("q_proj", "v_proj"))]},
    ),
    (
        "dotted suffix",
        [PL, "groups.language_model.targets=[self_attn.o_proj]"],
        {"projector": MERGER, "language_model": [n for n in LM_ATTN if n.endswith("o_proj")]},
    ),
    (
        "projector by index",
        ["groups.projector.targets=[mlp.2]"],
        {"projector": ["model.visual.merger.mlp.2"], "language_model": LM_ATTN},
    ),
    (
        "vision attention",
        [PL, "groups.vision_tower.mode=lora", "groups.vision_tower.targets=attention"],
        {"vision_tower": VISION_ATTN, "projector": MERGER, "language_model": LM_ATTN},
    ),
    (
        "vision all-linear excludes merger",
        [PL, "groups.vision_tower.mode=lora"],
        {"vision_tower": VISION_ATTN + VISION_MLP, "projector": MERGER, "language_model": LM_ATTN},
    ),
    ("projector only", [PL, "groups.language_model.mode=frozen"], {"projector": MERGER}),
]


@pytest.mark.parametrize("name,overrides,expected", TARGET_CASES, ids=[c[0] for c in TARGET_CASES])
def test_lora_target_resolution(tiny, name, overrides, expected):
    _, _, _, plans = _plan(tiny, overrides)
    got = {p.group: sorted(p.modules) for p in plans if p.mode == "lora"}
    assert got == {g: sorted(m) for g, m in expected.items()}


def test_never_wraps_container_or_conv(tiny):
    model, gmap, _, plans = _plan(tiny, ["groups.vision_tower.mode=lora", "groups.projector.mode=lora"])
    modules = dict(model.named_modules())
    for p in plans:
        for name in p.modules if p.mode == "lora" else []:
            assert type(modules[name]) is nn.Linear, name
    all_targets = {m for p in plans if p.mode == "lora" for m in p.modules}
    assert "model.visual.merger" not in all_targets and "model.visual.patch_embed.proj" not in all_targets


def test_apply_plan_trains_exactly_the_planned_parameters(tiny):
    model, gmap, _, plans = _plan(tiny, ["groups.projector.rank=4", "groups.projector.dropout=0.1"])
    peft_model = apply_plan(model, gmap, plans)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    groups = {gmap.group_of(n) for n in trainable}
    assert groups == {"projector", "language_model"}
    # per-group rank via peft's rank_pattern; alpha defaults to 2 x rank
    merger0 = peft_model.get_submodule("base_model.model.model.visual.merger.mlp.0")
    q0 = peft_model.get_submodule("base_model.model.model.language_model.layers.0.self_attn.q_proj")
    assert merger0.r["default"] == 4 and merger0.lora_alpha["default"] == 8
    assert q0.r["default"] == 16 and q0.lora_alpha["default"] == 32
    # per-group dropout
    assert isinstance(merger0.lora_dropout["default"], nn.Dropout) and merger0.lora_dropout["default"].p == 0.1
    assert isinstance(q0.lora_dropout["default"], nn.Identity)
    by = {p.group: p for p in plans}
    # merger mlp.0: 256 -> 256, mlp.2: 256 -> 128 (vision dim 64 x merge 2 x 2 = 256 in, LLM width 128 out)
    assert by["projector"].trainable_params == 4 * (256 + 256) + 4 * (256 + 128)
    assert by["vision_tower"].trainable_params == 0 and by["lm_head"].trainable_params == 0
    table = plan_table(plans)
    for word in ("projector", "lora", "mlp.0, mlp.2", "4/8/0.1", "q_proj, k_proj, v_proj, o_proj"):
        assert word in table


def test_full_group_is_saved_through_modules_to_save(tiny):
    model, gmap, _, plans = _plan(tiny, ["groups.projector.mode=full"])
    peft_model = apply_plan(model, gmap, plans)
    cfg = peft_model.peft_config["default"]
    assert sorted(cfg.modules_to_save) == [
        "model.visual.merger.ln_q",
        "model.visual.merger.mlp.0",
        "model.visual.merger.mlp.2",
    ]
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    projector_full = [n for n in trainable if "merger" in n]
    assert projector_full and all("modules_to_save" in n for n in projector_full)
    by = {p.group: p for p in plans}
    assert by["projector"].trainable_params == by["projector"].total_params


def test_full_vision_tower_with_projector_lora_do_not_overlap(tiny):
    model, gmap, _, plans = _plan(tiny, [PL, "groups.vision_tower.mode=full"])
    peft_model = apply_plan(model, gmap, plans)
    saved = peft_model.peft_config["default"].modules_to_save
    assert saved and not any("merger" in m for m in saved)
    assert "model.visual.patch_embed.proj" in saved


@pytest.mark.parametrize(
    "name,overrides,fragments",
    [
        (
            "name that exists nowhere",
            ["groups.language_model.targets=[qkv_proj]"],
            [
                "'qkv_proj' matches no linear layer",
                "language_model: down_proj, gate_proj, k_proj, o_proj, q_proj",
                "projector: mlp.0, mlp.2",
                "vision_tower: fc1, fc2, proj, qkv",
            ],
        ),
        (
            "attention in projector",
            ["groups.projector.targets=attention"],
            [
                "groups.projector: mode lora with targets 'attention' resolves to no nn.Linear layer",
                "model.visual.merger",
            ],
        ),
    ],
)
def test_plan_errors_name_the_group_and_list_linear_layers(tiny, name, overrides, fragments):
    with pytest.raises(ConfigError) as err:
        _plan(tiny, overrides)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_full_on_tied_lm_head_is_an_error(tiny):
    model = copy.deepcopy(tiny[0])
    model.config.tie_word_embeddings = True
    model.tie_weights()
    cfg = load_config(None, ["groups.lm_head.mode=full"])
    gmap = assign_groups([n for n, _ in model.named_parameters()], arch_for(model, cfg.model))
    with pytest.raises(ConfigError, match="groups.lm_head: mode full but the group has no parameters of its own"):
        build_plan(model, gmap, cfg)
