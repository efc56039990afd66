"""Per-group learning rates as explicit optimizer parameter groups."""

from __future__ import annotations

import copy

import pytest

from vlmtune.config.load import load_config
from vlmtune.model.groups import assign_groups
from vlmtune.model.load import arch_for
from vlmtune.model.tuning import apply_plan, build_plan
from vlmtune.train.optim import build_optimizer, build_scheduler, param_groups


def _setup(tiny, overrides):
    model = copy.deepcopy(tiny[0])
    cfg = load_config(None, overrides)
    gmap = assign_groups([n for n, _ in model.named_parameters()], arch_for(model, cfg.model))
    plans = build_plan(model, gmap, cfg)
    model = apply_plan(model, gmap, plans)
    return model, gmap, plans, param_groups(model, gmap, plans)


def test_projector_lora_gets_projector_rate(tiny):
    _, _, _, groups = _setup(
        tiny, ["groups.projector.mode=lora", "groups.projector.lr=3e-3", "groups.language_model.lr=5e-4"]
    )
    by_name = {g["name"]: g for g in groups}
    assert by_name["projector"]["lr"] == 3e-3
    assert by_name["language_model"]["lr"] == 5e-4
    assert all("merger" in n and "lora_" in n for n in by_name["projector"]["param_names"])
    assert all("language_model" in n for n in by_name["language_model"]["param_names"])


def test_every_trainable_parameter_in_exactly_one_group(tiny):
    model, _, _, groups = _setup(
        tiny, ["groups.projector.mode=full", "train.weight_decay=0.1", "groups.lm_head.mode=full"]
    )
    names = [n for g in groups for n in g["param_names"]]
    assert len(names) == len(set(names))
    assert set(names) == {n for n, p in model.named_parameters() if p.requires_grad}
    # biases and norm weights never decay; matrices take the configured decay
    for g in groups:
        if g["name"].endswith("(no decay)"):
            assert g["weight_decay"] == 0.0
        else:
            assert g["weight_decay"] == 0.1


def test_a_trainable_parameter_in_a_frozen_group_is_an_error(tiny):
    model, gmap, plans, _ = _setup(tiny, ["groups.projector.mode=full"])
    name, param = next((n, p) for n, p in model.named_parameters() if gmap.group_of(n) == "vision_tower")
    param.requires_grad_(True)  # the plan says frozen; something else made it trainable
    with pytest.raises(
        ValueError, match=r"1 trainable parameter\(s\) in groups this stage keeps frozen: .*\(vision_tower\)"
    ):
        param_groups(model, gmap, plans)


def test_group_falls_back_to_run_rate(tiny):
    _, _, _, groups = _setup(tiny, ["train.learning_rate=7e-4"])
    assert {g["lr"] for g in groups} == {7e-4}


@pytest.mark.parametrize("kind,expected_mid", [("cosine", 0.5), ("linear", 0.5), ("constant", 1.0)])
def test_schedule_keeps_group_ratios(tiny, kind, expected_mid):
    _, _, _, groups = _setup(
        tiny, ["groups.projector.mode=lora", "groups.projector.lr=4e-3", "groups.language_model.lr=1e-3"]
    )
    opt = build_optimizer(groups, (0.9, 0.999))
    sched = build_scheduler(opt, kind, warmup=10, total=110)
    lrs = []
    for _ in range(60):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr())
    assert lrs[0][0] == pytest.approx(4e-3 * 1 / 10)  # linear warmup over 10 steps
    proj, lm = lrs[59]  # step 60: halfway through the decay
    assert proj == pytest.approx(4e-3 * expected_mid, rel=1e-6)
    assert proj / lm == pytest.approx(4.0)
