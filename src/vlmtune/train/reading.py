"""How a stage's training split is read (``data.load``): upfront, every sample checked before the first step, or
lazily, each sample read, checked and encoded when a batch needs it (``vlmtune.data.lazy``); and what a lazily read
split found while it trained, counted in the main process, said as it is found and in the data report."""

from __future__ import annotations

import torch

from vlmtune.config.data import DataConfig
from vlmtune.config.errors import ConfigError
from vlmtune.data.dataset import LengthReport
from vlmtune.data.lazy import LAZY_FROM, NOTES, LazyDataset, LazyReport, lazy_size
from vlmtune.data.sharegpt import DataError
from vlmtune.tracking import echo

SAID = 10  # left-out samples named as they are found, per split; the data report names every one


def read_lazily(data: DataConfig, group_by_length: bool) -> tuple[bool, str | None]:
    """Whether a stage's training split is read lazily, and a line saying why where ``auto`` chose.

    Raises:
        ConfigError: ``data.load: lazy`` with a source that is not a JSONL file.
    """
    if data.load == "upfront":
        return False, None
    try:
        records, refusal = lazy_size(data.train, data, "train")
    except DataError:  # a missing source: reported with every other problem by the dataset that reads the split
        return data.load == "lazy", None
    if data.load == "lazy":
        if refusal:
            raise ConfigError(
                [
                    f"'data.load' is lazy, but {refusal}: convert it to JSONL (one object per line) or set "
                    "data.load: upfront (or auto)"
                ],
                "data",
            )
        return True, None
    if records <= LAZY_FROM:
        return False, None
    why = f"{records} records (over {LAZY_FROM}; data.load: auto)"
    if refusal:
        return False, f"{why}, but {refusal}: read upfront, every sample checked before training"
    if group_by_length:
        return False, (
            f"{why}, but train.group_by_length needs every sample's length before training: read upfront, every "
            "sample checked first (set train.group_by_length: false to start at once)"
        )
    return True, f"{why}: read lazily, each sample checked when first read"


def take_notes(batch: dict, ds, accelerator) -> bool:
    """Counts what reading a lazily read batch's samples found (each sample once) and names the first ones left
    out. Returns False when the batch has no sample to train on, on this process or another (every process then
    skips it); True for every batch of an upfront split.

    Raises:
        DataError: a bad sample with ``data.on_bad_sample: error`` (on any process), naming its ``file:line``; or no
            sample left to train on (every one read was left out).
    """
    notes = batch.pop(NOTES, None)
    if notes is None:
        return True
    new, fatal = ds.take(notes)
    left_out = [n for n in new if n.outcome in ("bad", "dropped")] if not fatal else []  # fatal: said as an error
    for note in left_out:
        if ds.said < SAID:
            ds.said += 1
            what = "skipped (data.on_bad_sample: skip)" if note.outcome == "bad" else "dropped (data.too_long)"
            echo(f"  {what} {'; '.join(str(p) for p in note.problems)}")
            if ds.said == SAID:
                echo("  further samples left out are counted and named in the data report at the stage's end")
    empty = "input_ids" not in batch
    stop = bool(fatal)
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(torch.tensor([float(stop), float(empty)], device=accelerator.device), "sum")
        stop, empty = bool(flags[0] > 0), bool(flags[1] > 0)
    if stop:
        echo(
            "a bad sample was found when read (data.load: lazy, data.on_bad_sample: error): fix it and run again "
            "with --resume to continue from the last checkpoint, or leave bad samples out (data.on_bad_sample: skip; "
            "resuming with a changed data setting needs --force-resume)"
        )
        raise DataError(fatal or ["another process read a bad sample (data.on_bad_sample: error); its output names it"])
    ds.empty_batches = ds.empty_batches + 1 if empty else 0
    if (ds.report.read == len(ds) and ds.report.found.kept == 0) or ds.empty_batches > 2 * len(ds):
        kinds = ", ".join(f"{k} {n}" for k, n in ds.report.found.skipped_by_kind().items())
        raise DataError(
            [
                f"no training sample left: every sample read was left out ({ds.report.left_out()} of "
                f"{ds.report.read} read; bad: {kinds or 'none'}; over data.max_length and dropped: "
                f"{len(ds.report.dropped)}); `vlmtune data check` lists each problem"
            ]
        )
    return not empty


def split_report(ds, accelerator) -> LazyReport | LengthReport:
    """A split's report; a lazily read one gathered from every process (call it on every process)."""
    if not isinstance(ds, LazyDataset) or accelerator.num_processes == 1:
        return ds.report
    from accelerate.utils import gather_object

    seen = torch.from_numpy(ds.seen).to(accelerator.device, torch.int32)
    read = int((accelerator.reduce(seen, "sum") > 0).sum())
    return LazyReport.merged(gather_object([ds.report]), read)


def vision_cache_applies(ds) -> bool:
    """The vision cache computes every image's features before training: not for a lazily read split (said)."""
    if isinstance(ds, LazyDataset):
        echo(
            "vision cache: not used: the training split is read lazily (data.load), so its images are known only "
            "as they are read; the frozen vision tower runs at every step"
        )
        return False
    if not hasattr(ds, "use_vision_cache"):
        echo(
            "vision cache: not used in this stage: GRPO samples its completions with generate, which encodes the "
            "images itself; each sample's images are encoded once for its whole group"
        )
        return False
    return True
