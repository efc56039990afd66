"""Atomic checkpoint folders: commit, recovery after an interrupted save, pruning."""

from __future__ import annotations

from vlmtune.paths import begin, commit, recover
from vlmtune.train.checkpoint import prune, step_folders


def _folder(path, text):
    path.mkdir(parents=True)
    (path / "weights.txt").write_text(text)
    return path


def test_commit_replaces_an_existing_folder_whole(tmp_path):
    out = _folder(tmp_path / "checkpoint-5", "old")
    tmp = begin(out)
    assert tmp.name == "checkpoint-5.tmp" and not any(tmp.iterdir())
    (tmp / "weights.txt").write_text("new")
    commit(tmp, out)
    assert (out / "weights.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]


def test_recover_removes_half_written_and_restores_an_interrupted_swap(tmp_path):
    _folder(tmp_path / "checkpoint-10.tmp", "half")
    _folder(tmp_path / "checkpoint-5.old", "complete")  # crash between the two renames: checkpoint-5 missing
    _folder(tmp_path / "checkpoint-3", "kept")
    _folder(tmp_path / "checkpoint-3.old", "stale")  # crash after the swap, before removing .old
    done = recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-5"]
    assert (tmp_path / "checkpoint-5" / "weights.txt").read_text() == "complete"
    assert (tmp_path / "checkpoint-3" / "weights.txt").read_text() == "kept"
    assert any("checkpoint-10.tmp" in d for d in done) and any("restored checkpoint-5" in d for d in done)


def test_prune_keeps_the_newest_step_folders_only(tmp_path):
    for step in (5, 10, 100, 15):
        _folder(tmp_path / f"checkpoint-{step}", str(step))
    _folder(tmp_path / "align", "stage")
    removed = prune(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["checkpoint-10", "checkpoint-5"]
    assert [s for s, _ in step_folders(tmp_path)] == [15, 100]
    assert (tmp_path / "align").is_dir()
    assert prune(tmp_path, None) == []
