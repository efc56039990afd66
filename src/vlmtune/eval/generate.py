"""Batched answer generation (``vlmtune predict``, the generated-answer metrics) and the ``vlmtune chat`` loop.

Prompts are built by the processor's own chat template with ``add_generation_prompt``, so the model sees
exactly the text it was trained to continue; each image (or video) placeholder becomes as many image (video) tokens
as the processor makes features for it. Batches are left-padded, as decoder-only generation requires.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from vlmtune.config.data import DataConfig
from vlmtune.data.chat import has_video, to_chat
from vlmtune.data.collate import PER_TOKEN, TEXT_KEYS, downscale, pad_cat
from vlmtune.data.counted import (
    counts_image_tokens,
    grid_token_counts,
    process_images,
    process_videos,
    temporal_patch,
    video_refusal,
)
from vlmtune.data.media import load_images, load_videos
from vlmtune.data.sharegpt import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Sample
from vlmtune.data.video import Clip
from vlmtune.eval.alignment import EvalItem, token_ids, video_token_id


@dataclass
class GenerationSettings:
    """How answers are decoded: greedy unless ``do_sample``."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def kwargs(self) -> dict:
        out: dict = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            out.update(temperature=self.temperature, top_p=self.top_p)
        return out


def prompt_messages(sample: Sample) -> list[tuple[str, str]]:
    """The conversation up to (without) its last assistant turn: what the model answers."""
    last = max((i for i, (r, _) in enumerate(sample.messages) if r == "assistant"), default=len(sample.messages))
    return list(sample.messages[:last])


def prompt_features(
    processor,
    messages: list[tuple[str, str]],
    images: list[Image.Image],
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    videos: list[Clip] | None = None,
    video_pixels: tuple[int | None, int | None] = (None, None),
) -> dict:
    """Token ids (and pixel inputs) of ``messages`` followed by the template's assistant-turn opening.

    Raises:
        ValueError: the number of ``<image>`` (``<video>``) placeholders differs from the number of images
            (videos), or the model's processor takes no videos.
    """
    tok = processor.tokenizer
    chat = to_chat(Sample(messages))
    if (videos or has_video(chat)) and (why := video_refusal(processor)) is not None:
        raise ValueError(why)
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    if not counts_image_tokens(processor):  # the family's processor expands the placeholders itself
        if text.count(processor.image_token) != len(images):
            raise ValueError(
                f"the prompt has {text.count(processor.image_token)} '{IMAGE_PLACEHOLDER}' placeholder(s) "
                f"for {len(images)} image(s)"
            )
        if not images:  # text only: the tokenizer (some processors, e.g. PaliGemma's, refuse text without images)
            return {"input_ids": tok(text, add_special_tokens=False)["input_ids"], PER_TOKEN: {}}
        out = processor(
            text=[text], images=downscale(images, max_pixels), add_special_tokens=False, return_tensors="pt"
        )
        ids = out["input_ids"][0].tolist()
        per_token = {
            k: v[0].tolist()
            for k, v in out.items()
            if k not in TEXT_KEYS and torch.is_tensor(v) and v.shape == out["input_ids"].shape
        }
        pixels = {k: v for k, v in out.items() if k not in per_token and k not in TEXT_KEYS}
        return {"input_ids": ids, PER_TOKEN: per_token, **pixels}
    pixels = process_images(processor, images, min_pixels, max_pixels)
    pixels.update(process_videos(processor, videos or [], *video_pixels))
    counts = {processor.image_token: grid_token_counts(processor, pixels)}
    if getattr(processor, "video_token", None):
        counts[processor.video_token] = grid_token_counts(processor, pixels, "video_grid_thw")
    for (token, n), placeholder in zip(counts.items(), (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)):
        if text.count(token) != len(n):
            what = "image" if placeholder == IMAGE_PLACEHOLDER else "video"
            raise ValueError(
                f"the prompt has {text.count(token)} '{placeholder}' placeholder(s) for {len(n)} {what}(s)"
            )
    ids: list[int] = []
    for piece in re.split("(" + "|".join(re.escape(t) for t in counts) + ")", text):
        if piece in counts:
            ids += [tok.convert_tokens_to_ids(piece)] * counts[piece].pop(0)
        elif piece:
            ids += tok(piece, add_special_tokens=False)["input_ids"]
    return {"input_ids": ids, **pixels}


def item_prompt(processor, item: EvalItem) -> dict:
    """The generation prompt of an eval item (its images and videos are all in turns before the answer)."""
    messages = prompt_messages(item.sample)
    return prompt_features(
        processor, messages, item.images, item.min_pixels, item.max_pixels, item.videos, item.video_pixels
    )


def left_padded(features: list[dict], pad_id: int, image_id: int, video_id: int | None = None) -> dict:
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, width - n :] = torch.as_tensor(f["input_ids"])
        mask[i, width - n :] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if any(PER_TOKEN in f for f in features):  # processor-expanded families: their own per-token inputs
        for key in sorted({k for f in features for k in f.get(PER_TOKEN, {})}):
            values = torch.zeros_like(ids)
            for i, f in enumerate(features):
                row = f.get(PER_TOKEN, {}).get(key)
                if row is not None:
                    values[i, width - len(row) :] = torch.as_tensor(row)
            out[key] = values
    else:  # Qwen-VL M-RoPE: which tokens are image (1) or video (2) tokens
        out["mm_token_type_ids"] = (ids == image_id).long()
        if video_id is not None:
            out["mm_token_type_ids"][ids == video_id] = 2
    for key in sorted({k for f in features for k in f} - {"input_ids", PER_TOKEN}):
        out[key] = pad_cat([f[key] for f in features if key in f])
    return out


def eos_token_ids(model, processor) -> list[int]:
    """Every token that ends an answer: the generation config's end-of-sequence tokens and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    eos = [*(eos if isinstance(eos, list) else [eos] if eos is not None else []), processor.tokenizer.eos_token_id]
    return [t for t in dict.fromkeys(eos) if t is not None]


@torch.no_grad()
def generate(
    model, processor, features: list[dict], settings: GenerationSettings, batch_size: int, progress: bool = False
) -> list[str]:
    """Generated answers (special tokens removed, trimmed), one per prompt, in order."""
    from tqdm.auto import tqdm

    tok = processor.tokenizer
    pad, image_id = token_ids(processor)
    eos = eos_token_ids(model, processor)
    device = next(model.parameters()).device
    torch.manual_seed(settings.seed)
    answers: list[str] = []
    starts = range(0, len(features), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress, dynamic_ncols=True):
        padded = left_padded(features[start : start + batch_size], pad, image_id, video_token_id(processor))
        batch = {k: v.to(device) for k, v in padded.items()}
        out = model.generate(**batch, **settings.kwargs(), pad_token_id=pad, eos_token_id=eos)
        new = out[:, batch["input_ids"].shape[1] :]
        answers += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    return answers


def predict(
    model,
    processor,
    items: list[EvalItem],
    out: Path,
    settings: GenerationSettings,
    batch_size: int,
    progress: bool = True,
) -> list[dict]:
    """Generates an answer per item and writes one JSON line per sample: sample, images, prompt, reference,
    prediction. Returns the records."""
    answers = generate(model, processor, [item_prompt(processor, it) for it in items], settings, batch_size, progress)
    records = []
    for it, answer in zip(items, answers):
        prompt = prompt_messages(it.sample)
        records.append(
            {
                "sample": it.sample.where,
                "images": [str(p) for p in it.sample.images],
                **({"videos": [str(p) for p in it.sample.videos]} if it.sample.videos else {}),
                "prompt": prompt[-1][1] if prompt else "",
                "history": [list(m) for m in prompt[:-1]],
                "reference": it.answer,
                "prediction": answer,
            }
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return records


CHAT_HELP = (
    "type a question and press enter; '/image PATH' attaches an image file to your next question, '/video PATH' a "
    "video (a file or a folder of frames); '/reset' starts a new conversation; '/quit' (or end of input) ends"
)


def chat(
    model,
    processor,
    settings: GenerationSettings,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = print,
    data: DataConfig | None = None,
) -> list[tuple[str, str]]:
    """An interactive multi-turn session; returns the last conversation as (role, text) pairs. ``data`` (the
    checkpoint's data settings) says how videos are sampled and sized."""
    data = data or DataConfig()
    video_pixels = (data.video_min_pixels, data.video_max_pixels)
    history: list[tuple[str, str]] = []
    images: list[Image.Image] = []
    videos: list[Clip] = []
    pending: list[Image.Image] = []
    pending_videos: list[Clip] = []
    write(CHAT_HELP)
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            break
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history, images, pending, videos, pending_videos = [], [], [], [], []
            write("(new conversation)")
        elif line.startswith("/image"):
            path = Path(line[len("/image") :].strip()).expanduser()
            try:
                pending += load_images(Sample([], [path], where="chat"))
                write(f"(attached {path}; it goes with your next question)")
            except ValueError as e:
                write(f"cannot use '{path}': {e}. Name an existing image file, e.g. /image photo.png")
        elif line.startswith("/video"):
            path = Path(line[len("/video") :].strip()).expanduser()
            try:
                if (why := video_refusal(processor)) is not None:
                    raise ValueError(why)
                pending_videos += load_videos(Sample([], where="chat", videos=[path]), data, temporal_patch(processor))
                write(f"(attached {path}; it goes with your next question)")
            except ValueError as e:
                write(
                    f"cannot use '{path}': {e}. Name an existing video file or folder of frames, e.g. /video clip.mp4"
                )
        elif line:
            history.append(("user", IMAGE_PLACEHOLDER * len(pending) + VIDEO_PLACEHOLDER * len(pending_videos) + line))
            images, pending = images + pending, []
            videos, pending_videos = videos + pending_videos, []
            feats = prompt_features(processor, history, images, None, None, videos, video_pixels)
            answer = generate(model, processor, [feats], settings, batch_size=1)[0]
            history.append(("assistant", answer))
            write(f"assistant> {answer}")
    return history
