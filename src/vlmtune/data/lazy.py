"""A training split read on demand (``data.load: lazy``): a million-record JSONL starts training in seconds.

``LazyDataset`` keeps the byte-offset index of each JSONL file of the split (``vlmtune.data.index``: 8 bytes a
record) and a byte a record saying whether it was read. Item ``i`` reads record ``i`` at its offset, parses it
(``sharegpt.parse_record``), runs the checks an upfront split runs before training (``dataset.check_sample``: images
opened and decoded, control tokens, length against ``data.max_length``) and encodes it as ``VLMDataset`` does. So a
problem is found when its sample is first read, not before training, and duplicates are not looked for (``vlmtune
data check`` finds both, streamed).

A sample found bad, or over ``data.max_length`` and dropped, becomes a ``Note`` in place of its inputs; the collate
step (``LeaveOut``) leaves it out of the batch and passes every sample's note on under ``NOTES``, and the training
loop hands them to ``LazyDataset.take`` in the main process (data-loader workers hold copies of the dataset): each
sample's outcome is counted once in ``report``, and with ``data.on_bad_sample: error`` a bad one stops the run,
naming its ``file:line``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from vlmtune.config.data import DataConfig, DataSource
from vlmtune.data.dataset import LengthReport, VLMDataset, check_sample
from vlmtune.data.formats import Format
from vlmtune.data.hf import is_hf_dataset
from vlmtune.data.index import LineIndex, load_index, record_count
from vlmtune.data.sharegpt import DataError, Problem, is_json_list, parse_record
from vlmtune.data.sources import entries, resolve
from vlmtune.tracking import echo as rank0_echo

LAZY_FROM = 50_000
"""``data.load: auto`` reads a training split lazily when its JSONL sources hold more records than this."""
NOTE = "read_note"  # item key: the sample's Note (taken off by LeaveOut)
NOTES = "read_notes"  # batch key: the Notes of every sample the batch was made from, left out or not


@dataclass(frozen=True)
class Note:
    """What reading one sample found: its outcome ("kept", "downscaled", "truncated"; "dropped" and "bad" samples
    are left out of their batch) and its problems."""

    index: int
    where: str
    outcome: str
    problems: tuple[Problem, ...] = ()


class LazyReport:
    """What reading a lazy split has found so far, each sample counted once (``LengthReport`` for the samples read)."""

    def __init__(self, records: int):
        self.records = records
        self.read = 0
        self.found = LengthReport()

    def add(self, note: Note) -> None:
        self.read += 1
        if note.outcome == "bad":
            self.found.skipped += [p for p in note.problems if p.is_error]
            return
        self.found.kept += int(note.outcome != "dropped")
        lists = {"dropped": self.found.dropped, "downscaled": self.found.downscaled, "truncated": self.found.truncated}
        lists.get(note.outcome, []).append(note.where)

    @property
    def dropped(self) -> list[str]:
        return self.found.dropped

    def skipped_samples(self) -> list[str]:
        return self.found.skipped_samples()

    def left_out(self) -> int:
        """Samples read and left out (bad or dropped)."""
        return self.read - self.found.kept

    def lines(self, max_length: int) -> list[str]:
        head = (
            f"read lazily (data.load): each sample is read and checked when a batch first needs it; "
            f"{self.read} of {self.records} read so far, {self.found.kept} kept"
        )
        return [head, *self.found.lines(max_length)]

    def to_dict(self) -> dict:
        return {"load": "lazy", "records": self.records, "read": self.read, **self.found.to_dict()}

    @classmethod
    def merged(cls, reports: list[LazyReport], read: int) -> LazyReport:
        """The reports of several processes as one (``read``: the samples any of them read); each place once."""
        out = cls(reports[0].records)
        out.read = read
        places: set[str] = set()
        for r in reports:
            for name in ("dropped", "downscaled", "truncated"):
                new = [w for w in getattr(r.found, name) if w not in places]
                places.update(new)
                getattr(out.found, name).extend(new)
            out.found.skipped += [p for p in r.found.skipped if p.where not in places]
            places.update(p.where for p in r.found.skipped)
        out.found.kept = read - len(out.found.dropped) - len(out.found.skipped_samples())
        return out


def parse_line(raw: bytes, where: str, first: bool) -> object | Problem:
    """A JSONL line's object, or its problem, as ``sharegpt.iter_records`` reports it."""
    try:
        text = raw.decode("utf-8-sig" if first else "utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        return Problem(where, "not UTF-8", f"not UTF-8 text ({e.reason} at byte {e.start} of the line)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return Problem(where, "bad JSON", f"bad JSON line: {e.msg} at column {e.colno}")


def lazy_size(specs: str | list[str | DataSource], data: DataConfig, split: str) -> tuple[int, str | None]:
    """Records of a split's sources, counted cheaply (a saved index, else the lines; ``max_samples`` applied), and
    why the split cannot be read lazily (a source that is not a JSONL file), or None.

    Raises:
        DataError: a source that does not resolve (a missing file, an unknown name).
    """
    total = 0
    for entry in entries(specs):
        source = resolve(entry, data, split)
        n = 0
        for path in source.files:
            if is_hf_dataset(path) or is_json_list(path):
                kind = "a Hugging Face dataset" if is_hf_dataset(path) else "a JSON list, read whole"
                return total, f"source '{source.spec}' is {kind} ({path}); only JSONL files are read lazily"
            n += record_count(path) or 0
        total += min(n, source.max_samples or n)
    return total, None


@dataclass(frozen=True)
class _File:
    index: LineIndex
    count: int  # records taken from it (a source's max_samples counts across its files)
    base: Path  # relative media paths start here
    fmt: Format
    source: int  # which entry of the split's sources


def _split_files(specs, data: DataConfig, split: str, echo: Callable[[str], None]) -> list[_File]:
    """Every JSONL file of the split, indexed, in order, with how many of its records are taken.

    Raises:
        DataError: every source that does not resolve or holds no record (as an upfront split reports them).
    """
    problems: list[Problem] = []
    files: list[_File] = []
    for k, entry in enumerate(entries(specs)):
        try:
            source = resolve(entry, data, split)
        except DataError as e:
            problems += e.found
            continue
        n, limit = 0, source.max_samples
        for path in source.files:
            if is_hf_dataset(path) or is_json_list(path):
                raise ValueError(f"{path}: not a JSONL file; only JSONL files are read lazily")
            index = load_index(path, echo)
            take = len(index) if limit is None else min(len(index), limit - n)
            files.append(_File(index, take, source.media_base or path.parent, source.fmt, k))
            n += take
            if limit is not None and n >= limit:
                break
        if n == 0:
            problems.append(Problem(source.spec, "no samples", f"'{source.spec}' holds no samples", whole_file=True))
    if problems:
        raise DataError(problems)
    return files


class LazyDataset(Dataset):
    """A JSONL training split read, checked and encoded one sample at a time, when a batch needs it; the same
    interface as ``VLMDataset`` for the training loop (no ``lengths``, no vision cache: both need every sample first).
    """

    def __init__(
        self,
        specs: str | list[str | DataSource],
        processor,
        data: DataConfig,
        split: str = "train",
        echo: Callable[[str], None] = rank0_echo,
    ):
        """Indexes every file of the split (a saved index is reused while the file is unchanged).

        Raises:
            DataError: a source that does not resolve or holds no record.
        """
        self.processor = processor
        self.data = data
        self.split = split
        self.epoch = 0
        self.files = _split_files(specs, data, split, echo)
        self.starts = np.cumsum([0, *(f.count for f in self.files)], dtype=np.int64)
        self.encoder = VLMDataset([], processor, data, split)  # encodes (and augments) a checked sample
        self.seen = np.zeros(len(self), dtype=bool)  # main process: which samples' notes were taken
        self.report = LazyReport(len(self))
        self.said = 0  # left-out samples named so far (vlmtune.train.reading)
        self.empty_batches = 0  # batches in a row with no sample left, on some process

    def __len__(self) -> int:
        return int(self.starts[-1])

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch that augmentation draws depend on (call at the start of every epoch)."""
        self.epoch = epoch
        self.encoder.set_epoch(epoch)

    def lengths(self) -> list[int]:
        raise ValueError(
            "a lazily read split knows a sample's length only once it is read: train.group_by_length needs "
            "data.load: upfront"
        )

    def source_ids(self) -> list[int]:
        """The source (index into the split's list of sources) of each item, for weighted mixing."""
        return np.repeat([f.source for f in self.files], [f.count for f in self.files]).tolist()

    def place(self, i: int) -> tuple[_File, int, str]:
        """Item ``i``'s file, its record number in that file and its place ``file:line``."""
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        file, local = self.files[k], i - int(self.starts[k])
        return file, local, f"{file.index.path}:{file.index.line(local)}"

    def __getitem__(self, i: int) -> dict | Note:
        """Item ``i``'s model inputs with its ``Note`` under ``NOTE``, or, when it is bad or dropped, the Note alone."""
        file, local, where = self.place(i)
        obj = parse_line(file.index.read(local), where, first=file.index.line(local) == 1)
        if isinstance(obj, Problem):
            return Note(i, where, "bad", (obj,))
        sample, problems = parse_record(obj, where, file.base, file.fmt)
        if sample is None:
            return Note(i, where, "bad", tuple(problems))
        sample.source = file.source
        checked = check_sample(sample, self.processor, self.data)
        problems = tuple(checked.problems)
        if any(p.is_error for p in problems):
            return Note(i, where, "bad", problems)
        if checked.item is None:
            return Note(i, where, "dropped", problems)
        out = self.encoder.encode(checked.item, i)
        out[NOTE] = Note(i, where, checked.outcome, problems)
        return out

    def take(self, notes: list[Note]) -> tuple[list[Note], list[Problem]]:
        """Counts what a batch's notes say (each sample once: at its first read). Returns the notes of samples read
        for the first time, and the errors that stop the run (bad samples, with ``data.on_bad_sample: error``)."""
        new, fatal = [], []
        for note in notes:
            if self.seen[note.index]:
                continue
            self.seen[note.index] = True
            self.report.add(note)
            new.append(note)
            if note.outcome == "bad" and self.data.on_bad_sample == "error":
                fatal += [p for p in note.problems if p.is_error]
        return new, fatal


class LeaveOut:
    """The collate function of a lazy split: samples found bad or dropped when read are left out of the batch (a
    batch of only such samples holds no ``input_ids``), and every sample's Note travels under ``NOTES``."""

    def __init__(self, collate: Callable[[list[dict]], dict]):
        self.collate = collate

    def __call__(self, items: list[dict | Note]) -> dict:
        notes = [x if isinstance(x, Note) else x.pop(NOTE) for x in items]
        kept = [x for x in items if not isinstance(x, Note)]
        batch = self.collate(kept) if kept else {}
        batch[NOTES] = notes
        return batch
