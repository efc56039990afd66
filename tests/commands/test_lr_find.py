"""`vlmtune lr-find` (vlmtune.commands.lr_find): the range test's arithmetic on made-up curves, then a real test of
the tiny random Qwen2-VL that prints a rate per trained group, inside the range, and writes only --out."""

from __future__ import annotations

import csv
import hashlib
import math
from pathlib import Path

import pytest

from vlmtune.cli import main
from vlmtune.commands.lr_range import Curve, rates, suggest

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "examples" / "quickstart.yaml")


def _curve(loss_at, steps: int = 60, low: float = 1e-6, high: float = 1e-1) -> Curve:
    curve = Curve("projector", 1e-3)
    for lr in rates(low, high, steps):
        if not curve.add(lr, loss_at(lr)):
            break
    return curve


def _valley(lr: float) -> float:
    """Flat, then falling fastest around 1e-4 (a logistic in log10 rate), then blowing up past 1e-2."""
    x = math.log10(lr)
    return 5 - 3 / (1 + math.exp(-3 * (x + 4))) + (50 * (x + 2) ** 2 if x > -2 else 0)


@pytest.mark.parametrize(
    "name, loss_at, low, high",
    [
        ("steepest near 1e-4", _valley, 3e-5, 3e-4),
        ("falls all the way: the steepest point", lambda lr: 5 - math.log10(lr / 1e-6), 1e-6, 1e-1),
        ("rises from the start: the first rate", lambda lr: 1 + 1e3 * lr, 1e-6, 1e-6),
    ],
)
def test_suggestion(name, loss_at, low, high):
    s = suggest(_curve(loss_at))
    assert low * 0.999 <= s.suggested <= high * 1.001, (name, s)
    assert 1e-6 * 0.999 <= s.min_over_10 <= 1e-1


def test_a_diverging_loss_stops_the_test():
    curve = _curve(_valley)
    assert len(curve.lrs) < 60 and curve.lrs[-1] < 1e-1  # stopped once past 4 x the lowest smoothed loss
    assert curve.smoothed[-1] > 4 * min(curve.smoothed)
    assert not Curve("x", 1.0).add(1e-3, float("nan"))


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.mark.slow
def test_lr_find_suggests_a_rate_per_trained_group(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written outside --out would land here
    before = _digest(tiny_dir)
    out = tmp_path / "lr"
    args = [f"model.path={tiny_dir}", "train.batch_size=2", "data.builtin_train_samples=8"]
    code = main(["lr-find", QUICKSTART, *args, "--steps", "6", "--min", "1e-5", "--max", "1e-1", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    rows = {
        line.split()[0]: line.split()
        for line in printed.splitlines()
        if line.startswith(("projector ", "language_model "))
    }
    assert set(rows) == {"projector", "language_model"}  # the trained groups; vision tower and lm_head are frozen
    for group, cells in rows.items():
        configured, suggested = float(cells[1]), float(cells[2])
        assert configured == {"projector": 3e-3, "language_model": 1e-3}[group]
        assert 1e-5 <= suggested <= 1e-1, (group, suggested)
    steps = list(csv.DictReader((out / "lr_find.csv").open()))
    assert {r["group"] for r in steps} == {"projector", "language_model"}
    assert float(steps[0]["lr"]) == pytest.approx(1e-5) and all(math.isfinite(float(r["loss"])) for r in steps)
    assert (out / "lr_find.png").stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr"]
    assert _digest(tiny_dir) == before, "the model folder changed"


def test_a_bad_range_is_named_before_loading_a_model(tmp_path, capsys):
    args = ["lr-find", QUICKSTART, "--min", "1e-2", "--max", "1e-3", "--steps", "2", "--out", str(tmp_path / "lr")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "2 problem(s) in lr-find" in err and "--min (0.01) must be above 0 and below --max (0.001)" in err
    assert "--steps (2) must be at least 3" in err
    assert not (tmp_path / "lr").exists()
