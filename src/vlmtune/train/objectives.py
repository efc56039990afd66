"""Methods as data: a stage's ``train.method`` chooses its objective, how its batches are collated and how its
training split is read.

| method | objective | a batch | the data |
|---|---|---|---|
| sft | ``sft.SFT``: cross-entropy on answers | padded rows | conversations (a pair's chosen answer) |
| dpo | ``dpo.DPO``: ``train.dpo.loss`` on pairs | chosen rows, then rejected rows | preference pairs |
| kto | ``kto.KTO``: labelled answers against z0 | samples, then mismatched rows | answers labelled desirable or not |
| grpo | ``grpo.GRPO``: clipped ratio on sampled groups | prompts (rows come from sampling) | conversations (the last answer is the reference) |
"""

from __future__ import annotations

from functools import partial

from vlmtune.data.collate import CACHED, collate
from vlmtune.data.pairs import SAMPLE_INDEX, collate_kto, collate_pairs
from vlmtune.tracking import echo
from vlmtune.train.dpo import DPO
from vlmtune.train.grpo import GRPO
from vlmtune.train.kto import KTO
from vlmtune.train.rollout import FEATURES, Prompts, collate_prompts
from vlmtune.train.sft import SFT

ROW_METHODS = ("dpo", "kto", "grpo")
"""Methods whose rows share their samples' image encodings (``vlmtune.train.logps.share_vision_rows``)."""


def make_objective(cfg, processor, rope_index=None):
    """The stage's objective, from its config (``cfg.train.method`` and the method's settings)."""
    t = cfg.train
    if t.method == "dpo":
        cache = t.dpo.cache_reference
        if cache and cfg.data.augment.enabled:
            echo(
                "dpo: reference log-probabilities are not cached (data.augment changes the images every epoch); "
                "the reference runs at every step"
            )
            cache = False
        return DPO(t.dpo, cache)
    if t.method == "kto":
        return KTO(t.kto)
    if t.method == "grpo":
        return GRPO(t.grpo, processor, t.seed, cfg.eval.batch_size)
    return SFT(t.label_only_logits, rope_index)


def collate_for(method: str, split: str, share: bool, collate_args: dict):
    """The collate function of a stage's loader: GRPO's training prompts, DPO pairs, KTO rows, or padded rows
    (SFT, and GRPO's eval split, read as conversations)."""
    if method == "grpo" and split == "train":
        return collate_prompts
    if method == "dpo":
        return partial(collate_pairs, share=share, **collate_args)
    if method == "kto":
        return partial(collate_kto, share=share, **collate_args)
    return partial(collate, **collate_args)


def training_split(ds, method: str):
    """The training dataset as the method reads it: GRPO's prompts, the checked samples otherwise."""
    return Prompts(ds) if method == "grpo" else ds


def batch_samples(batch: dict) -> int:
    """Samples in a batch (a DPO pair's two rows and a GRPO prompt's group are one sample)."""
    if SAMPLE_INDEX in batch:
        return len(batch[SAMPLE_INDEX])
    return batch["input_ids"].shape[0]


def batch_has_vision(batch: dict) -> bool:
    """Whether a batch holds images or videos (pixels or cached features), GRPO's prompts included."""
    keys = ("pixel_values", "pixel_values_videos", CACHED)
    if FEATURES in batch:
        return any(k in f for f in batch[FEATURES] for k in keys)
    return any(k in batch for k in keys)
