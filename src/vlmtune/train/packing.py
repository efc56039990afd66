"""Packing: the samples of a batch laid end to end in fewer rows, so the language model skips most padding.

A packed batch holds the same samples as the padded one, so the loss is the same mean over the same answer
tokens; only the layout changes. ``plan_rows`` puts whole samples into rows no longer than the batch's longest
sample (first-fit decreasing), so a row never costs more attention than a padded row did; the collator orders
the samples row by row (each sample's images travel with it, so the images stay in token order) and ``pack``
lays the rows out just before the forward.

Positions restart at every sample and no attention mask is passed: transformers then builds a block-diagonal
causal mask from the restarts (sdpa, eager; ``masking_utils.find_packed_sequence_indices``) or gives the segment
bounds to flash-attention's variable-length kernel, so no token sees another sample. M-RoPE models (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL) take each sample's own 3-D positions from the model's ``get_rope_index`` with the text
positions in front: the ``[4, rows, length]`` layout their text models read as packed input.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from itertools import accumulate

import torch

from vlmtune.data.collate import IGNORE
from vlmtune.data.rows import PACK_ROWS

TOKEN_KEYS = ("input_ids", "labels", "mm_token_type_ids")
"""The per-token tensors of an M-RoPE family's batch (besides ``attention_mask``, which packing drops)."""


def rope_index_of(model) -> Callable[[dict], torch.Tensor] | None:
    """The multimodal model's M-RoPE position function as ``batch -> [3, batch, length]`` positions, or None
    when the model has none (packing is then not supported). ``model`` is the transformers model under peft."""
    inner = getattr(model, "model", model)
    method = getattr(inner, "get_rope_index", None)
    if method is None:
        return None
    accepted = set(inspect.signature(method).parameters)

    def positions(batch: dict) -> torch.Tensor:
        return method(**{k: v for k, v in batch.items() if k in accepted})[0]

    return positions


def pack(batch: dict, rope_index: Callable[[dict], torch.Tensor]) -> dict:
    """The padded, row-ordered batch as packed rows: per-token tensors end to end, ``position_ids`` of shape
    [4, rows, length] (text positions, then the model's 3-D ones) restarting at each sample, no attention mask.

    The first token of each sample gets no label, so no sample is trained to predict the next one's first token
    (a sample's first token is never a target in the padded layout either).
    """
    mask = batch["attention_mask"]
    lengths = mask.sum(1).tolist()
    counts = batch[PACK_ROWS].tolist()
    extra = sorted(
        k
        for k, v in batch.items()
        if torch.is_tensor(v) and k not in TOKEN_KEYS and k != "attention_mask" and v.shape == mask.shape
    )
    if extra:
        raise ValueError(f"packing does not know how to lay out the per-token inputs {extra}")
    rope = rope_index({k: v for k, v in batch.items() if k not in ("labels", PACK_ROWS)})
    starts = list(accumulate(counts, initial=0))[:-1]
    width = max(sum(lengths[s : s + c]) for s, c in zip(starts, counts))
    keys = [k for k in TOKEN_KEYS if k in batch]
    out = {k: v for k, v in batch.items() if k not in (*keys, "attention_mask", PACK_ROWS)}
    rows = {k: batch[k].new_zeros((len(counts), width)) for k in keys}
    rows["labels"].fill_(IGNORE)
    position_ids = rope.new_zeros((4, len(counts), width))
    for r, (start, count) in enumerate(zip(starts, counts)):
        offset = 0
        for i in range(start, start + count):
            n = lengths[i]
            for k in keys:
                rows[k][r, offset : offset + n] = batch[k][i, :n]
            position_ids[0, r, offset : offset + n] = torch.arange(n, device=rope.device)
            position_ids[1:, r, offset : offset + n] = rope[:, i, :n]
            rows["labels"][r, offset] = IGNORE
            offset += n
        # The padding after the last sample is a segment of its own (positions restart), labelled nowhere.
        position_ids[:, r, offset:] = torch.arange(width - offset, device=rope.device)
    out.update(rows, position_ids=position_ids, use_cache=False)
    return out
