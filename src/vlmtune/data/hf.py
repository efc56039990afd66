"""Hugging Face ``datasets`` on disk: a ``save_to_disk`` folder, or Parquet / Arrow files, read as records (streamed,
media left undecoded: the ``Image`` feature's ``{"bytes", "path"}`` structs, which ``formats.media_path`` writes to
the cache). Nothing is downloaded and nothing is written into the dataset's folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

HF_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}


def is_hf_dataset(path: Path) -> bool:
    """A ``save_to_disk`` folder (its ``state.json`` and ``dataset_info.json``) or a Parquet / Arrow file."""
    if path.is_dir():
        return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    return path.suffix.lower() in HF_SUFFIXES


def iter_hf_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(``path[index]``, record) for each row, streamed in order, media undecoded.

    Raises:
        ValueError: the folder or file is not a readable dataset (the message names it).
    """
    import datasets  # imported here: only runs that read such data pay for it

    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            found = datasets.load_from_disk(str(path))
            if isinstance(found, datasets.DatasetDict):
                if "train" not in found:
                    raise ValueError(f"'{path}' holds splits {', '.join(found)}; give the folder of one split")
                found = found["train"]
            stream = found.to_iterable_dataset()
        else:
            stream = datasets.load_dataset(
                HF_SUFFIXES[path.suffix.lower()], data_files=str(path), split="train", streaming=True
            )
        stream = stream.decode(False)
        for i, row in enumerate(stream):
            yield f"{path}[{i}]", row
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as e:
        raise ValueError(f"cannot be read as a Hugging Face dataset ({type(e).__name__}: {e})") from None
