"""Scoring answers under chosen images, and the three vision-language alignment measures built on it.

Every measure compares the model with itself under controlled changes of the image, so each has a level
that a model ignoring the image would show:

- image-ablation gap: answer loss with a blank image, or another sample's image, minus the loss with the
  true image (a model that ignores the image: 0);
- caption retrieval: in groups of K samples, each image ranks the group's distinct answers by their
  log-likelihood under that image (a uniform random ranker: recall@1 = 1/candidates, mean rank = (n+1)/2);
- projector alignment: cosine similarity of an image's pooled projector output with the input embedding of
  its own answer, against other samples' answers.

Alignment uses single-image samples without videos; an ablated or foreign image is resized to the true image's size,
so the token layout stays identical and only the pixels differ.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn

from vlmtune.config.data import DataConfig
from vlmtune.data.chat import IGNORE, to_chat
from vlmtune.data.collate import PER_TOKEN, collate, encode_example
from vlmtune.data.counted import temporal_patch
from vlmtune.data.media import load_images, load_videos
from vlmtune.data.sharegpt import Sample
from vlmtune.data.video import Clip
from vlmtune.model.archs import ArchSpec
from vlmtune.model.groups import assign_groups, pattern_match_length, strip_peft_prefix

BLANK_RGB = (255, 255, 255)  # the "blank image": white, the same size as the true image


@dataclass
class EvalItem:
    """One eval sample with its decoded images and videos and its reference (the last assistant turn)."""

    sample: Sample
    images: list[Image.Image]
    min_pixels: int | None = None
    max_pixels: int | None = None
    videos: list[Clip] = field(default_factory=list)
    video_pixels: tuple[int | None, int | None] = (None, None)  # (min, max) pixels of each frame

    @property
    def answer(self) -> str:
        return [c for r, c in self.sample.messages if r == "assistant"][-1]


@dataclass
class Score:
    """Answer tokens of one sequence: summed log-probability, count, count predicted right (argmax)."""

    logprob: float
    tokens: int
    correct: int
    pooled: torch.Tensor | None = None  # mean projector output over the sequence's image tokens


def eval_items(data, limit: int | None = None) -> list[EvalItem]:
    """A VLMDataset (its length-checked samples and pixel bounds) or a list of Samples -> EvalItems.

    Raises:
        ValueError: an image or video cannot be decoded; names the sample and the path.
    """
    if hasattr(data, "items") and hasattr(data, "data"):
        cfg, multiple = data.data, temporal_patch(data.processor)
        rows = [(it.sample, cfg.image_min_pixels, it.max_pixels, it.video_max_pixels) for it in data.items]
    else:
        cfg, multiple = DataConfig(), 2
        rows = [(s, None, None, None) for s in data]
    return [
        EvalItem(s, load_images(s), lo, hi, load_videos(s, cfg, multiple), (cfg.video_min_pixels, video_hi))
        for s, lo, hi, video_hi in rows[:limit]
    ]


def encode(processor, item: EvalItem, images: list[Image.Image] | None = None, answer: str | None = None) -> dict:
    """Model inputs of ``item``'s conversation, optionally with other images or another final answer.

    Labels cover every assistant turn (as in training); an ``answer`` replaces the last one.
    """
    messages = list(item.sample.messages)
    if answer is not None:
        last = max(i for i, (r, _) in enumerate(messages) if r == "assistant")
        messages[last] = ("assistant", answer)
    images = item.images if images is None else images
    chat = to_chat(Sample(messages, item.sample.images, item.sample.where))
    enc, per_token, pixels = encode_example(
        processor, chat, images, item.min_pixels, item.max_pixels, item.videos, item.video_pixels
    )
    extra = {PER_TOKEN: per_token} if per_token is not None else {}
    return {"input_ids": enc.input_ids, "labels": enc.labels, **extra, **pixels}


def token_ids(processor) -> tuple[int, int]:
    """(pad id, image token id) of a processor."""
    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return pad, tok.convert_tokens_to_ids(processor.image_token)


def video_token_id(processor) -> int | None:
    """The video token's id, or None for a processor without one."""
    token = getattr(processor, "video_token", None)
    return processor.tokenizer.convert_tokens_to_ids(token) if token else None


def projector_module(model: nn.Module, arch: ArchSpec) -> nn.Module:
    """The projector's root module, found from the registry entry's patterns (any layout, peft-wrapped or not).

    Raises:
        ValueError: no module path matches the entry's projector patterns.
    """
    gmap = assign_groups([n for n, _ in model.named_parameters()], arch)
    patterns = gmap.layout.patterns["projector"]
    for name, module in model.named_modules():
        parts = strip_peft_prefix(name).split(".")
        if any(len(p.split(".")) == len(parts) == pattern_match_length(p, ".".join(parts)) for p in patterns):
            return module
    raise ValueError(f"no module matches the projector patterns {list(patterns)} of entry '{arch.name}'")


@contextmanager
def capture_outputs(module: nn.Module | None) -> Iterator[list[torch.Tensor]]:
    """Collects ``module``'s forward outputs while the block runs (a forward hook, removed afterwards)."""
    outputs: list[torch.Tensor] = []
    if module is None:
        yield outputs
        return
    handle = module.register_forward_hook(
        lambda _m, _i, out: outputs.append((out[0] if isinstance(out, tuple) else out).detach().float())
    )
    try:
        yield outputs
    finally:
        handle.remove()


def _pool(out: torch.Tensor, per_row: list[int]) -> list[torch.Tensor | None]:
    """Mean projector output per sequence: (tokens, dim) split by image tokens per row, or (images, tokens, dim)."""
    if out.dim() == 3:
        rows = list(out.mean(dim=1))
        return [rows.pop(0) if n else None for n in per_row]
    pieces = list(torch.split(out, per_row))
    return [p.mean(dim=0) if len(p) else None for p in pieces]


@torch.no_grad()
def score(model, processor, features: list[dict], batch_size: int, projector: nn.Module | None = None) -> list[Score]:
    """Log-likelihood of the labelled answer tokens of each sequence (teacher-forced), in batches."""
    pad, image_id = token_ids(processor)
    device = next(model.parameters()).device
    scores: list[Score] = []
    for start in range(0, len(features), batch_size):
        batch = collate(features[start : start + batch_size], pad, image_id, video_token_id(processor))
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")[:, 1:]
        with capture_outputs(projector) as captured:
            logits = model(**batch).logits[:, :-1].float()
        mask = labels != IGNORE
        logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        right = (logits.argmax(-1) == labels) & mask
        pooled = [None] * len(labels)
        if captured and ("pixel_values" in batch or "pixel_values_videos" not in batch):
            # with videos too, the images' projector output comes first and the videos' after it
            out = captured[0] if "pixel_values_videos" in batch else torch.cat(captured)
            pooled = _pool(out, (batch["input_ids"] == image_id).sum(1).tolist())
        for i in range(len(labels)):
            scores.append(Score(float((logp[i] * mask[i]).sum()), int(mask[i].sum()), int(right[i].sum()), pooled[i]))
    return scores


def mean_loss(scores: list[Score]) -> float:
    """Answer loss: negative log-likelihood per answer token, over all sequences."""
    return -sum(s.logprob for s in scores) / max(1, sum(s.tokens for s in scores))


def _other_index(items: list[EvalItem], i: int) -> int:
    """The next sample (cyclically) whose answer differs from sample i's, else simply the next one."""
    n = len(items)
    for step in range(1, n):
        if items[(i + step) % n].answer != items[i].answer:
            return (i + step) % n
    return (i + 1) % n


def image_ablation(model, processor, items: list[EvalItem], true: list[Score], batch_size: int) -> dict[str, float]:
    """Answer loss with the true image vs. a blank image vs. another sample's image (baseline gap: 0).

    ``true`` holds the scores of ``items`` with their own images (already computed for the language metrics).
    """
    blank = [encode(processor, it, [Image.new("RGB", it.images[0].size, BLANK_RGB)]) for it in items]
    other = [
        encode(processor, it, [items[_other_index(items, i)].images[0].resize(it.images[0].size)])
        for i, it in enumerate(items)
    ]
    loss_true = mean_loss(true)
    loss_blank = mean_loss(score(model, processor, blank, batch_size))
    loss_other = mean_loss(score(model, processor, other, batch_size))
    return {
        "ablation_loss_true": loss_true,
        "ablation_loss_blank": loss_blank,
        "ablation_loss_other": loss_other,
        "ablation_gap_blank": loss_blank - loss_true,
        "ablation_gap_other": loss_other - loss_true,
    }


def rank_metrics(scores: torch.Tensor, truth: list[int]) -> dict[str, float]:
    """Recall@1 and mean rank of the true candidate of each row of a (queries, candidates) score matrix.

    Ties share credit as under a random tie-break: rank = 1 + better + tied / 2, recall@1 = 1 / (1 + tied)
    when nothing is better. Chance is a uniform random ranking: 1 / candidates and (candidates + 1) / 2.
    """
    r1, ranks = [], []
    for row, t in zip(scores, truth):
        better = int((row > row[t]).sum())
        tied = int((row == row[t]).sum()) - 1
        ranks.append(1 + better + tied / 2)
        r1.append(1.0 / (1 + tied) if better == 0 else 0.0)
    n = scores.shape[1]
    return {
        "r1": sum(r1) / len(r1),
        "mean_rank": sum(ranks) / len(ranks),
        "r1_chance": 1.0 / n,
        "mean_rank_chance": (n + 1) / 2,
    }


def caption_retrieval(
    model, processor, items: list[EvalItem], k: int, batch_size: int
) -> tuple[dict[str, float], list[str]]:
    """Image-to-answer retrieval in consecutive groups of ``k`` samples; returns (metrics, notes).

    Each image scores every distinct answer of its group (its own conversation with the final answer
    replaced) by log-likelihood. A ``k`` above the number of samples is reduced to it, and noted; a last
    group of fewer than ``k`` samples is left out.
    """
    notes: list[str] = []
    if len(items) < 2:
        return {}, [f"caption retrieval skipped: needs at least 2 single-image samples, found {len(items)}"]
    if k > len(items):
        notes.append(f"retrieval K reduced from {k} to {len(items)} (the number of single-image eval samples)")
        k = len(items)
    totals = {"r1": 0.0, "mean_rank": 0.0, "r1_chance": 0.0, "mean_rank_chance": 0.0}
    groups = [items[i : i + k] for i in range(0, len(items) - k + 1, k)]
    for group in groups:
        answers = list(dict.fromkeys(it.answer for it in group))
        feats = [encode(processor, it, answer=a) for it in group for a in answers]
        lp = torch.tensor([s.logprob for s in score(model, processor, feats, batch_size)]).view(
            len(group), len(answers)
        )
        for key, value in rank_metrics(lp, [answers.index(it.answer) for it in group]).items():
            totals[key] += value * len(group)
    n = len(groups) * k
    if n < len(items):
        notes.append(f"caption retrieval used {n} of {len(items)} samples ({len(groups)} groups of {k})")
    return {"retrieval_k": float(k), **{f"retrieval_{key}": v / n for key, v in totals.items()}}, notes


@torch.no_grad()
def projector_alignment(model, processor, items: list[EvalItem], pooled: list[torch.Tensor]) -> dict[str, float]:
    """Cosine similarity of each image's pooled projector output with the mean input embedding of its own
    answer (matched) and of the other distinct answers (mismatched; the baseline)."""
    answers = list(dict.fromkeys(it.answer for it in items))
    if len(answers) < 2:
        return {}
    embed = model.get_input_embeddings()
    device = embed.weight.device
    vectors = []
    for a in answers:
        ids = processor.tokenizer(a, add_special_tokens=False)["input_ids"]
        vectors.append(embed(torch.tensor(ids, device=device)).float().mean(dim=0))
    cos = torch.nn.functional.cosine_similarity(
        torch.stack(pooled).unsqueeze(1).to(device), torch.stack(vectors).unsqueeze(0), dim=-1
    )
    truth = torch.tensor([answers.index(it.answer) for it in items], device=device)
    matched_mask = torch.zeros_like(cos, dtype=torch.bool)
    matched_mask[torch.arange(len(items)), truth] = True
    matched, mismatched = float(cos[matched_mask].mean()), float(cos[~matched_mask].mean())
    return {
        "projector_cos_matched": matched,
        "projector_cos_mismatched": mismatched,
        "projector_cos_gap": matched - mismatched,
    }
