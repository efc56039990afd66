"""What each family supports is registry data, and settings a family cannot honour are named config errors."""

import pytest

from vlmtune.config.schema import TrainConfig
from vlmtune.model.archs import REGISTRY, family_problems

CASES = [
    # name, entry, train settings, expected fragment (None: no problem)
    ("qwen2_vl packs", "qwen2_vl", {"packing": True}, None),
    ("qwen2_5_vl packs", "qwen2_5_vl", {"packing": True}, None),
    ("qwen3_vl packs", "qwen3_vl", {"packing": True}, None),
    ("llava does not pack", "llava", {"packing": True}, "'train.packing': model_type 'llava' (llava)"),
    ("paligemma does not pack", "paligemma", {"packing": True}, "'train.packing': model_type 'paligemma'"),
    ("packing off is fine anywhere", "llava", {"packing": False}, None),
]


@pytest.mark.parametrize("name,entry,train,expected", CASES, ids=[c[0] for c in CASES])
def test_family_problems(name, entry, train, expected):
    problems = family_problems(REGISTRY[entry], REGISTRY[entry].model_types[0], TrainConfig(**train))
    if expected is None:
        assert problems == []
    else:
        (problem,) = problems
        assert problem.startswith(expected) and "qwen2_vl, qwen2_5_vl, qwen3_vl" in problem
        assert "set train.packing: false" in problem


def test_capabilities_are_where_the_recipe_needs_them():
    with_cache = {name for name, spec in REGISTRY.items() if spec.vision_cache}
    assert with_cache == {"qwen2_vl", "qwen2_5_vl"}  # Qwen3-VL: deepstack features come from inside the tower
    assert {name for name, spec in REGISTRY.items() if spec.window_order} == {"qwen2_5_vl"}
    assert {name for name, spec in REGISTRY.items() if spec.packing} == {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"}
