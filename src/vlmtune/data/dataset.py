"""Data sources -> a training dataset whose every sample fits max_length without cutting an image.

Sources: a JSON/JSONL file, a name in ``dataset_dir/dataset_info.json`` (LLaMA-Factory's registry of
datasets), or ``builtin:shapes:TASK`` (generated on demand). Over-long samples are dropped, downscaled or
text-truncated as configured; each is counted and the first few are named in the report.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from vlmtune.config import BUILTIN_DATA_PREFIX, DataConfig
from vlmtune.data.collate import IGNORE, encode_text, image_token_counts, load_images, process_images, to_chat
from vlmtune.data.sharegpt import DataError, Format, Sample, read_samples


def cache_dir() -> Path:
    """Where generated data and the builtin model are kept (``VLMTUNE_CACHE``, else ~/.cache/vlmtune)."""
    return Path(os.environ.get("VLMTUNE_CACHE", Path.home() / ".cache" / "vlmtune"))


def resolve_source(spec: str, data: DataConfig, split: str) -> tuple[Path, Format]:
    """A data spec -> (file, its column format).

    Raises:
        DataError: names the spec and what would be valid.
    """
    if spec.startswith(BUILTIN_DATA_PREFIX):
        from vlmtune import shapes

        task = spec[len(BUILTIN_DATA_PREFIX):]
        if task not in shapes.TASKS:
            raise DataError([f"'{spec}': unknown builtin task '{task}'; valid: {', '.join(BUILTIN_DATA_PREFIX + t for t in shapes.TASKS)}"])
        n = data.builtin_train_samples if split == "train" else data.builtin_eval_samples
        seed = 0 if split == "train" else 1  # disjoint draws for train and eval
        out = cache_dir() / "shapes" / f"{task}-{split}-{n}-s{seed}"
        path = out / f"{split}.jsonl"
        if not path.is_file():
            path = shapes.generate_shapes(out, n, task, seed=seed, name=split)
        return path, Format()
    p = Path(spec)
    if p.is_file():
        return p, Format()
    if data.dataset_dir:
        info_path = Path(data.dataset_dir) / "dataset_info.json"
        if not info_path.is_file():
            raise DataError([f"dataset '{spec}': not a file, and {info_path} does not exist"])
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if spec not in info:
            raise DataError([f"dataset '{spec}': not a file and not a name in {info_path} (names: {', '.join(sorted(info))})"])
        entry = info[spec]
        cols, tags = entry.get("columns", {}), entry.get("tags", {})
        fmt = Format(messages=cols.get("messages"), images=cols.get("images", "images"), system=cols.get("system"),
                     role_tag=tags.get("role_tag"), content_tag=tags.get("content_tag"), user_tag=tags.get("user_tag"),
                     assistant_tag=tags.get("assistant_tag"), system_tag=tags.get("system_tag"))
        return Path(data.dataset_dir) / entry["file_name"], fmt
    raise DataError([f"data file '{spec}' does not exist (give a JSON/JSONL path, a dataset_info.json name with data.dataset_dir, or {BUILTIN_DATA_PREFIX}TASK)"])


@dataclass
class LengthReport:
    """What the length limit did."""

    kept: int = 0
    dropped: list[str] = field(default_factory=list)
    downscaled: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)

    def lines(self, max_length: int) -> list[str]:
        out = []
        for what, items in (("dropped", self.dropped), ("downscaled", self.downscaled), ("text-truncated", self.truncated)):
            if items:
                first = ", ".join(items[:5]) + (" ..." if len(items) > 5 else "")
                out.append(f"{len(items)} sample(s) over max_length={max_length} {what} (image tokens are never cut): {first}")
        return out


@dataclass
class _Item:
    sample: Sample
    max_pixels: int | None
    truncate_at: int | None
    length: int


class VLMDataset(Dataset):
    """Samples that fit; ``__getitem__`` decodes images and returns token ids, labels and pixel inputs."""

    def __init__(self, samples: list[Sample], processor, data: DataConfig):
        self.processor = processor
        self.data = data
        self.report = LengthReport()
        self.items: list[_Item] = []
        for sample in samples:
            item = self._fit(sample)
            if item is not None:
                self.items.append(item)
        self.report.kept = len(self.items)

    def _length(self, sample: Sample, max_pixels: int | None):
        sizes = []
        for p in sample.images:
            try:
                with Image.open(p) as im:
                    sizes.append((im.height, im.width))
            except Exception as e:
                raise DataError([f"{sample.where}: image '{p}' cannot be opened: {e}"]) from e
        counts = image_token_counts(self.processor, sizes, self.data.image_min_pixels, max_pixels)
        return encode_text(self.processor, to_chat(sample), counts)

    def _fit(self, sample: Sample) -> _Item | None:
        limit, policy = self.data.max_length, self.data.too_long
        max_pixels = self.data.image_max_pixels or self.processor.image_processor.size.get("longest_edge")
        enc = self._length(sample, max_pixels)
        if len(enc.input_ids) <= limit:
            return _Item(sample, self.data.image_max_pixels, None, len(enc.input_ids))
        if policy == "downscale" and sample.images:
            floor = self.data.image_min_pixels or self.processor.image_processor.size.get("shortest_edge") or 1
            while len(enc.input_ids) > limit and max_pixels // 2 >= floor:
                max_pixels //= 2
                enc = self._length(sample, max_pixels)
            if len(enc.input_ids) <= limit:
                self.report.downscaled.append(sample.where)
                return _Item(sample, max_pixels, None, len(enc.input_ids))
        if policy == "truncate":
            image_end = max((e for _, e in enc.image_spans), default=0)
            if image_end <= limit and any(l != IGNORE for l in enc.labels[:limit]):
                self.report.truncated.append(sample.where)
                return _Item(sample, self.data.image_max_pixels, limit, limit)
        self.report.dropped.append(sample.where)
        return None

    def __len__(self) -> int:
        return len(self.items)

    def lengths(self) -> list[int]:
        return [it.length for it in self.items]

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        images = load_images(item.sample)
        pixels = process_images(self.processor, images, self.data.image_min_pixels, item.max_pixels)
        merge = getattr(self.processor.image_processor, "merge_size", 1)
        counts = [int(g.prod()) // merge**2 for g in pixels["image_grid_thw"]] if images else []
        enc = encode_text(self.processor, to_chat(item.sample), counts)
        ids, labels = enc.input_ids, enc.labels
        if item.truncate_at is not None:
            ids, labels = ids[: item.truncate_at], labels[: item.truncate_at]
        if len(ids) != item.length:
            raise RuntimeError(f"{item.sample.where}: {len(ids)} tokens after decoding its images, {item.length} predicted")
        return {"input_ids": ids, "labels": labels, **pixels}


def build_dataset(specs: str | list[str], data: DataConfig, processor, split: str) -> VLMDataset:
    """Reads every source of a split and applies the length limit."""
    samples: list[Sample] = []
    problems: list[str] = []
    for spec in [specs] if isinstance(specs, str) else specs:
        try:
            path, fmt = resolve_source(spec, data, split)
            samples += read_samples(path, fmt)
        except DataError as e:
            problems += e.problems
    if problems:
        raise DataError(problems)
    return VLMDataset(samples, processor, data)
