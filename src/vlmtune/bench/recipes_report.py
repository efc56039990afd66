"""The recipe study's summary (``vlmtune.bench.recipes``): per task, each variant's figures at every eval step, as
the mean and spread over seeds, in Markdown."""

from __future__ import annotations

import statistics

FIGURES = (("eval/exact_match", "exact match"), ("eval_loss", "answer loss"), ("eval/ablation_gap_other", "gap"))


def _stat(values: list[float]) -> str:
    """Mean ± sample standard deviation (± 0 for one seed); "-" where no run has the figure."""
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {spread:.3f}"


def _mean(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f}" if values else "-"


def _at(runs: list[list[dict]], step: int, key: str) -> list[float]:
    return [float(r[key]) for run in runs for r in run if r["step"] == step and key in r]


def report(results: dict, base_level: dict, seeds: int, base: str = "") -> str:
    """``results``: task -> (factor, level) -> one list of eval records per seed; ``base``: the base's folder name."""
    lines = ["# The article's advice, measured", ""]
    if base:
        lines += [f"Fine-tuned from the builtin base `{base}`.", ""]
    lines += [f"{seeds} seeds per variant; mean ± standard deviation over seeds. `gap`: the image-ablation gap (answer"]
    lines += ["loss with another sample's image minus with its own). The baseline is each factor's first level.", ""]
    for task, variants in results.items():
        steps = sorted({r["step"] for runs in variants.values() for run in runs for r in run})
        last = steps[-1]
        lines += [f"## Task `{task}`", ""]
        head = ["factor", "level"] + [f"{name} @{last}" for _, name in FIGURES]
        head += [f"exact match @{s}" for s in steps[:-1]]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for (factor, level), runs in variants.items():
            shown = base_level.get(factor, level) if factor == "baseline" else level
            row = [factor, shown] + [_stat(_at(runs, last, key)) for key, _ in FIGURES]
            row += [_mean(_at(runs, s, "eval/exact_match")) for s in steps[:-1]]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)
