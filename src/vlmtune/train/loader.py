"""The training and eval data of a stage: data loaders whose order depends only on (seed, epoch), and the
data report of what was kept, shrunk or left out."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from vlmtune.config.stages import Stage
from vlmtune.data.dataset import VLMDataset, build_dataset
from vlmtune.data.lazy import LazyDataset, LeaveOut
from vlmtune.data.sampler import EpochSampler, Mix
from vlmtune.data.sharegpt import DataError
from vlmtune.data.sources import entries
from vlmtune.tracking import echo
from vlmtune.train.objectives import collate_for, training_split
from vlmtune.train.reading import read_lazily, split_report


def loader_workers(setting: int | str, processes: int = 1) -> int:
    """``data.num_workers``: a number as given; ``auto`` is 0 without CUDA (on a CPU run the workers would compete
    with the training threads) and otherwise min(4, cores per process - 1)."""
    if setting != "auto":
        return int(setting)
    if not torch.cuda.is_available():
        return 0
    return max(0, min(4, len(os.sched_getaffinity(0)) // max(1, processes) - 1))


def make_loader(
    ds: VLMDataset | LazyDataset,
    processor,
    batch_size: int,
    shuffle: bool,
    seed: int,
    workers: int,
    group_by_length: bool = False,
    packing: bool = False,
    pack_length: int | None = None,
    mix: Mix | None = None,
    method: str = "sft",
    share: bool = False,
    repeat: tuple[int, int] | None = None,
) -> DataLoader:
    """A DataLoader with the method's collator (``objectives.collate_for``: padded rows for SFT, pairs for DPO,
    ...; ``share``: the images travel once per sample); its order depends only on (seed, epoch) (see
    EpochSampler; ``repeat``: each optimizer step's samples come that many times in a row).
    With workers, batches are prepared ahead of the step (2 per worker) in pinned memory on a GPU machine.
    With ``packing`` each batch's samples come in packed-row order (see vlmtune.train.packing). A lazily read
    split's batches leave out the samples found bad or too long when read (``vlmtune.data.lazy.LeaveOut``)."""
    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    video_token = getattr(processor, "video_token", None)
    args = {
        "pad_id": pad_id,
        "image_token_id": tok.convert_tokens_to_ids(processor.image_token),
        "video_token_id": tok.convert_tokens_to_ids(video_token) if video_token else None,
        "pack": packing,
        "pack_length": pack_length,
    }
    fn = collate_for(method, ds.split if hasattr(ds, "split") else "train", share, args)
    lengths = ds.lengths() if group_by_length else None
    sampler = EpochSampler(len(ds), seed, shuffle, lengths, batch_size, mix, repeat)
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=LeaveOut(fn) if isinstance(ds, LazyDataset) else fn,
        num_workers=workers,
        pin_memory=workers > 0 and torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
    )


@dataclass
class StageData:
    """A stage's datasets: every sample checked (and its length measured) before the run starts, or, for a
    training split read lazily (``data.load``), each sample checked when it is read."""

    train: VLMDataset | LazyDataset
    eval: VLMDataset | None


def load_stage_data(stages: list[Stage], processor) -> list[StageData]:
    """Every stage's data, built and checked before anything is trained or written (a missing file or a bad
    sample in a later stage's data stops the run before the first stage trains). Stages with the same data
    settings share their datasets. A training split read lazily (``data.load``, see ``reading.read_lazily``) has
    only its files indexed here; its samples are checked as they are read.

    Raises:
        DataError: bad samples (``data.on_bad_sample: error``) or unreadable sources, named by place.
            A stage with no training sample left is one, saying why its samples were left out.
    """
    built: dict[str, StageData] = {}
    out = []
    for stage in stages:
        data, method = stage.cfg.data, stage.cfg.train.method
        lazy, why = read_lazily(data, stage.cfg.train.group_by_length) if method == "sft" else (False, None)
        key = json.dumps([data.model_dump(mode="json"), lazy, method], sort_keys=True)
        if key not in built:
            where = f"stage '{stage.name}' " if stage.named else ""
            if why:
                echo(f"{where}train data: {why}")
            if lazy:
                train_ds = LazyDataset(data.train, processor, data, "train")
            else:
                train_ds = training_split(build_dataset(data.train, data, processor, "train", method), method)
            eval_ds = build_dataset(data.eval, data, processor, "eval", method) if data.eval else None
            for name, ds in (("train", train_ds), ("eval", eval_ds)):
                if ds is not None:
                    echo(f"{where}{name} data: {len(ds)} samples")
                    for line in ds.report.lines(data.max_length):
                        echo(f"  {line}")
            if len(train_ds) == 0:
                raise DataError([f"{where}no training sample left: {no_sample_reason(train_ds, data)}"])
            built[key] = StageData(train_ds, eval_ds)
        out.append(built[key])
    return out


def train_mix(ds, data) -> Mix | None:
    """The weighted mix of ``data.train``'s sources, or None when no source has a weight.

    Raises:
        DataError: a weighted source has no sample left to draw from.
    """
    sources = entries(data.train)
    if not any(s.weight is not None for s in sources):
        return None
    mix = Mix(tuple(ds.source_ids()), tuple(s.weight for s in sources), data.mix_epoch)
    empty = [s.path for s, n in zip(sources, mix.counts()) if n == 0]
    if empty:
        raise DataError(
            [f"weighted source '{p}' has no training sample left, so its weight cannot be drawn" for p in empty]
        )
    return mix


def realised_mix(sampler: EpochSampler, data) -> dict[str, dict] | None:
    """This epoch's draw per weighted source (by its path): samples drawn, distinct items, items held, weight."""
    realised = sampler.realised_mix()
    if realised is None:
        return None
    return {s.path: {**r, "weight": s.weight} for s, r in zip(entries(data.train), realised)}


def no_sample_reason(ds: VLMDataset, data) -> str:
    """Why a dataset is empty, from its report: samples skipped as bad, too long for data.max_length, or none."""
    skipped, dropped = len(ds.report.skipped_samples()), len(ds.report.dropped)
    parts = []
    if skipped:
        parts.append(
            f"{skipped} sample(s) skipped as bad (data.on_bad_sample: skip; `vlmtune data check` lists each problem)"
        )
    if dropped:
        parts.append(
            f"{dropped} sample(s) over data.max_length={data.max_length} (raise it or set data.too_long: downscale)"
        )
    return "; ".join(parts) or "the data holds no sample"


def write_data_report(out, accelerator, stage: Stage, data: StageData, final: bool = False) -> None:
    """The stage's data report as JSON in the run folder (``data_report[-STAGE].json``): what was kept, shrunk or
    left out, and why. A lazily read split's is written again at the stage's end (``final``: also said), with what
    reading found (call it on every process: the processes' reports are gathered)."""
    train = split_report(data.train, accelerator)
    if final and isinstance(data.train, LazyDataset):
        echo(f"stage '{stage.name}' train data:")
        for line in train.lines(stage.cfg.data.max_length):
            echo(f"  {line}")
    if accelerator.is_main_process:
        report = {"train": train.to_dict(), "eval": data.eval.report.to_dict() if data.eval else None}
        name = f"data_report-{stage.name}.json" if stage.named else "data_report.json"
        (out / name).write_text(json.dumps(report, indent=1), encoding="utf-8")
