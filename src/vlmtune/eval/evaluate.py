"""Evaluation: language metrics, the alignment measures, the report table / JSON, and the metrics plot.

Language: answer loss and perplexity (teacher-forced, every assistant token, as in training), token
accuracy (argmax = label), and on greedy-generated final answers: exact match, BLEU-4 (sacrebleu) and
ROUGE-1/2/L F1 (rouge-score). Chinese text is split into characters for both (sacrebleu's ``zh``
tokenizer; a rouge-score tokenizer that keeps CJK characters, which its default drops), so the scores work
for Chinese as well as English.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from vlmtune.config.schema import EvalConfig
from vlmtune.eval.alignment import (
    EvalItem,
    caption_retrieval,
    encode,
    eval_items,
    image_ablation,
    mean_loss,
    projector_alignment,
    projector_module,
    score,
)
from vlmtune.eval.generate import GenerationSettings, generate, item_prompt
from vlmtune.model.archs import find_arch
from vlmtune.tracking import text_table

# CJK ideographs and kana; each character is one token (as sacrebleu's zh tokenizer does for Chinese).
_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff])")


class CJKRougeTokenizer:
    """rouge-score's default tokenization (lowercase, alphanumeric words) with every CJK character kept as a token."""

    def tokenize(self, text: str) -> list[str]:
        from rouge_score import tokenize

        tokens: list[str] = []
        for piece in _CJK.split(text):
            if _CJK.fullmatch(piece):
                tokens.append(piece)
            elif piece:
                tokens += tokenize.tokenize(piece, None)
        return tokens


def bleu_tokenizer(texts: list[str]) -> str:
    """sacrebleu tokenizer name: ``zh`` when any text holds CJK characters, else the standard ``13a``."""
    return "zh" if any(_CJK.search(t) for t in texts) else "13a"


def normalize(text: str) -> str:
    """Exact-match normal form: trimmed, inner whitespace collapsed, case-folded."""
    return " ".join(text.split()).casefold()


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Exact match (fraction), corpus BLEU-4 (sacrebleu, 0-100) and mean ROUGE-1/2/L F1 (0-1)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return {}
    bleu = sacrebleu.corpus_bleu(predictions, [references], tokenize=bleu_tokenizer(predictions + references))
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=CJKRougeTokenizer())
    rouge = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(predictions, references):
        for key, value in scorer.score(r, p).items():  # score(target, prediction)
            rouge[key] += value.fmeasure / len(references)
    exact = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) / len(references)
    return {"exact_match": exact, "bleu4": bleu.score, **rouge}


@dataclass
class EvalResult:
    """Metrics (flat floats), notes on what was reduced or skipped, and the generated answers."""

    metrics: dict[str, float]
    notes: list[str] = field(default_factory=list)
    predictions: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    bleu_tokenize: str | None = None


def eval_metrics(
    model,
    processor,
    items: list[EvalItem],
    cfg: EvalConfig,
    generate_answers: bool = True,
    arch=None,
    progress: bool = False,
) -> EvalResult:
    """Every metric on ``items``; the model is put in eval mode and its mode restored afterwards.

    Raises:
        ValueError: no items, or the projector cannot be found in the model (alignment on).
    """
    if not items:
        raise ValueError("no eval samples to evaluate")
    was_training = model.training
    model.eval()
    single = [i for i, it in enumerate(items) if len(it.images) == 1 and not it.videos]
    projector = projector_module(model, arch or find_arch(model.config.model_type)) if cfg.alignment else None
    true = score(model, processor, [encode(processor, it) for it in items], cfg.batch_size, projector)
    loss = mean_loss(true)
    tokens = sum(s.tokens for s in true)
    metrics = {
        "samples": float(len(items)),
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "token_accuracy": sum(s.correct for s in true) / max(1, tokens),
    }
    result = EvalResult(metrics)
    if generate_answers:
        settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens)
        prompts = [item_prompt(processor, it) for it in items]
        result.predictions = generate(model, processor, prompts, settings, cfg.batch_size, progress)
        result.references = [it.answer for it in items]
        result.bleu_tokenize = bleu_tokenizer(result.predictions + result.references)
        metrics.update(text_metrics(result.predictions, result.references))
    if cfg.alignment:
        if len(single) < len(items):
            result.notes.append(
                f"alignment measured on the {len(single)} single-image samples (without videos) of {len(items)}"
            )
        one = [items[i] for i in single]
        if one:
            metrics["alignment_samples"] = float(len(one))
            metrics.update(image_ablation(model, processor, one, [true[i] for i in single], cfg.batch_size))
            retrieval, notes = caption_retrieval(model, processor, one, cfg.retrieval_k, cfg.batch_size)
            metrics.update(retrieval)
            result.notes += notes
            metrics.update(projector_alignment(model, processor, one, [true[i].pooled for i in single]))
    model.train(was_training)
    return result


def eval_record(
    model, processor, data, cfg: EvalConfig, accelerator=None, arch=None, generate_answers: bool | None = None
) -> dict[str, float]:
    """Training-time evaluation: every metric as ``{"eval/<name>": float}``.

    Args:
        model: a plain or peft model, possibly wrapped by accelerate (``accelerator`` unwraps it).
        processor: its processor.
        data: a VLMDataset (its length-checked samples and pixel bounds) or a list of Samples.
        cfg: the run's ``eval`` settings; ``cfg.samples`` caps the samples used.
        accelerator: the run's Accelerator, if the model is wrapped by it. No collective calls are made:
            call this on the main process only, or on every process (each computes the same).
        arch: the registry entry (``vlmtune.model.load.arch_for``); found from ``model.config`` if None.
        generate_answers: generate for exact match / BLEU / ROUGE; None means ``cfg.generate_in_training``.
    """
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    gen = cfg.generate_in_training if generate_answers is None else generate_answers
    result = eval_metrics(model, processor, eval_items(data, cfg.samples), cfg, gen, arch)
    return {f"eval/{k}": float(v) for k, v in result.metrics.items()}


# name, label, chance/baseline key or text, format: the text table here and the run report (vlmtune.report)
METRIC_ROWS = [
    ("loss", "answer loss (nats per answer token)", None, ".4f"),
    ("perplexity", "perplexity", None, ".3f"),
    ("token_accuracy", "token accuracy (teacher-forced)", None, ".3f"),
    ("exact_match", "exact match (generated)", None, ".3f"),
    ("preference_accuracy", "preference accuracy (chosen more likely)", "0.5", ".3f"),
    ("rewards/accuracy", "reward accuracy (vs the reference)", None, ".3f"),
    ("rewards/margin", "reward margin (chosen - rejected)", None, "+.4f"),
    ("reward", "mean reward of greedy answers", None, ".3f"),
    ("bleu4", "BLEU-4 (sacrebleu, 0-100)", None, ".2f"),
    ("rouge1", "ROUGE-1 F1", None, ".3f"),
    ("rouge2", "ROUGE-2 F1", None, ".3f"),
    ("rougeL", "ROUGE-L F1", None, ".3f"),
    ("ablation_loss_true", "answer loss, true image", None, ".4f"),
    ("ablation_loss_blank", "answer loss, blank image", None, ".4f"),
    ("ablation_loss_other", "answer loss, another sample's image", None, ".4f"),
    ("ablation_gap_blank", "image-ablation gap, blank", "0 (image ignored)", "+.4f"),
    ("ablation_gap_other", "image-ablation gap, other image", "0 (image ignored)", "+.4f"),
    ("retrieval_r1", "retrieval recall@1, image->answer", "retrieval_r1_chance", ".3f"),
    ("retrieval_mean_rank", "retrieval mean rank", "retrieval_mean_rank_chance", ".3f"),
    ("projector_cos_matched", "projector-answer cosine, matched", "projector_cos_mismatched", "+.4f"),
    ("projector_cos_gap", "projector-answer cosine, matched - mismatched", "0 (no alignment)", "+.4f"),
]


def report_table(metrics: dict[str, float]) -> str:
    """The metrics as a text table: metric, value, chance or baseline level."""
    m = {k.removeprefix("eval/"): v for k, v in metrics.items()}
    rows = [("metric", "value", "chance / baseline")]
    for key, label, base, fmt in METRIC_ROWS:
        if key not in m:
            continue
        if key == "retrieval_r1":
            label += f" (K={int(m.get('retrieval_k', 0))})"
        ref = format(m[base], fmt) if base in m else (base if base and " " in base else "-")
        rows.append((label, format(m[key], fmt), ref))
    return "\n".join(text_table(rows))


def write_report(result: EvalResult, out: Path, meta: dict) -> Path:
    """The JSON report: ``meta`` (checkpoint, data, ...), metrics, notes, and each sample's prediction."""
    report = {
        **meta,
        "metrics": result.metrics,
        "notes": result.notes,
        "bleu_tokenize": result.bleu_tokenize,
        "predictions": [{"reference": r, "prediction": p} for r, p in zip(result.references, result.predictions)],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


_PANELS = [
    ("loss", ["loss", "eval_loss", "eval/loss"]),
    ("answers", ["eval/token_accuracy", "eval/exact_match", "eval/rouge1", "eval/rougeL"]),
    ("retrieval recall@1 vs chance", ["eval/retrieval_r1", "eval/retrieval_r1_chance"]),
    ("image-ablation gap (0 = image ignored)", ["eval/ablation_gap_blank", "eval/ablation_gap_other"]),
]


def plot_metrics(metrics_jsonl: Path, out: Path) -> Path:
    """Metrics over training from a run's ``metrics.jsonl`` (one JSON object per line with a ``step``), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=100)
    for ax, (title, keys) in zip(axes.flat, _PANELS):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r and "step" in r]
            if points:
                style = "--" if key.endswith("_chance") else ("-" if key == "loss" else "o-")
                ax.plot(*zip(*points), style, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
