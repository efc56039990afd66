"""What a sweep leaves in its folder: the trials as a table (``trials.csv``, ``trials.md``), a plot
(``sweep.png``: each trial's evals by step, and the metric against each parameter) and the best trial's config as
a complete YAML for ``vlmtune train`` (``best.yaml``)."""

from __future__ import annotations

import csv
from pathlib import Path

from vlmtune.commands.space import space_overrides
from vlmtune.commands.trial import eval_records
from vlmtune.config.load import config_to_yaml, load_config
from vlmtune.tracking import echo, text_table


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def trial_rows(study, sw) -> list[dict]:
    """One row per trial: number, folder, state, the metric, steps trained, seconds and each parameter."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "WAITING":
            continue
        state = "interrupted" if t.state.name in ("FAIL", "RUNNING") and "failed" not in t.user_attrs else t.state.name
        row = {
            "trial": t.number,
            "folder": t.user_attrs.get("folder", f"trial-{t.number:03d}"),
            "state": state.lower(),
            sw.metric: t.value,
            "steps": t.user_attrs.get("steps"),
            "seconds": t.user_attrs.get("seconds"),
        }
        row.update({p.key: t.params.get(p.key) for p in sw.params})
        rows.append(row)
    return rows


def best_trial(study):
    """The best finished trial, or None."""
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    return study.best_trial if finished else None


def write_table(rows: list[dict], out: Path) -> list[str]:
    """``trials.csv`` and ``trials.md``; returns the table as text lines (printed)."""
    if not rows:
        return []
    with (out / "trials.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    head = list(rows[0])
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(_cell(r[k]) for k in head) + " |" for r in rows]
    (out / "trials.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return text_table([tuple(head), *[tuple(_cell(r[k]) for k in head) for r in rows]])


def write_plot(study, sw, rows: list[dict], path: Path) -> Path:
    """Left: each trial's metric by step (pruned trials dashed, the best bold); then the final metric against
    each parameter (up to three)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = sw.params[:3]
    fig, axes = plt.subplots(1, 1 + len(shown), figsize=(5 * (1 + len(shown)), 4), dpi=100, squeeze=False)
    best = best_trial(study)
    ax = axes[0][0]
    for row in rows:
        points = eval_records(sw.out / row["folder"] / "metrics.jsonl", sw.metric)
        if not points:
            continue
        is_best = best is not None and row["trial"] == best.number
        style = "--" if row["state"] == "pruned" else "-"
        ax.plot(
            *zip(*points),
            style,
            marker="o",
            markersize=3,
            linewidth=2.5 if is_best else 1,
            label=f"trial {row['trial']}",
        )
    ax.set_xlabel("step")
    ax.set_ylabel(sw.metric)
    ax.set_title("evals by step (pruned: dashed)")
    ax.grid(alpha=0.3)
    if len(rows) <= 12:
        ax.legend(fontsize=7)
    for ax, p in zip(axes[0][1:], shown):
        for state, marker in (("complete", "o"), ("pruned", "x")):
            kept = [r for r in rows if r["state"] == state and r[sw.metric] is not None]
            xs = [str(r[p.key]) if p.kind == "categorical" else r[p.key] for r in kept]
            ax.scatter(
                xs,
                [r[sw.metric] for r in kept],
                marker=marker,
                label="pruned (at its last eval)" if state == "pruned" else state,
            )
        if p.log:
            ax.set_xscale("log")
        ax.set_xlabel(p.key)
        ax.set_ylabel(sw.metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_best(study, sw, cfg_output_dir: str) -> Path | None:
    """``best.yaml``: the config with the best trial's values, resolved and complete (its ``train.output_dir`` the
    config's own, so training it does not write into the sweep)."""
    best = best_trial(study)
    if best is None:
        return None
    sets = [*sw.overrides, *space_overrides(sw.params, best.params), f"train.output_dir={cfg_output_dir}"]
    cfg = load_config(sw.config, sets, echo=lambda *a: None)
    head = [
        f"# vlmtune sweep: the best of {len(study.trials)} trials, trial {best.number} "
        f"({best.user_attrs.get('folder', '')}), {sw.metric} = {best.value:.6g}",
        *(f"#   {k}: {v}" for k, v in best.params.items()),
    ]
    path = sw.out / "best.yaml"
    path.write_text("\n".join(head) + "\n" + config_to_yaml(cfg), encoding="utf-8")
    return path


def write_results(study, sw, cfg) -> None:
    """The table (printed too), the plot and ``best.yaml``."""
    rows = trial_rows(study, sw)
    for line in write_table(rows, sw.out):
        echo(line)
    if rows:
        write_plot(study, sw, rows, sw.out / "sweep.png")
    best = write_best(study, sw, cfg.train.output_dir)
    written = [sw.out / n for n in ("trials.csv", "trials.md", "sweep.png") if rows] + ([best] if best else [])
    if written:
        echo(f"wrote {', '.join(str(p) for p in written)}")
