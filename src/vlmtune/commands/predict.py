"""`vlmtune predict` (an answer for every sample of a data file) and `vlmtune chat` (talk to a checkpoint)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vlmtune.commands.loading import load_checkpoint, load_eval_data, resolve_checkpoint, with_overrides
from vlmtune.eval.generate import GenerationSettings, chat, predict
from vlmtune.tracking import echo


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def generation(args: argparse.Namespace) -> GenerationSettings:
    """The decoding flags shared by predict and chat."""
    return GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )


def predict_command(args: argparse.Namespace) -> int:
    """``vlmtune predict --checkpoint DIR --data D --out F``: one JSON line per sample."""
    model, processor, saved = load_checkpoint(
        resolve_checkpoint(args.checkpoint)[0], device(), trust_remote_code=args.trust_remote_code
    )
    cfg = with_overrides(saved, [])
    items = load_eval_data(cfg, args.data, processor, args.limit)
    records = predict(model, processor, items, Path(args.out), generation(args), args.batch_size)
    echo(f"wrote {len(records)} predictions to {args.out}")
    return 0


def chat_command(args: argparse.Namespace) -> int:
    """``vlmtune chat --checkpoint DIR``: '/image PATH' attaches an image file, '/video PATH' a video (sampled and
    sized by the checkpoint's data settings)."""
    model, processor, saved = load_checkpoint(
        resolve_checkpoint(args.checkpoint)[0], device(), trust_remote_code=args.trust_remote_code
    )
    chat(model, processor, generation(args), data=with_overrides(saved, []).data)
    return 0
