"""The builtin base's first stage: the vision tower and merger pretrained as a classifier of the scenes."""

from __future__ import annotations

import torch

from vlmtune.builtin.tower import ATTRIBUTES, TowerRecipe, pretrain_tower


def test_a_short_tower_stage_learns_the_easy_attributes_and_touches_only_the_vision_path(tiny):
    """60 steps on the random tiny model (its own copy): colour and size, the attributes a tower reads first, are well
    above chance (measured: colour, size and position 1.0 at 60 steps, against 1/4, 1/2, 1/4; the shape 0.64), and nothing but
    ``model.visual`` (tower and merger) changes."""
    import copy

    model, processor = tiny
    model = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    printed: list[str] = []
    recipe = TowerRecipe(steps=60, images=512, eval_images=128)
    accuracy = pretrain_tower(model, processor, recipe, echo=printed.append)

    assert set(accuracy) == {f"tower/{k}_accuracy" for k in ATTRIBUTES}
    assert accuracy["tower/color_accuracy"] >= 0.6 and accuracy["tower/size_accuracy"] >= 0.75, accuracy
    assert any(line.startswith("tower on held-out images:") for line in printed), printed
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".visual." in k for k in changed), sorted(changed)
    assert any(".visual.merger." in k for k in changed) and any(".visual.blocks." in k for k in changed)
