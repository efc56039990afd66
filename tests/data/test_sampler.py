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


def _mixed(sources, weights, epoch="sum", seed=0):
    from vlmtune.data.sampler import Mix

    return EpochSampler(len(sources), seed, mix=Mix(tuple(sources), tuple(weights), epoch))


def test_a_weighted_mix_draws_each_source_its_share():
    sources = [0] * 100 + [1] * 10  # a big source and a small one, weighted 1:1
    s = _mixed(sources, [1, 1])
    order = s.order()
    assert len(order) == len(s) == 110  # "sum": as many as the sources hold
    drawn = [sources[i] for i in order]
    assert drawn.count(0) == 55 and drawn.count(1) == 55
    small = [i for i in order if sources[i] == 1]
    assert sorted(set(small)) == list(range(100, 110))  # the small source repeats: every item 5 or 6 times
    assert {small.count(i) for i in range(100, 110)} <= {5, 6}
    big = [i for i in order if sources[i] == 0]
    assert len(set(big)) == 55  # the big one is subsampled without repeats ...
    s.set_epoch(1)
    assert {i for i in s.order() if sources[i] == 0} != set(big)  # ... afresh each epoch
    mix = s.realised_mix()
    assert mix[1] == {"source": 1, "drawn": 55, "distinct": 10, "held": 10}


def test_mix_epoch_sizes_follow_llama_factorys_interleave_strategies():
    sources = [0] * 30 + [1] * 10
    assert len(_mixed(sources, [0.5, 0.5], "under")) == 20  # the small source is used up after 20 draws
    assert len(_mixed(sources, [0.5, 0.5], "over")) == 60  # the big one is seen whole after 60
    assert len(_mixed(sources, [3, 1], 8)) == 8
    assert [sum(1 for i in _mixed(sources, [3, 1], 8).order() if sources[i] == k) for k in (0, 1)] == [6, 2]


def test_a_mixed_order_is_a_function_of_seed_epoch_and_start():
    sources = [k % 3 for k in range(40)]
    a, b = _mixed(sources, [1, 2, 3], seed=7), _mixed(sources, [1, 2, 3], seed=7)
    torch.manual_seed(1)
    first = list(a)
    torch.manual_seed(2)
    assert list(b) == first
    b.start = 13
    assert list(b) == first[13:] and len(b) == len(first) - 13
    assert list(_mixed(sources, [1, 2, 3], seed=8)) != first
