"""Where samples come from: JSON/JSONL files (ShareGPT, alpaca, OpenAI messages, TRL's prompt / completion and
preference records), Hugging Face datasets on disk, names in ``dataset_dir/dataset_info.json`` (LLaMA-Factory's
registry, with its ``formatting``, ``columns``, ``tags``, ``ranking``), or ``builtin:shapes:TASK`` (generated on
demand); every source read as ``Sample``s in order, each sample knowing which source of the split it came from
(``Sample.source``), for weighted mixing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vlmtune.config.data import BUILTIN_DATA_PREFIX, DataConfig, DataSource
from vlmtune.data import shapes
from vlmtune.data.formats import Format
from vlmtune.data.hf import is_hf_dataset, iter_hf_records
from vlmtune.data.sharegpt import DataError, DuplicateFinder, Problem, Sample, iter_records, parse_record
from vlmtune.paths import cache_dir

DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow")
HUB_KEYS = {
    "hf_hub_url": "the Hugging Face hub",
    "ms_hub_url": "the ModelScope hub",
    "om_hub_url": "the Modelers hub",
    "script_url": "a loading script",
    "cloud_file_name": "cloud storage",
}
# dataset_info.json "columns" and "tags" keys vlmtune reads.
COLUMNS = (
    "prompt",
    "query",
    "response",
    "history",
    "messages",
    "system",
    "images",
    "videos",
    "audios",
    "chosen",
    "rejected",
    "kto_tag",
)
TAGS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag")


@dataclass(frozen=True)
class Source:
    """One source of a split, resolved: its file(s), record format and settings."""

    spec: str  # as the config names it
    files: tuple[Path, ...]
    fmt: Format = field(default_factory=Format)
    media_base: Path | None = None  # relative media paths start here; None: each file's own folder
    weight: float | None = None
    max_samples: int | None = None


def _source_error(message: str, where: str = "") -> DataError:
    return DataError([Problem(where, "file missing", message, whole_file=True)])


def _entry(spec: str | DataSource) -> DataSource:
    return spec if isinstance(spec, DataSource) else DataSource(path=spec)


def entries(specs: str | list[str | DataSource] | None) -> list[DataSource]:
    """A split's sources as ``DataSource``s (a bare string is a source with no settings of its own)."""
    if specs is None:
        return []
    return [_entry(s) for s in ([specs] if isinstance(specs, str | DataSource) else specs)]


def _files(path: Path, spec: str) -> tuple[Path, ...]:
    """A data file, a HF datasets folder, or a folder of data files (LLaMA-Factory allows one)."""
    if path.is_file() or is_hf_dataset(path):
        return (path,)
    if path.is_dir():
        files = tuple(sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES))
        if not files:
            raise _source_error(f"'{spec}': folder '{path}' holds no data file ({', '.join(DATA_SUFFIXES)})")
        return files
    raise _source_error(
        f"data file '{spec}' does not exist (give a JSON/JSONL/Parquet/Arrow path, a datasets folder, a "
        f"dataset_info.json name with data.dataset_dir, or {BUILTIN_DATA_PREFIX}TASK)"
    )


def resolve(entry: str | DataSource, data: DataConfig, split: str) -> Source:
    """A data source -> its files and record format.

    Raises:
        DataError: names the source and what would be valid.
    """
    entry = _entry(entry)
    spec = entry.path
    max_samples = entry.max_samples or data.max_samples
    if spec.startswith(BUILTIN_DATA_PREFIX):
        task = spec[len(BUILTIN_DATA_PREFIX) :]
        if task not in shapes.TASKS:
            raise _source_error(
                f"'{spec}': unknown builtin task '{task}'; valid: {', '.join(BUILTIN_DATA_PREFIX + t for t in shapes.TASKS)}"
            )
        n = data.builtin_train_samples if split == "train" else data.builtin_eval_samples
        seed = 0 if split == "train" else 1  # disjoint draws for train and eval
        out = cache_dir() / "shapes" / f"{task}-{split}-{n}-s{seed}-{shapes.fingerprint()}"
        path = out / f"{split}.jsonl"
        if not path.is_file():
            path = shapes.generate_shapes(out, n, task, seed=seed, name=split)
        return Source(spec, (path,), weight=entry.weight, max_samples=max_samples)
    p = Path(spec)
    if p.exists() or not data.dataset_dir:
        return Source(spec, _files(p, spec), weight=entry.weight, max_samples=max_samples)
    return _registered(spec, Path(data.dataset_dir), entry.weight, max_samples)


def _registered(name: str, dataset_dir: Path, weight: float | None, max_samples: int | None) -> Source:
    """A name in ``dataset_dir/dataset_info.json``, read as LLaMA-Factory reads it."""
    info_path = dataset_dir / "dataset_info.json"
    if not info_path.is_file():
        raise _source_error(f"dataset '{name}': not a file, and {info_path} does not exist")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise _source_error(f"{info_path} is not valid JSON ({e}); dataset '{name}' cannot be looked up") from None
    if not isinstance(info, dict) or not isinstance(info.get(name, {}), dict):
        raise _source_error(
            f'{info_path} must map dataset names to objects ({{"name": {{"file_name": ...}}}}); '
            f"dataset '{name}' cannot be looked up"
        )
    if name not in info:
        raise _source_error(
            f"dataset '{name}': not a file and not a name in {info_path} (names: {', '.join(sorted(info))})"
        )
    entry = info[name]
    where = f"{info_path} '{name}'"
    if "file_name" not in entry:
        remote = [f"{HUB_KEYS[k]} ({k}: {entry[k]})" for k in HUB_KEYS if k in entry]
        raise _source_error(
            f"dataset '{name}' is not a local file: it comes from {' / '.join(remote) or 'nowhere (no file_name)'}; "
            "vlmtune reads local data only: download it and give the entry a file_name",
            where,
        )
    cols, tags = entry.get("columns") or {}, entry.get("tags") or {}
    formatting = entry.get("formatting", "alpaca")  # LLaMA-Factory's default
    problems = []
    if formatting not in ("alpaca", "sharegpt"):
        problems.append(f"formatting '{formatting}' is not one vlmtune reads (alpaca, sharegpt)")
    ranking = entry.get("ranking", False)
    if not isinstance(ranking, bool):
        problems.append(f"ranking must be true (every record a chosen / rejected pair) or false, got {ranking!r}")
    elif ranking and "kto_tag" in cols:
        problems.append(
            "ranking: true and columns.kto_tag: a dataset holds preference pairs (ranking, method dpo) or answers "
            "labelled desirable / undesirable (kto_tag, method kto), not both"
        )
    unknown = sorted(set(cols) - set(COLUMNS) - {"tools"}) + sorted(
        set(tags) - set(TAGS) - {"observation_tag", "function_tag"}
    )
    if unknown:
        problems.append(f"unknown columns/tags {', '.join(unknown)}; valid: {', '.join(COLUMNS + TAGS)}")
    if problems:
        raise DataError([Problem(where, "bad sample", f"dataset '{name}': {p}", whole_file=True) for p in problems])
    defaults = Format()
    sharegpt = formatting == "sharegpt"
    fmt = Format(
        formatting=formatting,
        messages=cols.get("messages", "conversations" if sharegpt else None),
        images=cols.get("images", defaults.images),
        videos=cols.get("videos", defaults.videos),
        audios=cols.get("audios", defaults.audios),
        system=cols.get("system"),
        prompt=cols.get("prompt", defaults.prompt),
        query=cols.get("query", defaults.query),
        response=cols.get("response", defaults.response),
        history=cols.get("history"),
        chosen=cols.get("chosen", defaults.chosen),
        rejected=cols.get("rejected", defaults.rejected),
        kto_tag=cols.get("kto_tag"),
        ranking=ranking is True,
        # LLaMA-Factory's ShareGPT defaults are from/value/human/gpt; the ROLE_ALIASES of the reader cover them.
        **{t: tags.get(t) for t in TAGS},
    )
    path = dataset_dir / entry["file_name"]
    return Source(name, _files(path, name), fmt, media_base=dataset_dir, weight=weight, max_samples=max_samples)


def records(source: Source) -> Iterator[tuple[str, object, Path] | Problem]:
    """(place, record, media folder) for each record of a source in order, or a Problem where one does not parse."""
    for path in source.files:
        base = source.media_base or (path if path.is_dir() else path.parent)
        if is_hf_dataset(path):
            try:
                for where, row in iter_hf_records(path):
                    yield where, row, base
            except ValueError as e:
                yield Problem(str(path), "unreadable dataset", str(e), whole_file=True)
            continue
        for got in iter_records(path):
            yield got if isinstance(got, Problem) else (*got, base)


def read_source(source: Source, index: int = 0) -> Iterator[Sample | Problem]:
    """Each sample of a source (at most ``max_samples`` records), or each problem, in order."""
    n, unreadable = 0, False
    for got in records(source):
        if source.max_samples is not None and n >= source.max_samples:
            return
        if isinstance(got, Problem):
            n += not got.whole_file
            unreadable |= got.whole_file
            yield got
            continue
        n += 1
        where, obj, base = got
        sample, problems = parse_record(obj, where, base, source.fmt)
        yield from problems
        if sample is not None:
            sample.source = index
            yield sample
    if n == 0 and not unreadable:
        yield Problem(source.spec, "no samples", f"'{source.spec}' holds no samples", whole_file=True)


def iter_split(
    specs: str | list[str | DataSource], data: DataConfig, split: str, duplicates: DuplicateFinder | None = None
) -> Iterator[Sample | Problem]:
    """Every sample and every reading problem of a split's sources, in order, streamed.

    A sample repeating an earlier one of the split yields a "duplicate" problem (a warning) before it.
    """
    duplicates = duplicates if duplicates is not None else DuplicateFinder()
    for index, entry in enumerate(entries(specs)):
        try:
            source = resolve(entry, data, split)
        except DataError as e:
            yield from e.found
            continue
        for got in read_source(source, index):
            if isinstance(got, Sample) and (dup := duplicates.check(got)) is not None:
                yield dup
            yield got
