"""The run report: a real two-stage run writes it, `vlmtune report` compares two runs, and headless Chromium
renders it (charts drawn, gallery images decoded, no console message) and saves a screenshot."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vlmtune.cli import main
from vlmtune.report.page import report_at_run_end
from vlmtune.report.svg import nice_ticks

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install chromium; .ci/run installs it)"
)
# A short run of each kind: evaluations (of 8 samples, which the gallery shows) before training and at stage ends.
SHORT = [
    "train.progress_bar=false",
    "train.batch_size=8",
    "train.logging_steps=1",
    "train.eval_steps=100",
    "train.save_steps=100",
    "train.warmup_steps=1",
    "data.builtin_train_samples=32",
    "data.builtin_eval_samples=16",
    "eval.samples=8",
    "eval.max_new_tokens=8",
    "eval.retrieval_k=4",
]


HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]


def browser(page: Path, *flags: str) -> subprocess.CompletedProcess:
    """Chromium, headless, on ``page``; console messages go to stderr (``CONSOLE`` lines)."""
    return subprocess.run(
        [CHROMIUM, *HEADLESS, *flags, page.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )


def console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.fixture(scope="module")
def runs(base_dir, tmp_path_factory) -> tuple[Path, Path]:
    """Two real runs: the progressive example (two stages, 3 steps each) and the quickstart (4 steps, no
    generated-answer metrics: the gallery's answers are generated for it alone)."""
    out = tmp_path_factory.mktemp("report-runs")
    staged, single = out / "progressive", out / "quickstart"
    args = [f"train.output_dir={staged}", "stages.0.steps=3", "stages.1.steps=3", *SHORT]
    assert main(["train", str(ROOT / "examples/progressive.yaml"), *args]) == 0
    args = [f"train.output_dir={single}", "train.max_steps=4", *SHORT, "eval.generate_in_training=false"]
    assert main(["train", str(ROOT / "examples/quickstart.yaml"), *args]) == 0
    return staged, single


@pytest.mark.slow
def test_every_run_writes_its_report_and_gallery(runs):
    staged, single = runs
    rows = [json.loads(line) for line in (staged / "gallery.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    for row in rows:
        assert row["question"] and "<image>" not in row["question"] and row["reference"]
        assert isinstance(row["before"], str) and set(row["after"]) == {"align", "joint"}
        assert row["thumbnails"][0].startswith("data:image/png;base64,")
    assert list(json.loads((staged / "plan.json").read_text())) == ["align", "joint"]
    rows = [json.loads(line) for line in (single / "gallery.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(isinstance(r["before"], str) and set(r["after"]) == {"train"} for r in rows)
    assert not any("eval/exact_match" in line for line in (single / "metrics.jsonl").read_text().splitlines())
    page = (staged / "report.html").read_text()
    assert "after align" in page and "after joint" in page and "before training" in page
    for row in rows[:3]:  # the gallery's texts, escaped as the page shows them
        assert row["reference"] in page


@needs_chromium
@pytest.mark.slow
def test_report_of_two_runs_renders_in_chromium(runs, tmp_path, capsys):
    staged, single = runs
    page = tmp_path / "compare.html"
    assert main(["report", str(staged), str(single), "--out", str(page)]) == 0
    assert str(page) in capsys.readouterr().out
    html = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I), "the page must fetch nothing"
    assert "<link" not in html and "url(" not in html

    done = browser(page, "--virtual-time-budget=3000", "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    assert console_messages(done.stderr) == []
    dom = done.stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    images = int(re.search(r'data-images="(\d+)"', body).group(1))
    assert images == 16  # 8 gallery samples per run, one image each
    assert re.search(r'data-images-decoded="(\d+)"', body).group(1) == str(images)
    charts = re.findall(r'<figure class="chart">', dom)
    assert len(charts) >= 7, "loss, rates, gradient norms, answers, retrieval, ablation, projector, throughput"
    lines = re.findall(r'<polyline class="series" points="([^"]+)"', dom)
    assert lines and all(len(p.split()) >= 1 for p in lines)
    assert len({p for p in lines if len(p.split()) >= 3}) >= 10  # loss, rates, norms of two runs
    for name in ("progressive: train loss", "quickstart: train loss", "progressive: chance"):
        assert name in dom  # one line per run, labelled in the legend

    shot = tmp_path / "report.png"
    done = browser(page, "--window-size=1280,2000", "--hide-scrollbars", f"--screenshot={shot}")
    assert done.returncode == 0 and shot.stat().st_size > 10_000, done.stderr[-2000:]


@needs_chromium
def test_the_console_check_sees_a_script_error(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    done = browser(page, "--dump-dom")
    assert any("undefinedFunction" in m for m in console_messages(done.stderr))


@pytest.mark.slow
def test_report_escapes_what_the_run_folder_holds(runs, tmp_path):
    staged, _ = runs
    run = tmp_path / "copy"
    shutil.copytree(staged, run, ignore=shutil.ignore_patterns("align", "joint", "final"))
    (run / "config.yaml").write_text("model:\n  path: '</pre><script>alert(1)</script>'\n")
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "<script>alert(1)" not in page and "&lt;/pre&gt;&lt;script&gt;alert(1)" in page


def test_report_of_a_folder_that_is_not_a_run_names_it(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("model: {}\n")
    missing = tmp_path / "nowhere"
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"'{tmp_path}' is not a run folder" in err and "metrics.jsonl" in err
    assert main(["report", str(tmp_path), str(missing), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert f"'{tmp_path}'" in err and f"'{missing}'" in err
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "r.html").exists()


def test_a_report_that_cannot_be_written_warns_and_the_run_goes_on(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 2, "stage": "train", "loss": 1.5}) + "\n")
    (tmp_path / "report.html").mkdir()  # a folder where the report goes: the write fails
    assert report_at_run_end(tmp_path) is None
    assert "warning: the run report was not written" in capsys.readouterr().out


def test_a_methods_chart_appears_only_where_the_method_logged(tmp_path):
    dpo, sft = tmp_path / "dpo", tmp_path / "sft"
    for run, extra in ((dpo, {"rewards/margin": 0.2, "rewards/accuracy": 0.75}), (sft, {})):
        run.mkdir()
        (run / "config.yaml").write_text("model: {}\n")
        lines = [{"step": s, "stage": "train", "loss": 1.0 / s, **extra} for s in (1, 2, 3)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        assert main(["report", str(run)]) == 0
    assert "preferences (DPO, KTO)" in (dpo / "report.html").read_text()
    page = (sft / "report.html").read_text()
    assert "preferences (DPO, KTO)" not in page and "rewards (GRPO)" not in page


@pytest.mark.parametrize(
    "lo, hi, expected",
    [
        (0.0, 1.0, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        (0.13, 0.87, [0.2, 0.4, 0.6, 0.8]),
        (0.0, 120.0, [0.0, 20.0, 40.0, 60.0, 80.0, 100.0, 120.0]),
        (-0.05, 0.05, [-0.04, -0.02, 0.0, 0.02, 0.04]),
        (2.5e-4, 3.1e-3, [0.0005, 0.001, 0.0015, 0.002, 0.0025, 0.003]),
    ],
)
def test_axis_ticks_are_round_and_inside_the_range(lo, hi, expected):
    assert nice_ticks(lo, hi) == pytest.approx(expected)
