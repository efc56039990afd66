"""The builtin base's probe: held-out questions with balanced answers, and a model blind to the image shows no gap."""

from __future__ import annotations

from collections import Counter

import numpy as np

from tests.eval.test_alignment import blind
from vlmtune.data.shapes import QUESTIONS
from vlmtune.eval.probe import PROBE_KINDS, _given, _other, probe_base, probe_items


def test_probe_asks_each_attribute_with_balanced_answers():
    items = probe_items(per_kind=12)
    assert [p.kind for p in items] == [k for k in PROBE_KINDS for _ in range(12)]
    for kind, (task, values) in PROBE_KINDS.items():
        mine = [p for p in items if p.kind == kind]
        assert Counter(p.value for p in mine) == {v: 12 // len(values) for v in values}, kind
        assert all(p.item.sample.messages[0][1] == "<image>" + QUESTIONS[task] for p in mine)
        assert all(_given(kind, p.item.answer) == p.value for p in mine)
        # the swapped image always shows another value of the attribute
        assert all(items[_other(items, items.index(p))].value != p.value for p in mine)
    again = probe_items(per_kind=12)
    assert all(np.array_equal(np.asarray(a.item.images[0]), np.asarray(b.item.images[0])) for a, b in zip(items, again))


def test_a_model_blind_to_the_image_shows_no_gap(tiny_dir, tiny):
    _, processor = tiny
    result = probe_base(blind(tiny_dir), processor, per_kind=4, batch_size=8)
    assert set(result.kinds) == set(PROBE_KINDS)
    assert abs(result.gap) < 1e-4 and all(abs(r.gap) < 1e-4 for r in result.kinds.values()), result
    assert [r.chance for r in result.kinds.values()] == [1 / 3, 1 / 2, 1 / 4, 1 / 4]
