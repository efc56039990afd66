"""The data order is a function of (seed, epoch) and can start part-way into an epoch."""

from __future__ import annotations

import torch

from vlmtune.data.sampler import EpochSampler


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


def test_grouping_by_length_sorts_within_megabatches_and_keeps_every_sample():
    lengths = [(i * 37) % 101 for i in range(300)]
    s = EpochSampler(300, seed=5, lengths=lengths, batch_size=2)  # megabatches of 100 samples
    order = s.order()
    assert sorted(order) == list(range(300))
    for k in range(0, 300, 100):
        chunk = [lengths[i] for i in order[k : k + 100]]
        assert chunk == sorted(chunk, reverse=True)
    assert order == EpochSampler(300, seed=5, lengths=lengths, batch_size=2).order()  # deterministic
    s.set_epoch(1)
    assert s.order() != order


def test_grouping_reduces_padding():
    lengths = [(i * 37) % 101 + 1 for i in range(400)]

    def padding(order, b=8):
        batches = [order[k : k + b] for k in range(0, len(order), b)]
        real = sum(lengths[i] for i in order)
        return 1 - real / sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)

    random = padding(EpochSampler(400, seed=0).order())
    grouped = padding(EpochSampler(400, seed=0, lengths=lengths, batch_size=8).order())
    assert grouped < random / 5, (grouped, random)
