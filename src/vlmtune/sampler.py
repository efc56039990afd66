"""A data order that is a pure function of (seed, epoch), with a start offset, so a resumed run sees the same batches."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Shuffled (or in-order) indices for one epoch, starting ``start`` samples in.

    The permutation depends only on ``seed`` and the epoch set with ``set_epoch`` (accelerate calls it on a
    prepared loader), never on the global RNG; ``start`` skips the samples a resumed run has already seen.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.size, generator=gen).tolist()

    def __iter__(self):
        return iter(self.order()[self.start:])

    def __len__(self) -> int:
        return self.size - self.start
