"""The report's charts, from the runs' metrics logs: loss, rates and gradient norms per component group, the
evaluation metrics beside their chance levels, and throughput. Several runs share each chart (one colour per
run), so a chart compares them; one run gets a colour per series."""

from __future__ import annotations

from dataclasses import dataclass

from vlmtune.report.runs import RunData
from vlmtune.report.svg import DASHES, PALETTE, Line, Mark, line_chart

NO_DECAY = " (no decay)"


@dataclass
class Series:
    """What a chart draws from each run: the values logged under ``key``."""

    label: str
    key: str
    dots: bool = False  # sparse values (evaluations): a dot per value
    reference: bool = False  # a chance level or baseline: drawn dashed


@dataclass
class Chart:
    title: str
    series: list[Series]
    zero: str | None = None  # a dashed line at 0, with this label (the level of "no effect")
    optional: bool = False  # a method's own chart (DPO, KTO, GRPO): left out when nothing of it was logged


def _per_group(runs: list[RunData], prefix: str) -> list[Series]:
    """One series per component group logged under ``prefix`` (``lr/``, ``grad_norm/``); an optimizer group
    without weight decay is left out where its group's rate is shown (the same rate)."""
    keys = list(dict.fromkeys(k for run in runs for k in run.keys(prefix)))
    keys = [k for k in keys if not (k.endswith(NO_DECAY) and k.removesuffix(NO_DECAY) in keys)]
    return [Series(k.removeprefix(prefix), k) for k in keys]


def chart_list(runs: list[RunData]) -> list[Chart]:
    """Every chart of the report, in order."""
    return [
        Chart("loss (answer tokens)", [Series("train loss", "loss"), Series("eval loss", "eval_loss", dots=True)]),
        Chart("learning rate per component group", _per_group(runs, "lr/")),
        Chart("gradient norm per component group (before clipping)", _per_group(runs, "grad_norm/")),
        Chart(
            "answers (eval, generated and teacher-forced)",
            [
                Series("token accuracy", "eval/token_accuracy", dots=True),
                Series("exact match", "eval/exact_match", dots=True),
                Series("ROUGE-1 F1", "eval/rouge1", dots=True),
                Series("ROUGE-L F1", "eval/rougeL", dots=True),
            ],
        ),
        Chart(
            "caption retrieval recall@1 (image -> answer) vs chance",
            [
                Series("recall@1", "eval/retrieval_r1", dots=True),
                Series("chance", "eval/retrieval_r1_chance", reference=True),
            ],
        ),
        Chart(
            "image-ablation gap: answer loss without the true image minus with it",
            [
                Series("blank image", "eval/ablation_gap_blank", dots=True),
                Series("another sample's image", "eval/ablation_gap_other", dots=True),
            ],
            zero="0: image ignored",
        ),
        Chart(
            "projector output vs answer embedding: cosine",
            [
                Series("matched", "eval/projector_cos_matched", dots=True),
                Series("mismatched (baseline)", "eval/projector_cos_mismatched", reference=True),
            ],
        ),
        Chart(
            "preferences (DPO, KTO): chosen over rejected, rewards against the reference",
            [
                Series("preference accuracy (eval)", "eval/preference_accuracy", dots=True),
                Series("reward accuracy (eval)", "eval/rewards/accuracy", dots=True),
                Series("reward accuracy (train)", "rewards/accuracy"),
                Series("reward margin (train)", "rewards/margin"),
            ],
            zero="0",
            optional=True,
        ),
        Chart(
            "rewards (GRPO): sampled completions (train) and greedy answers (eval)",
            [
                Series("mean reward (train)", "reward"),
                Series("mean reward (eval)", "eval/reward", dots=True),
                Series("KL to the reference", "kl"),
                Series("share of step time sampling", "time/rollout_share"),
            ],
            optional=True,
        ),
        Chart("throughput (samples per second)", [Series("samples/s", "samples_per_s")]),
    ]


def _lines(chart: Chart, runs: list[RunData]) -> list[Line]:
    lines = []
    several = len(runs) > 1
    for r, run in enumerate(runs):
        for s, series in enumerate(chart.series):
            points = run.series(series.key)
            if several:
                color, dash, label = PALETTE[r % len(PALETTE)], DASHES[s % len(DASHES)], f"{run.name}: {series.label}"
            else:
                color, dash, label = PALETTE[s % len(PALETTE)], "7 3" if series.reference else "", series.label
            lines.append(Line(label, points, color, dash, series.dots))
    if chart.zero is not None and any(ln.points for ln in lines):
        xs = [x for ln in lines for x, _ in ln.points]
        lines.append(Line(chart.zero, [(min(xs), 0.0), (max(xs), 0.0)], "#999999", "3 3"))
    return lines


def _marks(runs: list[RunData]) -> list[Mark]:
    """Stage boundaries of the runs with more than one stage."""
    marks = []
    for r, run in enumerate(runs):
        starts = run.stage_starts()
        if len({name for _, name in starts}) < 2:
            continue
        color = PALETTE[r % len(PALETTE)] if len(runs) > 1 else "#888888"
        marks += [Mark(step, name, color) for step, name in starts]
    return marks


def charts_html(runs: list[RunData]) -> str:
    """Every chart as HTML figures with inline SVG."""
    marks = _marks(runs)
    drawn = [(c, _lines(c, runs)) for c in chart_list(runs)]
    return "\n".join(
        line_chart(c.title, lines, marks) for c, lines in drawn if not c.optional or any(ln.points for ln in lines)
    )
