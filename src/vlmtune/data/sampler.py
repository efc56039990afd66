"""A data order that is a pure function of (seed, epoch), with a start offset, so a resumed run sees the same
batches; optionally grouped by length so a batch holds samples of similar length (less padding)."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

# Samples sorted together when grouping by length: batch_size x MEGABATCH (as transformers' LengthGroupedSampler).
MEGABATCH = 50


class EpochSampler(Sampler[int]):
    """Shuffled (or in-order) indices for one epoch, starting ``start`` samples in.

    The permutation depends only on ``seed`` and the epoch set with ``set_epoch`` (accelerate calls it on a
    prepared loader), never on the global RNG; ``start`` skips the samples a resumed run has already seen.
    With ``lengths`` and ``batch_size``, each run of ``batch_size * 50`` shuffled samples is sorted by length
    (longest first), so consecutive batches hold similar lengths while the epoch stays a random order of
    mixed-length groups.
    """

    def __init__(
        self, size: int, seed: int, shuffle: bool = True, lengths: list[int] | None = None, batch_size: int = 1
    ):
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.lengths = lengths
        self.batch_size = batch_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.size, generator=gen).tolist()
        if self.lengths is None:
            return perm
        group = self.batch_size * MEGABATCH
        return [
            i for k in range(0, self.size, group) for i in sorted(perm[k : k + group], key=lambda j: -self.lengths[j])
        ]

    def __iter__(self):
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return self.size - self.start
