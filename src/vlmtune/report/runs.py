"""What a run folder holds, read for the report: config, metrics log, plan tables, data reports and gallery."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vlmtune.eval.gallery import read_gallery
from vlmtune.paths import GALLERY_FILE, PLAN_FILE


class NotARunFolder(ValueError):
    """The folder given to the report is not a run folder (it has no ``metrics.jsonl``)."""


@dataclass
class RunData:
    """One run folder's files, as the report reads them."""

    folder: Path
    name: str  # what the report calls the run (the folder's name, or more of its path where two runs share it)
    config: str  # config.yaml as written; empty when missing
    records: list[dict]  # metrics.jsonl
    plans: dict[str, list[list[str]]] = field(default_factory=dict)  # stage -> plan table rows, header first
    data_reports: dict[str, dict] = field(default_factory=dict)  # stage -> {"train": ..., "eval": ...}
    gallery: list[dict] = field(default_factory=list)

    def series(self, key: str) -> list[tuple[float, float]]:
        """(step, value) of every record that has a number under ``key``."""
        return [
            (r["step"], r[key])
            for r in self.records
            if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float))
        ]

    def keys(self, prefix: str) -> list[str]:
        """The logged keys that start with ``prefix``, in the order first logged."""
        return list(dict.fromkeys(k for r in self.records for k in r if k.startswith(prefix)))

    def stage_starts(self) -> list[tuple[int, str]]:
        """(run step, stage name) where each stage began."""
        return [(r["step"], r["stage_start"]) for r in self.records if "stage_start" in r]

    def evals(self) -> list[dict]:
        """The evaluation records, in order."""
        return [r for r in self.records if "eval_loss" in r]


def _records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a run still writing, or a damaged line: the rest still reports
        if isinstance(record, dict):
            out.append(record)
    return out


WRITTEN_BY = " (`vlmtune train` writes metrics.jsonl into its train.output_dir)"


def _not_a_run(folder: Path) -> str | None:
    if (folder / "metrics.jsonl").is_file():
        return None
    return f"'{folder}' is not a run folder: it {'has no metrics.jsonl' if folder.exists() else 'does not exist'}"


def read_run(folder: str | Path, name: str | None = None) -> RunData:
    """Reads a run folder (``train.output_dir``).

    Raises:
        NotARunFolder: ``folder`` has no ``metrics.jsonl``.
    """
    folder = Path(folder)
    if (why := _not_a_run(folder)) is not None:
        raise NotARunFolder(why + WRITTEN_BY)
    records = _records(folder / "metrics.jsonl")
    config = folder / "config.yaml"
    plans_file = folder / PLAN_FILE
    plans = json.loads(plans_file.read_text(encoding="utf-8")) if plans_file.is_file() else {}
    stages = list(dict.fromkeys(r["stage_start"] for r in records if "stage_start" in r))
    reports = {}
    for path in sorted(folder.glob("data_report*.json")):
        stage = path.stem.removeprefix("data_report").removeprefix("-") or (stages[0] if stages else "train")
        if stage in stages or not stages:  # not an earlier run's stage of another name
            reports[stage] = json.loads(path.read_text(encoding="utf-8"))
    order = {s: i for i, s in enumerate(stages)}
    reports = dict(sorted(reports.items(), key=lambda kv: order.get(kv[0], len(order))))
    return RunData(
        folder,
        name or folder.name,
        config.read_text(encoding="utf-8") if config.is_file() else "",
        records,
        plans,
        reports,
        read_gallery(folder / GALLERY_FILE),
    )


def read_runs(folders: list[str | Path]) -> list[RunData]:
    """Reads several run folders; each is named by its folder's name, or its whole path where names repeat.

    Raises:
        NotARunFolder: one of ``folders`` is not a run folder (all are named in the message).
    """
    paths = [Path(f) for f in folders]
    bad = [why for p in paths if (why := _not_a_run(p)) is not None]
    if bad:
        raise NotARunFolder("; ".join(bad) + WRITTEN_BY)
    names = [p.name for p in paths]
    return [read_run(p, p.name if names.count(p.name) == 1 else str(p)) for p in paths]
