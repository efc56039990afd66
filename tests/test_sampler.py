"""The data order is a function of (seed, epoch) and can start part-way into an epoch."""

from __future__ import annotations

import torch

from vlmtune.sampler import EpochSampler


def test_order_depends_on_seed_and_epoch_only():
    a, b = EpochSampler(50, seed=3), EpochSampler(50, seed=3)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(123)  # the global RNG does not matter
    assert list(b) == first and sorted(first) == list(range(50))
    b.set_epoch(1)
    assert list(b) != first and sorted(b) == list(range(50))
    assert list(EpochSampler(50, seed=4)) != first


def test_start_skips_what_was_already_seen():
    s = EpochSampler(20, seed=1)
    s.set_epoch(2)
    full = list(s)
    s.start = 8
    assert list(s) == full[8:] and len(s) == 12


def test_without_shuffle_the_order_is_the_file_order():
    assert list(EpochSampler(5, seed=1, shuffle=False)) == [0, 1, 2, 3, 4]
