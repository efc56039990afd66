"""The byte-offset index of a JSONL file (vlmtune.data.index): every record found at its line, as the streaming
reader finds it; saved beside the data (or in the cache), reused while the file is unchanged, rebuilt when not."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vlmtune.data import index as ix
from vlmtune.data.sharegpt import Problem, count_records, iter_records

REC = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'

# name, file bytes, (line, bytes) of every record
CASES = [
    ("plain", REC + b"\n" + REC + b"\n", [(1, REC), (2, REC)]),
    ("blank lines", b"\n" + REC + b"\n\n   \n\t\n" + REC + b"\n\n", [(2, REC), (6, REC)]),
    ("crlf", REC + b"\r\n\r\n" + REC + b"\r\n", [(1, REC + b"\r"), (3, REC + b"\r")]),
    ("no last newline", REC + b"\n" + REC, [(1, REC), (2, REC)]),
    ("bom on line 1", b"\xef\xbb\xbf" + REC + b"\n" + REC + b"\n", [(1, b"\xef\xbb\xbf" + REC), (2, REC)]),
    ("bom on a blank line 1", b"\xef\xbb\xbf \n" + REC + b"\n", [(2, REC)]),
    ("unicode whitespace line", REC + b"\n\xc2\xa0\xe3\x80\x80\n" + REC + b"\n", [(1, REC), (3, REC)]),
    ("indented record", b"  " + REC + b"\n", [(1, b"  " + REC)]),
    ("not utf-8 line", REC + b"\n\xff\xfe oops\n" + REC + b"\n", [(1, REC), (2, b"\xff\xfe oops"), (3, REC)]),
    ("empty file", b"", []),
    ("only blank lines", b"\n \n\r\n", []),
]


def _places(path: Path) -> list[int]:
    """Line numbers of the records the streaming reader yields (parsed or not)."""
    return [int((got.where if isinstance(got, Problem) else got[0]).rsplit(":", 1)[1]) for got in iter_records(path)]


@pytest.mark.parametrize("chunk", [ix.CHUNK, 5], ids=["one-chunk", "5-byte-chunks"])
@pytest.mark.parametrize("name,data,expected", CASES, ids=[c[0] for c in CASES])
def test_every_record_is_found_at_its_line(tmp_path, monkeypatch, chunk, name, data, expected):
    monkeypatch.setattr(ix, "CHUNK", chunk)  # lines across chunk boundaries
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    index = ix.build(path)
    assert [(index.line(i), index.read(i)) for i in range(len(index))] == expected
    assert [index.line(i) for i in range(len(index))] == _places(path)  # the streaming reader agrees


def test_line_numbers_cost_nothing_without_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes((REC + b"\n") * 1000 + b"\n\n" + (REC + b"\n") * 10)
    index = ix.build(path)
    assert len(index) == 1010 and index.line(999) == 1000 and index.line(1000) == 1003
    assert index.nbytes == 8 * 1010 + 16  # the offsets, and one jump after the blank lines


def _messages(echo_lines: list[str]):
    return lambda line: echo_lines.append(line)


def test_saved_beside_the_data_reused_and_rebuilt_when_the_file_changes(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes((REC + b"\n") * 3)
    said: list[str] = []
    first = ix.load_index(path, echo=_messages(said))
    saved = tmp_path / ".d.jsonl.vlmtune-index.safetensors"
    assert len(first) == 3 and saved.is_file() and f"saved to {saved}" in said[-1]
    assert path.read_bytes() == (REC + b"\n") * 3  # the data file is never written

    said.clear()
    again = ix.load_index(path, echo=_messages(said))
    assert said == [] and again.offsets.tolist() == first.offsets.tolist()  # reused, nothing said
    assert ix.record_count(path) == 3

    with path.open("ab") as f:  # appended: size and time change
        f.write(b"\n" + REC + b"\n")
    grown = ix.load_index(path, echo=_messages(said))
    assert len(grown) == 4 and grown.line(3) == 5
    assert "is stale (the file changed since it was indexed), rebuilding" in said[0]

    # Same size and modification time, other bytes: the hash of the file's head finds it.
    st = path.stat()
    path.write_bytes(path.read_bytes().replace(b'"hi"', b'"ho"', 1))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    said.clear()
    ix.load_index(path, echo=_messages(said))
    assert "stale" in said[0]


def test_a_damaged_index_is_rebuilt(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes((REC + b"\n") * 2)
    ix.load_index(path, echo=lambda _: None)
    saved = tmp_path / ".d.jsonl.vlmtune-index.safetensors"
    saved.write_bytes(saved.read_bytes()[:20])
    said: list[str] = []
    assert len(ix.load_index(path, echo=_messages(said))) == 2
    assert "unreadable" in said[0]


READ_ONLY = """
import encodings.utf_8_sig, os, sys
import safetensors, safetensors.numpy
from vlmtune.data.index import load_index
if os.geteuid() == 0:  # root writes anywhere: run as nobody (everything imported first: python's files are root's)
    os.setgid(65534)
    os.setuid(65534)
index = load_index(sys.argv[1])
print(len(index))
"""


def test_a_read_only_data_folder_keeps_the_index_in_the_cache():
    top = Path(tempfile.mkdtemp())  # under /tmp, so another user can reach it
    try:
        os.chmod(top, 0o755)
        data, cache = top / "data", top / "cache"
        data.mkdir()
        cache.mkdir()
        path = data / "d.jsonl"
        path.write_bytes((REC + b"\n") * 5)
        os.chmod(path, 0o644)
        os.chmod(data, 0o555)
        os.chmod(cache, 0o777)
        env = {**os.environ, "VLMTUNE_CACHE": str(cache)}
        done = subprocess.run(
            [sys.executable, "-c", READ_ONLY, str(path)], capture_output=True, text=True, env=env, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.splitlines()[-1] == "5"
        assert sorted(p.name for p in data.iterdir()) == ["d.jsonl"]
        (saved,) = (cache / "index").iterdir()
        assert saved.name.startswith("d.jsonl-") and saved.name.endswith(ix.SUFFIX)
        assert f"saved to {saved}" in done.stdout
    finally:
        os.chmod(top / "data", 0o755)
        shutil.rmtree(top)


def test_record_count_uses_the_index_and_refuses_a_json_list(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(REC + b"\n\n\n" + REC + b"\n")
    assert ix.record_count(path) == count_records(path) == 4  # no index yet: lines, an upper bound
    ix.load_index(path, echo=lambda _: None)
    assert ix.record_count(path) == 2
    listed = tmp_path / "d.json"
    listed.write_text(json.dumps([json.loads(REC)]), encoding="utf-8")
    assert ix.record_count(listed) is None
