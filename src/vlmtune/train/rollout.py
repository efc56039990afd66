"""GRPO's rollouts: prompts from checked samples, a group of sampled completions per prompt, and the rows that score
them.

A GRPO sample is an ordinary conversation: the model answers its prompt (every turn before the last answer) and the
last answer is the reference the rewards compare with. ``Prompts`` wraps the checked dataset and gives each
sample's generation prompt (built as ``vlmtune predict`` builds it), its reference and metadata. ``sample`` draws
``group_size`` completions per prompt with transformers' ``generate`` (one batched call, KV cache), each seeded
from the run's seed, the optimizer step, its sample and its place in the group, so a resumed run (or one on another
number of processes) draws the same completions; ``rows`` lays
prompts and completions out for the scoring forward, each sample's images encoded once for its whole group where
the family allows (``vlmtune.train.logps``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from vlmtune.data.collate import IGNORE, PER_TOKEN
from vlmtune.data.counted import counts_image_tokens, temporal_patch
from vlmtune.data.dataset import VLMDataset
from vlmtune.data.media import load_images, load_videos
from vlmtune.data.pairs import IMAGES_PER_SAMPLE, ROW_SOURCE, SAMPLE_INDEX, VIDEOS_PER_SAMPLE, media_counts
from vlmtune.eval.alignment import token_ids, video_token_id
from vlmtune.eval.generate import eos_token_ids, left_padded, prompt_features, prompt_messages

FEATURES = "prompt_features"
"""Batch key: each sample's prompt features (token ids and pixel inputs), as ``prompt_features`` makes them."""


class Prompts(Dataset):
    """A checked dataset's samples as generation prompts (augmented like training images), with references."""

    def __init__(self, ds: VLMDataset):
        self.ds = ds
        self.processor = ds.processor
        self.report = ds.report
        self.split = ds.split

    def __len__(self) -> int:
        return len(self.ds)

    def lengths(self) -> list[int]:
        return self.ds.lengths()

    def source_ids(self) -> list[int]:
        return self.ds.source_ids()

    def set_epoch(self, epoch: int) -> None:
        self.ds.set_epoch(epoch)

    def samples(self):
        return self.ds.samples()

    def __getitem__(self, index: int) -> dict:
        item, data = self.ds.items[index], self.ds.data
        images = load_images(item.sample)
        if self.ds.augment is not None:
            images = [self.ds.augment(im, index, self.ds.epoch, k) for k, im in enumerate(images)]
        videos = load_videos(item.sample, data, temporal_patch(self.processor)) if item.sample.videos else []
        features = prompt_features(
            self.processor,
            prompt_messages(item.sample),
            images,
            data.image_min_pixels,
            item.max_pixels,
            videos,
            (data.video_min_pixels, item.video_max_pixels),
        )
        reference = [c for r, c in item.sample.messages if r == "assistant"][-1]
        prompt = next((c for r, c in reversed(prompt_messages(item.sample)) if r == "user"), "")
        meta = {"where": item.sample.where, "images": [str(p) for p in item.sample.images], "index": index}
        return {FEATURES: features, "reference": reference, "prompt": prompt, "metadata": meta, SAMPLE_INDEX: index}


def collate_prompts(items: list[dict]) -> dict:
    """Prompts stay per sample (a group's rows are made from them after sampling)."""
    return {
        FEATURES: [it[FEATURES] for it in items],
        "references": [it["reference"] for it in items],
        "prompts": [it["prompt"] for it in items],
        "metadata": [it["metadata"] for it in items],
        SAMPLE_INDEX: torch.tensor([it[SAMPLE_INDEX] for it in items]),
    }


@dataclass
class Rollout:
    """A batch's groups: ``rows`` (prompt + completion per row, labels on the completion), the completions' text,
    and each row's sample."""

    rows: dict
    completions: list[str]
    lengths: torch.Tensor  # completion tokens per row (up to and including the end-of-answer token)


def row_seeds(seed: int, step: int, index: list[int], group: int) -> list[int]:
    """Each completion's own seed: a function of the run's seed, the optimizer step, the sample and the
    completion's place in its group, so a resumed run, a repeated batch or another number of processes draws
    exactly the same completions."""
    out = []
    for i in index:
        for k in range(group):
            key = f"{seed}:{step}:{i}:{k}".encode()
            out.append(int.from_bytes(hashlib.sha256(key).digest()[:7], "little"))
    return out


class GumbelSampling(LogitsProcessor):
    """Sampling as the argmax of the (temperature-scaled, top-p-filtered) scores plus Gumbel noise: the Gumbel-max
    trick (Gumbel 1954; Maddison et al. 2014, arXiv 1411.0030) gives exactly a draw from softmax(scores). The noise
    of each row comes from that row's seed and the token's position, so a completion does not depend on the rows
    it shares a batch with (generate's own sampling draws every row from one random stream). Written here because
    transformers' sampling takes no per-row generator."""

    def __init__(self, seeds: list[int], prompt_length: int):
        self.seeds = seeds
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        position = input_ids.shape[1] - self.prompt_length
        noise = []
        for seed in self.seeds:
            gen = torch.Generator(device=scores.device).manual_seed((seed + position * 0x9E3779B97F4A7C15) % 2**63)
            noise.append(torch.rand(scores.shape[1], generator=gen, device=scores.device, dtype=torch.float32))
        u = torch.stack(noise).clamp(1e-20, 1.0 - 1e-7)
        return scores.float() - torch.log(-torch.log(u))


def _expanded(features: list[dict], group: int) -> list[dict]:
    return [f for f in features for _ in range(group)]


@torch.no_grad()
def sample(model, processor, batch: dict, cfg, seeds: list[int]) -> Rollout:
    """``cfg.group_size`` completions per prompt (``train.grpo``), each drawn with its own seed (``row_seeds``),
    in eval mode (no dropout)."""
    pad, image_id = token_ids(processor)
    video_id = video_token_id(processor)
    features, group = batch[FEATURES], cfg.group_size
    device = next(model.parameters()).device
    padded = left_padded(_expanded(features, group), pad, image_id, video_id)
    inputs = {k: v.to(device) for k, v in padded.items()}
    eos = eos_token_ids(model, processor)
    training = model.training
    model.eval()
    warpers = [TemperatureLogitsWarper(cfg.temperature)]
    if cfg.top_p < 1.0:
        warpers.append(TopPLogitsWarper(cfg.top_p))
    sampling = LogitsProcessorList([*warpers, GumbelSampling(seeds, inputs["input_ids"].shape[1])])
    try:
        out = model.generate(
            **inputs,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=False,  # the draw is the argmax over Gumbel-perturbed scores (GumbelSampling)
            logits_processor=sampling,
            pad_token_id=pad,
            eos_token_id=eos,
        )
    finally:
        model.train(training)
    prompt_len = inputs["input_ids"].shape[1]
    completion = out[:, prompt_len:]
    ended = torch.isin(completion, torch.tensor(eos, device=completion.device))
    # a completion runs up to and including its first end-of-answer token (all of it when it never ends)
    after = torch.cumsum(ended.long(), dim=1) - ended.long()
    keep = after == 0
    texts = [
        t.strip()
        for t in processor.tokenizer.batch_decode(completion.masked_fill(~keep, pad), skip_special_tokens=True)
    ]
    rows = _rows(processor, features, group, inputs, completion, keep, pad, image_id, video_id)
    return Rollout(rows, texts, keep.sum(dim=1))


def _rows(processor, features, group, inputs, completion, keep, pad, image_id, video_id) -> dict:
    """Prompt + completion rows for the scoring forward; each sample's pixel inputs once (with ``row_source``) for
    a Qwen-VL family, once per row otherwise."""
    ids = torch.cat([inputs["input_ids"], completion.masked_fill(~keep, pad)], dim=1)
    mask = torch.cat([inputs["attention_mask"], keep.long()], dim=1)
    labels = torch.full_like(ids, IGNORE)
    labels[:, inputs["input_ids"].shape[1] :] = completion.masked_fill(~keep, IGNORE)
    rows = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    width = completion.shape[1]
    for key, value in inputs.items():
        if key in ("input_ids", "attention_mask"):
            continue
        if torch.is_tensor(value) and value.shape == inputs["input_ids"].shape:  # per-token inputs
            rows[key] = torch.cat([value, value.new_zeros((value.shape[0], width))], dim=1)
    if counts_image_tokens(processor):
        unique = left_padded(features, pad, image_id, video_id)
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            if key in unique:
                rows[key] = unique[key].to(ids.device)
        counts = [media_counts(f) for f in features]
        rows[ROW_SOURCE] = torch.arange(len(features), device=ids.device).repeat_interleave(group)
        rows[IMAGES_PER_SAMPLE] = torch.tensor([c[0] for c in counts], device=ids.device)
        rows[VIDEOS_PER_SAMPLE] = torch.tensor([c[1] for c in counts], device=ids.device)
    else:
        rows.update({k: v for k, v in inputs.items() if k not in rows and k != PER_TOKEN})
    return rows
