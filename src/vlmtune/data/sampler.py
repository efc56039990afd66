"""A data order that is a pure function of (seed, epoch), with a start offset, so a resumed run sees the same
batches; optionally grouped by length so a batch holds samples of similar length (less padding), and optionally a
weighted mix of the split's sources."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

# Samples sorted together when grouping by length: batch_size x MEGABATCH (as transformers' LengthGroupedSampler).
MEGABATCH = 50


@dataclass(frozen=True)
class Mix:
    """A weighted mix of sources: each epoch draws ``shares[k]`` samples of source ``k``.

    ``epoch``: "sum" (as many samples as all sources hold), "under" (until the first source is used up: LLaMA-Factory's
    interleave_under), "over" (until every source was seen whole: interleave_over) or a number of samples.
    """

    sources: tuple[int, ...]  # the source of each item of the dataset
    weights: tuple[float, ...]  # one per source
    epoch: str | int = "sum"

    def counts(self) -> list[int]:
        """Items of each source."""
        out = [0] * len(self.weights)
        for k in self.sources:
            out[k] += 1
        return out

    def shares(self) -> list[int]:
        """Samples drawn from each source per epoch (largest-remainder rounding of weight x epoch size)."""
        counts, total_w = self.counts(), sum(self.weights)
        p = [w / total_w for w in self.weights]
        if isinstance(self.epoch, int):
            size = self.epoch
        elif self.epoch == "sum":
            size = sum(counts)
        else:
            ratios = [n / q for n, q in zip(counts, p)]
            size = int(min(ratios) if self.epoch == "under" else max(ratios))
        exact = [q * size for q in p]
        shares = [int(x) for x in exact]
        by_remainder = sorted(range(len(p)), key=lambda k: shares[k] - exact[k])
        for k in by_remainder[: size - sum(shares)]:
            shares[k] += 1
        return shares


class EpochSampler(Sampler[int]):
    """Shuffled (or in-order) indices for one epoch, starting ``start`` samples in.

    The permutation depends only on ``seed`` and the epoch set with ``set_epoch`` (accelerate calls it on a
    prepared loader), never on the global RNG; ``start`` skips the samples a resumed run has already seen.
    With ``lengths`` and ``batch_size``, each run of ``batch_size * 50`` shuffled samples is sorted by length
    (longest first), so consecutive batches hold similar lengths while the epoch stays a random order of
    mixed-length groups. With ``mix``, an epoch draws each source's share: a source short of its share is
    repeated (whole shuffled passes, then a part), a larger one is subsampled afresh each epoch. With ``repeat``
    = (window, times), each run of ``window`` indices comes ``times`` times in a row (GRPO's several optimizer
    steps on one batch of rollouts: the window is one optimizer step's samples over every process).
    """

    def __init__(
        self,
        size: int,
        seed: int,
        shuffle: bool = True,
        lengths: list[int] | None = None,
        batch_size: int = 1,
        mix: Mix | None = None,
        repeat: tuple[int, int] | None = None,
    ):
        self.size = size
        self.repeat = repeat
        self.seed = seed
        self.shuffle = shuffle
        self.lengths = lengths
        self.batch_size = batch_size
        self.mix = mix
        self.epoch = 0
        self.start = 0
        self._shares = mix.shares() if mix is not None else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_size(self) -> int:
        return sum(self._shares) if self._shares is not None else self.size

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)

    def _mixed(self, gen: torch.Generator) -> list[int]:
        items: list[list[int]] = [[] for _ in self._shares]
        for i, k in enumerate(self.mix.sources):
            items[k].append(i)
        drawn = []
        for k, share in enumerate(self._shares):
            own, taken = items[k], []
            while len(taken) < share:
                taken += [own[j] for j in torch.randperm(len(own), generator=gen).tolist()]
            drawn += taken[:share]
        return [drawn[j] for j in torch.randperm(len(drawn), generator=gen).tolist()]

    def order(self) -> list[int]:
        gen = self._generator()
        if self.mix is not None:
            perm = self._mixed(gen)
        elif not self.shuffle:
            return list(range(self.size))
        else:
            perm = torch.randperm(self.size, generator=gen).tolist()
        if self.lengths is None:
            return perm
        group = self.batch_size * MEGABATCH
        return [
            i for k in range(0, len(perm), group) for i in sorted(perm[k : k + group], key=lambda j: -self.lengths[j])
        ]

    def realised_mix(self) -> list[dict] | None:
        """Per source, this epoch's draw: samples drawn, distinct items among them, and items the source holds."""
        if self.mix is None:
            return None
        order = self.order()
        drawn, distinct = [0] * len(self.mix.weights), [0] * len(self.mix.weights)
        for i in order:  # one pass over the epoch, not one per source
            drawn[self.mix.sources[i]] += 1
        for i in set(order):
            distinct[self.mix.sources[i]] += 1
        return [
            {"source": k, "drawn": drawn[k], "distinct": distinct[k], "held": held}
            for k, held in enumerate(self.mix.counts())
        ]

    def _repeated(self, order: list[int]) -> list[int]:
        if self.repeat is None:
            return order
        window, times = self.repeat
        return [i for k in range(0, len(order), window) for _ in range(times) for i in order[k : k + window]]

    def __iter__(self):
        return iter(self._repeated(self.order())[self.start :])

    def __len__(self) -> int:
        return self.epoch_size() * (self.repeat[1] if self.repeat else 1) - self.start
