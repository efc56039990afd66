"""Log-probabilities of answer tokens per row, and rows that share their samples' image encodings.

The preference and RL methods score several answers to one prompt (a DPO pair's two, a KTO batch's matched and
mismatched ones, GRPO's group of sampled completions). Their rows show the same images, so the vision tower and
projector should run once per sample, not once per row: for the Qwen-VL families (whose language model takes the
projector's output directly, ``ArchSpec.vision_cache``) a forward pre-hook on the multimodal model encodes each
sample's images once and hands every row its copy through transformers' ``mm_encoder_outputs``; gradients from
every row add up in the one encoding. Other families get their pixel inputs once per row from the collator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmtune.data.collate import IGNORE
from vlmtune.data.pairs import IMAGES_PER_SAMPLE, ROW_SOURCE, VIDEOS_PER_SAMPLE
from vlmtune.train.loss import label_positions


def _by_sample(per_item: tuple[torch.Tensor, ...], counts: list[int]) -> list[list[torch.Tensor]]:
    out, start = [], 0
    for n in counts:
        out.append(list(per_item[start : start + n]))
        start += n
    return out


def _grids_by_sample(grid: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    return list(torch.split(grid, counts)) if len(counts) else []


def _expand(outputs, grid: torch.Tensor, counts: list[int], source: list[int]):
    """Per-item outputs and grid rows of the unique samples, repeated in row order."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    per_sample = _by_sample(tuple(outputs.pooler_output), counts)
    grids = _grids_by_sample(grid, counts)
    rows = tuple(e for s in source for e in per_sample[s])
    rows_grid = torch.cat([grids[s] for s in source]) if rows else grid[:0]
    return BaseModelOutputWithPooling(pooler_output=rows), rows_grid


def share_vision_rows(inner: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """A forward pre-hook on a Qwen-VL multimodal model (``model.model``): with ``row_source`` in the call, each
    sample's images and videos are encoded once (``get_image_features`` / ``get_video_features``, or taken from
    the ``mm_encoder_outputs`` the vision cache's hook made from cached features) and repeated for every row that
    shows them. Registered after the vision cache's hook, so it runs after it. Returns the handle."""

    def hook(module, args, kwargs):
        source = kwargs.pop(ROW_SOURCE, None)
        images = kwargs.pop(IMAGES_PER_SAMPLE, None)
        videos = kwargs.pop(VIDEOS_PER_SAMPLE, None)
        if source is None:
            return args, kwargs
        source = source.tolist()
        outputs = dict(kwargs.get("mm_encoder_outputs") or {})
        media = (
            ("image", "pixel_values", "image_grid_thw", images, module.get_image_features),
            ("video", "pixel_values_videos", "video_grid_thw", videos, module.get_video_features),
        )
        for kind, pixel_key, grid_key, counts, encode in media:
            pixels = kwargs.pop(pixel_key, None)
            if kind not in outputs and pixels is not None:
                outputs[kind] = encode(pixels, kwargs[grid_key], return_dict=True)
            if kind in outputs:
                outputs[kind], kwargs[grid_key] = _expand(outputs[kind], kwargs[grid_key], counts.tolist(), source)
        kwargs["mm_encoder_outputs"] = outputs or None
        return args, kwargs

    return inner.register_forward_pre_hook(hook, with_kwargs=True)


def token_logps(model, batch: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the labelled tokens, (rows, length - 1) with 0 elsewhere, and the mask of where they
    are. Logits are computed only where a label follows (``logits_to_keep``), in float32 for the softmax."""
    keep = label_positions(labels)
    logits = model(**batch, logits_to_keep=keep).logits
    logits = logits.reshape(-1, logits.shape[-1]).float()
    mask = labels[:, 1:] != IGNORE
    targets = labels[:, 1:][mask]
    picked = torch.gather(F.log_softmax(logits, dim=-1), 1, targets[:, None])[:, 0] if targets.numel() else None
    out = torch.zeros(mask.shape, dtype=torch.float32, device=labels.device)
    if picked is None:  # no labelled token: zeros that keep the graph
        return out + logits.sum() * 0.0, mask
    return out.masked_scatter(mask, picked), mask


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its labelled tokens, and how many there are."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logps, mask = token_logps(model, inputs, labels)
    return logps.sum(dim=1), mask.sum(dim=1).to(torch.float32)
