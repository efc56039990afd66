"""The run report: one self-contained HTML file (inline SVG charts, images as data URIs, no script or style from
anywhere else) for one run or several compared.

Per run: its config and plan, the evaluation metrics before training and after each stage beside their chance
levels, the gallery of eval samples with the answers before and after each stage, the data report and
throughput. The charts come first, every run drawn on each.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from vlmtune.eval.evaluate import METRIC_ROWS, normalize
from vlmtune.paths import REPORT_FILE, write_atomic
from vlmtune.report.charts import charts_html
from vlmtune.report.runs import RunData, read_run, read_runs
from vlmtune.tracking import echo

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1180px; color: #222; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; border-bottom: 1px solid #ddd; margin-top: 32px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.charts { display: flex; flex-wrap: wrap; gap: 8px 18px; }
figure.chart { margin: 0; } figcaption { font-weight: 600; font-size: 13px; }
.tick { font-size: 10px; fill: #555; } .axis, .mark-label { font-size: 10px; fill: #777; }
ul.legend { list-style: none; padding: 0; margin: 2px 0 0 58px; font-size: 12px; max-width: 470px; }
ul.legend li { display: inline-block; margin-right: 12px; } ul.legend svg { margin-right: 4px; }
table { border-collapse: collapse; font-size: 13px; margin: 4px 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f7f7f7; padding: 8px; overflow-x: auto; font-size: 12px; }
.gallery img { display: block; image-rendering: pixelated; border: 1px solid #ccc; }
.gallery td.right { background: #e8f6e8; } .none { color: #888; }
"""

# Runs in a browser once every image has decoded: the page records how many decoded, which a test can read back.
IMAGES_CHECK = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var decoded = images.filter(function (img) { return img.complete && img.naturalWidth > 0; });
  document.body.setAttribute('data-images', String(images.length));
  document.body.setAttribute('data-images-decoded', String(decoded.length));
});
"""


NONE = '<span class="none">-</span>'


def _table(rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """Rows of plain text (header first) as an HTML table, every cell escaped."""
    head = "".join(f"<th>{escape(str(c))}</th>" for c in rows[0])
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=num' if i in numeric else ''}>{escape(str(c))}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows[1:]
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _eval_points(run: RunData) -> list[tuple[str, dict]]:
    """(column title, eval record): before training, then after each stage (its last evaluation)."""
    evals = run.evals()
    points = [("before training", evals[0])] if evals and evals[0]["step"] == 0 else []
    last: dict[str, dict] = {}
    for r in evals[len(points) :]:
        last[r.get("stage", "")] = r
    return points + [(f"after {stage}", r) for stage, r in last.items()]


def eval_table(run: RunData) -> str:
    """The evaluation metrics before training and after each stage, with their chance or baseline level."""
    points = _eval_points(run)
    if not points:
        return '<p class="none">no evaluation logged (no data.eval)</p>'
    rows = [["metric", *(title for title, _ in points), "chance / baseline"]]
    latest = points[-1][1]
    rows.append(["eval loss (all eval samples)", *(f"{r['eval_loss']:.4f}" for _, r in points), "-"])
    for key, label, base, fmt in METRIC_ROWS:
        values = [r.get(f"eval/{key}") for _, r in points]
        if all(v is None for v in values):
            continue
        chance = latest.get(f"eval/{base}") if base else None
        level = format(chance, fmt) if chance is not None else (base if base and " " in base else "-")
        rows.append([label, *("-" if v is None else format(v, fmt) for v in values), level])
    return _table(rows, numeric=set(range(1, len(points) + 2)))


def gallery_html(run: RunData) -> str:
    """The eval samples with their answers before training and after each stage; right answers shaded."""
    if not run.gallery:
        return '<p class="none">no gallery (the run had no eval data, or predates the gallery)</p>'
    stages = list(dict.fromkeys(s for row in run.gallery for s in row.get("after", {})))
    head = "".join(f"<th>{escape(t)}</th>" for t in ["image", "question", "reference", "before training"])
    head += "".join(f"<th>after {escape(s)}</th>" for s in stages)
    body = []
    for row in run.gallery:
        reference = row.get("reference", "")
        images = "".join(
            f'<img src="{escape(uri)}" alt="{escape(row.get("where", ""))}">'
            for uri in row.get("thumbnails", [])
            if uri.startswith("data:image/")
        )
        cells = [images or NONE, escape(row.get("question", "")), escape(reference)]
        cells = [f"<td>{c}</td>" for c in cells]
        for answer in [row.get("before"), *(row.get("after", {}).get(s) for s in stages)]:
            right = answer is not None and normalize(answer) == normalize(reference)
            shown = escape(answer) if answer is not None else NONE
            cells.append(f'<td class="right">{shown}</td>' if right else f"<td>{shown}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table class="gallery"><tr>{head}</tr>{"".join(body)}</table>'


def data_html(run: RunData) -> str:
    """What the checks and the length limit kept, dropped and skipped, by stage and split and reason; the mix."""
    rows = [["stage", "split", "kept", "dropped (too long)", "downscaled", "text truncated", "skipped", "by reason"]]
    for stage, report in run.data_reports.items():
        for split in ("train", "eval"):
            r = report.get(split)
            if not r:
                continue
            reasons = ", ".join(f"{kind}: {n}" for kind, n in r.get("skipped_by_kind", {}).items()) or "-"
            counts = [len(r.get(k, [])) for k in ("dropped", "downscaled", "truncated")]
            rows.append([stage, split, r.get("kept", 0), *counts, r.get("skipped_samples", 0), reasons])
    out = _table(rows, numeric={2, 3, 4, 5, 6}) if len(rows) > 1 else '<p class="none">no data report</p>'
    mixes = [r for r in run.records if "mix" in r]
    if mixes:
        mix_rows = [["step", "epoch", "source", "weight", "drawn", "distinct", "held"]]
        for r in mixes:
            for source, m in r["mix"].items():
                counts = [m.get(k) for k in ("weight", "drawn", "distinct", "held")]
                mix_rows.append([r["step"], r.get("epoch", "-"), source, *counts])
        out += "<h3>weighted mix per epoch</h3>" + _table(mix_rows, numeric={0, 1, 3, 4, 5, 6})
    return out


def throughput_html(run: RunData) -> str:
    """Samples per second, tokens and padding over the logged training windows."""
    train = [r for r in run.records if "samples_per_s" in r]
    if not train:
        return '<p class="none">no training step logged</p>'
    rates = [r["samples_per_s"] for r in train]
    rows = [
        ["measure", "value"],
        ["optimizer steps", max(r["step"] for r in train)],
        ["samples per second (mean over logging windows)", f"{sum(rates) / len(rates):.1f}"],
        ["samples per second (min / max)", f"{min(rates):.1f} / {max(rates):.1f}"],
        ["tokens in logged windows", f"{sum(r.get('tokens', 0) for r in train):,}"],
        ["answer tokens in logged windows", f"{sum(r.get('answer_tokens', 0) for r in train):,}"],
        ["padding (mean fraction of the batch)", f"{sum(r.get('padding', 0.0) for r in train) / len(train):.3f}"],
    ]
    return _table(rows, numeric={1})


def plan_html(run: RunData) -> str:
    if not run.plans:
        return '<p class="none">no plan recorded (plan.json)</p>'
    return "".join(f"<h3>stage {escape(stage)}</h3>" + _table(rows) for stage, rows in run.plans.items())


def run_section(run: RunData) -> str:
    """One run's details."""
    config = escape(run.config) if run.config else "(no config.yaml)"
    return "\n".join(
        [
            f'<section class="run"><h2>{escape(run.name)}</h2><p>{escape(str(run.folder))}</p>',
            f"<h3>plan</h3>{plan_html(run)}",
            f"<h3>evaluation</h3>{eval_table(run)}",
            f"<h3>gallery: answers before training and after each stage</h3>{gallery_html(run)}",
            f"<h3>data</h3>{data_html(run)}",
            f"<h3>throughput</h3>{throughput_html(run)}",
            f"<details><summary>config.yaml</summary><pre>{config}</pre></details></section>",
        ]
    )


def build_report(runs: list[RunData]) -> str:
    """The report of ``runs`` as one HTML document."""
    title = "vlmtune run report: " + ", ".join(run.name for run in runs)
    return "\n".join(
        [
            "<!DOCTYPE html>",
            f'<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>',
            f"<style>{STYLE}</style><script>{IMAGES_CHECK}</script></head><body>",
            f"<h1>{escape(title)}</h1>",
            f'<h2>charts</h2><div class="charts">{charts_html(runs)}</div>',
            *(run_section(run) for run in runs),
            "</body></html>",
        ]
    )


def write_report(folders: list[str | Path], out: str | Path | None = None) -> Path:
    """Writes the report of the run ``folders`` to ``out`` (default: ``report.html`` in the only run's folder).

    Raises:
        NotARunFolder: a folder is not a run folder.
        ValueError: several runs and no ``out``.
    """
    runs = read_runs(folders)
    if out is None:
        if len(runs) > 1:
            raise ValueError("several runs: say where the report goes (--out FILE)")
        out = runs[0].folder / REPORT_FILE
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(out, build_report(runs))


def report_at_run_end(folder: Path) -> Path | None:
    """The run's report, written at its end; a failure is printed as a warning and the run goes on."""
    try:
        path = write_atomic(folder / REPORT_FILE, build_report([read_run(folder)]))
    except Exception as e:  # the report is a view of the run's files: never the reason a finished run fails
        echo(f"warning: the run report was not written ({type(e).__name__}: {e}); `vlmtune report {folder}` retries")
        return None
    echo(f"wrote {path} (the run report)")
    return path
