"""Where samples come from: a JSON/JSONL file, a name in ``dataset_dir/dataset_info.json`` (LLaMA-Factory's
registry of datasets), or ``builtin:shapes:TASK`` (generated on demand); every source read as ``Sample``s in order."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from vlmtune.config.schema import BUILTIN_DATA_PREFIX, DataConfig
from vlmtune.data import shapes
from vlmtune.data.sharegpt import DataError, DuplicateFinder, Format, Problem, Sample, read_file
from vlmtune.paths import cache_dir


def _source_error(message: str) -> DataError:
    return DataError([Problem("", "file missing", message, whole_file=True)])


def resolve_source(spec: str, data: DataConfig, split: str) -> tuple[Path, Format]:
    """A data spec -> (file, its column format).

    Raises:
        DataError: names the spec and what would be valid.
    """
    if spec.startswith(BUILTIN_DATA_PREFIX):
        task = spec[len(BUILTIN_DATA_PREFIX) :]
        if task not in shapes.TASKS:
            raise _source_error(
                f"'{spec}': unknown builtin task '{task}'; valid: {', '.join(BUILTIN_DATA_PREFIX + t for t in shapes.TASKS)}"
            )
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
            raise _source_error(f"dataset '{spec}': not a file, and {info_path} does not exist")
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise _source_error(f"{info_path} is not valid JSON ({e}); dataset '{spec}' cannot be looked up") from None
        if not isinstance(info, dict) or not isinstance(info.get(spec, {}), dict):
            raise _source_error(
                f'{info_path} must map dataset names to objects ({{"name": {{"file_name": ...}}}}); '
                f"dataset '{spec}' cannot be looked up"
            )
        if spec not in info:
            raise _source_error(
                f"dataset '{spec}': not a file and not a name in {info_path} (names: {', '.join(sorted(info))})"
            )
        entry = info[spec]
        cols, tags = entry.get("columns", {}), entry.get("tags", {})
        fmt = Format(
            messages=cols.get("messages"),
            images=cols.get("images", "images"),
            system=cols.get("system"),
            role_tag=tags.get("role_tag"),
            content_tag=tags.get("content_tag"),
            user_tag=tags.get("user_tag"),
            assistant_tag=tags.get("assistant_tag"),
            system_tag=tags.get("system_tag"),
        )
        return Path(data.dataset_dir) / entry["file_name"], fmt
    raise _source_error(
        f"data file '{spec}' does not exist (give a JSON/JSONL path, a dataset_info.json name with data.dataset_dir, or {BUILTIN_DATA_PREFIX}TASK)"
    )


def iter_split(
    specs: str | list[str], data: DataConfig, split: str, duplicates: DuplicateFinder | None = None
) -> Iterator[Sample | Problem]:
    """Every sample and every reading problem of a split's sources, in order, streamed.

    A sample repeating an earlier one of the split yields a "duplicate" problem (a warning) before it.
    """
    duplicates = duplicates if duplicates is not None else DuplicateFinder()
    for spec in [specs] if isinstance(specs, str) else specs:
        try:
            path, fmt = resolve_source(spec, data, split)
        except DataError as e:
            yield from e.found
            continue
        for got in read_file(path, fmt):
            if isinstance(got, Sample) and (dup := duplicates.check(got)) is not None:
                yield dup
            yield got
