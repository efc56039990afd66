"""The training and eval data of a stage: data loaders whose order depends only on (seed, epoch), and the
data report of what was kept, shrunk or left out."""

from __future__ import annotations

import json
import os
from functools import partial

import torch
from torch.utils.data import DataLoader

from vlmtune.config.stages import Stage
from vlmtune.data.collate import collate
from vlmtune.data.dataset import VLMDataset
from vlmtune.data.sampler import EpochSampler
from vlmtune.tracking import echo


def loader_workers(setting: int | str, processes: int = 1) -> int:
    """``data.num_workers``: a number as given; ``auto`` is 0 without CUDA (on a CPU run the workers would compete
    with the training threads) and otherwise min(4, cores per process - 1)."""
    if setting != "auto":
        return int(setting)
    if not torch.cuda.is_available():
        return 0
    return max(0, min(4, len(os.sched_getaffinity(0)) // max(1, processes) - 1))


def make_loader(
    ds: VLMDataset,
    processor,
    batch_size: int,
    shuffle: bool,
    seed: int,
    workers: int,
    group_by_length: bool = False,
    packing: bool = False,
    pack_length: int | None = None,
) -> DataLoader:
    """A DataLoader with the padding collator; its order depends only on (seed, epoch) (see EpochSampler).
    With workers, batches are prepared ahead of the step (2 per worker) in pinned memory on a GPU machine.
    With ``packing`` each batch's samples come in packed-row order (see vlmtune.train.packing)."""
    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    video_token = getattr(processor, "video_token", None)
    fn = partial(
        collate,
        pad_id=pad_id,
        image_token_id=tok.convert_tokens_to_ids(processor.image_token),
        video_token_id=tok.convert_tokens_to_ids(video_token) if video_token else None,
        pack=packing,
        pack_length=pack_length,
    )
    sampler = EpochSampler(len(ds), seed, shuffle, ds.lengths() if group_by_length else None, batch_size)
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=fn,
        num_workers=workers,
        pin_memory=workers > 0 and torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
    )


def write_data_report(out, accelerator, stage: Stage, train_ds: VLMDataset, eval_ds: VLMDataset | None) -> None:
    """Prints how many samples each split kept and why others were changed or left out, and writes it as JSON
    into the run folder (``data_report[-STAGE].json``).

    Raises:
        ValueError: no training sample is left.
    """
    for name, ds in (("train", train_ds), ("eval", eval_ds)):
        if ds is not None:
            echo(f"{name} data: {len(ds)} samples")
            for line in ds.report.lines(stage.cfg.data.max_length):
                echo(f"  {line}")
    if accelerator.is_main_process:
        report = {"train": train_ds.report.to_dict(), "eval": eval_ds.report.to_dict() if eval_ds else None}
        name = f"data_report-{stage.name}.json" if stage.named else "data_report.json"
        (out / name).write_text(json.dumps(report, indent=1), encoding="utf-8")
    if len(train_ds) == 0:
        raise ValueError("no training sample fits data.max_length; raise it or set data.too_long: downscale")
