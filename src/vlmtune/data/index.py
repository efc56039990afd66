"""A byte-offset index of a JSONL file: where each record (non-blank line) starts, built in one streaming pass and
saved beside the file, so a split of a million records is read one record at a time, on demand.

The index holds 8 bytes per record (its offset, int64) and the line numbers only where they stop following the
record count (after blank lines), so every record is still named ``file:line``. It is saved as safetensors (never
pickle) next to the data, ``.NAME.vlmtune-index.safetensors``, or, where the data's folder is not writable, in
``$VLMTUNE_CACHE/index/`` under a hash of the file's absolute path; it is written atomically (a temporary file, then
a rename) and the data file is never touched. It is reused while the file's size, modification time and a hash of
its first and last 64 KiB are what they were when it was built; otherwise it is rebuilt, and the rebuild is said.

Blank lines are those ``vlmtune.data.sharegpt.iter_records`` skips (only whitespace, a byte-order mark on line 1).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmtune.data.hf import is_hf_dataset
from vlmtune.data.sharegpt import count_records, is_json_list
from vlmtune.paths import cache_dir

VERSION = "1"  # of the file layout below; an index of another version is rebuilt
SUFFIX = ".vlmtune-index.safetensors"
CHUNK = 1 << 24  # bytes read at a time while indexing
BLOCK = 1 << 16  # bytes of the head and of the tail hashed into the stamp
BOM = b"\xef\xbb\xbf"
# First bytes of a line that str.strip() may find blank: ASCII whitespace and separators (0x09-0x0d, 0x1c-0x20) and
# the lead bytes of UTF-8's other whitespace (U+0085 and U+00A0: C2; U+1680: E1; U+2000-U+205F: E2; U+3000: E3).
# Only lines starting with one of them (rare in JSONL: records start with "{") are decoded to decide.
MAYBE_BLANK = np.zeros(256, dtype=bool)
MAYBE_BLANK[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32, 0xC2, 0xE1, 0xE2, 0xE3]] = True


@dataclass
class LineIndex:
    """Where each record of a JSONL file starts, and its line number."""

    path: Path  # as the source names it (places are written with it)
    offsets: np.ndarray  # int64: byte offset of each record, in file order
    size: int  # bytes of the file when indexed
    jump_at: np.ndarray  # int64: records from which the number of blank lines before a record grows
    blanks: np.ndarray  # int64: that number, from each jump on

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def nbytes(self) -> int:
        """Memory the index takes."""
        return self.offsets.nbytes + self.jump_at.nbytes + self.blanks.nbytes

    def line(self, i: int) -> int:
        """The 1-based line number of record ``i``."""
        k = int(np.searchsorted(self.jump_at, i, side="right"))
        return i + 1 + (int(self.blanks[k - 1]) if k else 0)

    def read(self, i: int) -> bytes:
        """Record ``i``'s bytes without its newline (positioned reads: safe in forked data-loader workers)."""
        start = int(self.offsets[i])
        end = int(self.offsets[i + 1]) if i + 1 < len(self.offsets) else self.size
        with open(self.path, "rb") as f:
            raw = os.pread(f.fileno(), end - start, start)
        cut = raw.find(b"\n")
        return raw if cut < 0 else raw[:cut]


def index_paths(path: Path) -> tuple[Path, Path]:
    """Where the index of ``path`` is kept: beside it, or in the cache (where its folder is not writable)."""
    key = hashlib.blake2b(str(path.resolve()).encode("utf-8"), digest_size=10).hexdigest()
    return path.with_name(f".{path.name}{SUFFIX}"), cache_dir() / "index" / f"{path.name}-{key}{SUFFIX}"


def stamp(path: Path) -> dict[str, str]:
    """What an index is valid for: the file's size, modification time and a hash of its first and last 64 KiB."""
    st = path.stat()
    with open(path, "rb") as f:
        head = f.read(BLOCK)
        f.seek(max(0, st.st_size - BLOCK))
        tail = f.read(BLOCK)
    return {
        "version": VERSION,
        "size": str(st.st_size),
        "mtime_ns": str(st.st_mtime_ns),
        "head": hashlib.blake2b(head, digest_size=16).hexdigest(),
        "tail": hashlib.blake2b(tail, digest_size=16).hexdigest(),
    }


def _blank(raw: bytes, first: bool) -> bool:
    """A line ``iter_records`` skips: only whitespace once decoded (not UTF-8: a record, reported when read)."""
    try:
        return not raw.decode("utf-8-sig" if first else "utf-8").strip()
    except UnicodeDecodeError:
        return False


def build(path: Path) -> LineIndex:
    """Indexes a JSONL file in one pass, reading it in 16 MiB chunks (newlines found by numpy, not per line)."""
    offsets, jumps, counts = [], [], []
    pos = line_start = lines = records = last_blanks = 0
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()

        def add(starts: np.ndarray, ends: np.ndarray, chunk: np.ndarray) -> None:
            nonlocal lines, records, last_blanks
            local = starts - pos
            first = np.zeros(len(starts), dtype=np.uint8)
            inside = local >= 0
            first[inside] = chunk[local[inside]]
            check = np.flatnonzero(~inside | MAYBE_BLANK[first] | (starts == 0))
            keep = np.ones(len(starts), dtype=bool)
            for j in check:  # rare: decoded to decide
                keep[j] = not _blank(os.pread(fd, int(ends[j] - starts[j]), int(starts[j])), starts[j] == 0)
            numbers = lines + 1 + np.flatnonzero(keep)  # 1-based line numbers of the records
            blanks = numbers - (records + 1 + np.arange(len(numbers)))  # blank lines before each record
            change = np.flatnonzero(np.diff(blanks, prepend=last_blanks))
            jumps.append(records + change)
            counts.append(blanks[change])
            offsets.append(starts[keep])
            lines += len(starts)
            records += len(numbers)
            last_blanks = int(blanks[-1]) if len(blanks) else last_blanks

        while chunk := f.read(CHUNK):
            data = np.frombuffer(chunk, dtype=np.uint8)
            ends = np.flatnonzero(data == 10).astype(np.int64) + pos
            if len(ends):
                starts = np.concatenate(([line_start], ends[:-1] + 1))
                add(starts, ends, data)
                line_start = int(ends[-1]) + 1
            pos += len(chunk)
        if line_start < pos:  # a last line without a newline
            add(np.array([line_start], dtype=np.int64), np.array([pos], dtype=np.int64), np.zeros(0, np.uint8))
    return LineIndex(path, _joined(offsets), pos, _joined(jumps), _joined(counts))


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def _read(where: Path, path: Path, want: dict[str, str]) -> tuple[LineIndex | None, str | None]:
    """The index saved at ``where`` if it is valid for the file now, else (None, why not) (None when absent)."""
    from safetensors import SafetensorError, safe_open

    if not where.is_file():
        return None, None
    try:
        with safe_open(str(where), framework="np") as f:
            meta = f.metadata() or {}
            if any(meta.get(k) != v for k, v in want.items()):
                return None, "stale (the file changed since it was indexed)"
            arrays = {k: f.get_tensor(k) for k in ("offsets", "jump_at", "blanks")}
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        return None, f"unreadable ({e})"
    return LineIndex(path, arrays["offsets"], int(want["size"]), arrays["jump_at"], arrays["blanks"]), None


def _save(index: LineIndex, meta: dict[str, str], targets: tuple[Path, ...]) -> Path | None:
    """Writes the index to the first target that takes it (a temporary file, then a rename); None if none did."""
    from safetensors.numpy import save

    arrays = {"offsets": index.offsets, "jump_at": index.jump_at, "blanks": index.blanks}
    data = save(arrays, metadata={**meta, "file": str(index.path.resolve())})
    for target in targets:
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(target.parent, os.W_OK):
                continue
            tmp.write_bytes(data)
            os.replace(tmp, target)
            return target
        except OSError:
            tmp.unlink(missing_ok=True)
    return None


def load_index(path: str | Path, echo: Callable[[str], None] = print) -> LineIndex:
    """The index of a JSONL file: the saved one while still valid, else built now and saved (the build is said)."""
    path = Path(path)
    want = stamp(path)
    beside, cached = index_paths(path)
    why = ""
    for where in (beside, cached):
        found, reason = _read(where, path, want)
        if found is not None:
            return found
        why = why or (f": the index {where} is {reason}, rebuilding" if reason else "")
    echo(f"indexing {path} ({int(want['size']) / 2**20:.1f} MiB){why}")
    start = time.perf_counter()
    index = build(path)
    saved = _save(index, want, (beside, cached))
    where = f"saved to {saved}" if saved else "could not save it (no writable place): it is built again next run"
    echo(f"indexed {path}: {len(index)} records in {time.perf_counter() - start:.1f} s, {where}")
    return index


def saved_count(path: Path) -> int | None:
    """Records of a JSONL file from its saved index, while valid; None when there is none."""
    want = stamp(path)
    for where in index_paths(path):
        found, _ = _read(where, path, want)
        if found is not None:
            return len(found)
    return None


def record_count(path: Path) -> int | None:
    """Records of a JSONL file, cheaply: its saved index's count, else its lines (an upper bound: blank lines
    count); None for what is not read by line (a JSON list, a Hugging Face dataset, a folder)."""
    if not path.is_file() or is_hf_dataset(path) or is_json_list(path):
        return None
    saved = saved_count(path)
    return saved if saved is not None else count_records(path)
