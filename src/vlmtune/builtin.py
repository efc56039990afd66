"""The builtin base model: a tiny Qwen2-VL pretrained by vlmtune itself on generated shapes data.

LoRA cannot teach a randomly initialised model (a frozen random lm_head and final norm keep the
logits near uniform: answer loss 8.28 -> 7.19 in 300 steps, see MEASUREMENTS.md), so the base is
pretrained like a real VLM: every group fully trained on a mixture of caption / shape / size / position
questions whose vocabulary also covers the held-out fine-tuning task (the colour question). The build is
deterministic and cached under ``$VLMTUNE_CACHE/builtin/`` (default ~/.cache/vlmtune).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from vlmtune.data.dataset import cache_dir

# Bump when anything below changes, so cached bases from another recipe are not reused.
RECIPE_VERSION = 2
PRETRAIN = {
    "model": {"dtype": "float32"},
    "groups": {g: {"mode": "full"} for g in ("vision_tower", "projector", "language_model", "lm_head")},
    "data": {"train": "builtin:shapes:pretrain", "builtin_train_samples": 2048, "max_length": 256},
    "train": {"max_steps": 400, "batch_size": 16, "learning_rate": 1e-3, "warmup_steps": 20,
              "scheduler": "cosine", "weight_decay": 0.0, "seed": 0, "logging_steps": 25,
              # Shuffled batches: grouped by length, a batch holds one task (lengths follow the task) and the
              # base never learns to use the image (answer loss 0.49 with its own image and with another's).
              "group_by_length": False},
}


def base_dir() -> Path:
    """Where the builtin base lives once built."""
    return cache_dir() / "builtin" / f"tiny-qwen2-vl-v{RECIPE_VERSION}"


def write_random_init(out: Path) -> Path:
    """The untrained tiny Qwen2-VL, its tokenizer and processor, as a model folder (seeded)."""
    from transformers import Qwen2VLForConditionalGeneration

    from vlmtune.shapes import corpus_texts
    from vlmtune.tiny_qwen import build_processor, build_tokenizer, tiny_config

    tokenizer = build_tokenizer(corpus_texts())
    processor = build_processor(tokenizer)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(tiny_config(tokenizer))
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def ensure_base(echo=print) -> Path:
    """Returns the builtin base's folder, building it first if it is not cached (about a minute on 2 cores)."""
    final = base_dir()
    if (final / "model.safetensors").is_file():
        return final
    from vlmtune.config import deep_merge, Config
    from vlmtune.train import train

    work = final.with_name(final.name + ".build")
    if work.exists():
        shutil.rmtree(work)
    echo(f"building the builtin base model once (cached in {final}) ...")
    init = write_random_init(work / "init")
    cfg = Config.model_validate(deep_merge(PRETRAIN, {
        "model": {"path": str(init)},
        "train": {"output_dir": str(work / "run"), "progress_bar": False},
    }))
    result = train(cfg)
    shutil.copy(work / "run" / "metrics.jsonl", result.final_dir / "pretrain_metrics.jsonl")
    if final.exists():
        shutil.rmtree(final)
    result.final_dir.rename(final)
    shutil.rmtree(work, ignore_errors=True)
    echo(f"builtin base ready: {final} (pretraining loss {result.last_loss:.3f})")
    return final
