"""`vlmtune data check`: reads every sample, reports every problem by place, then a summary table.

It runs the checks training runs (``dataset.check_sample``, and ``kinds.method_problems`` for each stage's method:
a DPO stage needs pairs, a KTO stage labelled answers), streamed: one record and one image at a time, so 100k
samples cost their token lengths in memory, never their images.
"""

from __future__ import annotations

import json
from array import array
from collections import Counter
from dataclasses import dataclass, field

from vlmtune.config.schema import Config
from vlmtune.config.stages import resolve_stages
from vlmtune.data.dataset import check_sample
from vlmtune.data.index import record_count
from vlmtune.data.kinds import SAMPLE_KINDS, method_problems, sample_kind
from vlmtune.data.sharegpt import KINDS, WARNING_KINDS, DataError, DuplicateFinder, Problem
from vlmtune.data.sources import entries, iter_split, resolve
from vlmtune.tracking import text_table


@dataclass
class SplitCheck:
    """What checking one split found."""

    split: str
    samples: int = 0  # records read, good or bad
    images: int = 0
    problems: list[Problem] = field(default_factory=list)
    lengths: array = field(
        default_factory=lambda: array("l")
    )  # tokens of each measurable sample, image tokens included
    image_tokens: array = field(default_factory=lambda: array("l"))
    over: Counter = field(default_factory=Counter)  # over max_length, by what data.too_long does to them
    kinds: Counter = field(default_factory=Counter)  # samples read by kind: sft, pair, labelled (kinds.sample_kind)
    method: str = "sft"  # the method the split was checked for

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.is_error]

    def by_kind(self) -> Counter:
        return Counter(p.kind for p in self.problems)


def _total(specs, cfg: Config, split: str) -> int | None:
    """Records to read, for the progress bar: from each JSONL file's saved index (``vlmtune.data.index``), else its
    lines; None when a source is not JSONL; unresolved sources count 0."""
    total = 0
    for entry in entries(specs):
        try:
            source = resolve(entry, cfg.data, split)
        except DataError:
            continue
        counts = [record_count(path) for path in source.files]
        if None in counts:
            return None
        total += min(sum(counts), source.max_samples or sum(counts))
    return total


def check_split(
    specs: str | list[str],
    cfg: Config,
    processor,
    split: str,
    duplicates: DuplicateFinder,
    progress: bool = True,
    label: str | None = None,
) -> SplitCheck:
    """Checks every sample of one split (``train`` or ``eval``; ``label`` names it in the report, default the split);
    images are opened one at a time and never kept."""
    from tqdm.auto import tqdm

    out = SplitCheck(label or split, method=cfg.train.method)
    bar = tqdm(
        total=_total(specs, cfg, split),
        desc=f"check {label or split}",
        unit="sample",
        disable=not progress,
        dynamic_ncols=True,
    )
    last = None
    for got in iter_split(specs, cfg.data, split, duplicates):
        where = got.where
        if not (isinstance(got, Problem) and got.whole_file) and where != last:
            out.samples += 1
            bar.update(1)
        last = where
        if isinstance(got, Problem):
            out.problems.append(got)
            continue
        out.images += len(got.images)
        out.kinds[sample_kind(got)] += 1
        out.problems += method_problems(got, cfg.train.method)
        checked = check_sample(got, processor, cfg.data)
        out.problems += checked.problems
        if checked.length is not None:
            out.lengths.append(checked.length)
            out.image_tokens.append(checked.image_tokens)
            if checked.outcome != "kept":
                out.over[checked.outcome] += 1
    bar.close()
    return out


def check_data(cfg: Config, processor, progress: bool = True) -> list[SplitCheck]:
    """Checks the train split and, if set, the eval split (an eval sample repeating a train one is a duplicate), of
    the top level and of every stage whose data settings or method differ (the splits are then named
    ``STAGE:train``), each sample against its stage's method."""
    checks, seen = [], set()
    stages = resolve_stages(cfg)
    for stage in stages:
        scfg = stage.cfg
        key = json.dumps([scfg.data.model_dump(mode="json"), scfg.train.method], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        prefix = f"{stage.name}:" if len(stages) > 1 and checks else ""
        duplicates = DuplicateFinder()
        checks.append(check_split(scfg.data.train, scfg, processor, "train", duplicates, progress, f"{prefix}train"))
        if scfg.data.eval:
            checks.append(check_split(scfg.data.eval, scfg, processor, "eval", duplicates, progress, f"{prefix}eval"))
    return checks


def _percentile(values: list[int], q: float) -> int:
    return values[min(len(values) - 1, int(q * len(values)))]


def summary_lines(checks: list[SplitCheck], cfg: Config) -> list[str]:
    """The summary: samples, images, problems by kind, token lengths (image tokens included), over max_length."""
    lines = ["summary"]
    lines += text_table(
        [("split", "samples", "images", "errors", "warnings")]
        + [(c.split, c.samples, c.images, len(c.errors), len(c.problems) - len(c.errors)) for c in checks]
    )
    kinds = [k for k in KINDS if any(c.by_kind()[k] for c in checks)]
    if kinds:
        lines += ["", "problems by kind"]
        lines += text_table(
            [("kind", *(c.split for c in checks), "severity")]
            + [(k, *(c.by_kind()[k] for c in checks), "warning" if k in WARNING_KINDS else "error") for k in kinds]
        )
    if any(set(c.kinds) - {"sft"} or c.method != "sft" for c in checks):
        lines += ["", "samples by kind (sft: one answer; pair: chosen and rejected; labelled: a KTO label)"]
        lines += text_table(
            [("split", "method", *SAMPLE_KINDS)]
            + [(c.split, c.method, *(c.kinds[k] for k in SAMPLE_KINDS)) for c in checks]
        )
    limit = cfg.data.max_length
    lines += ["", f"token length, image tokens included (samples without errors), against data.max_length={limit}"]
    rows = [("split", "measured", "min", "p50", "p90", "p99", "max", "mean", "image tokens mean", f"over {limit}")]
    for c in checks:
        values = sorted(c.lengths)
        if not values:
            rows.append((c.split, 0, "-", "-", "-", "-", "-", "-", "-", 0))
            continue
        over = sum(c.over.values())
        what = ", ".join(f"{n} {k}" for k, n in sorted(c.over.items()))
        rows.append(
            (
                c.split,
                len(values),
                values[0],
                _percentile(values, 0.5),
                _percentile(values, 0.9),
                _percentile(values, 0.99),
                values[-1],
                f"{sum(values) / len(values):.1f}",
                f"{sum(c.image_tokens) / len(values):.1f}",
                f"{over} ({what}; data.too_long={cfg.data.too_long})" if over else 0,
            )
        )
    lines += text_table(rows)
    return lines
