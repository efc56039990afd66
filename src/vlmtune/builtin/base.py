"""The builtin base model: a tiny Qwen2-VL pretrained by vlmtune itself on generated shapes data.

LoRA cannot teach a randomly initialised model (a frozen random lm_head and final norm keep the
logits near uniform: answer loss 8.28 -> 7.19 in 300 steps, measured on the tiny Qwen2-VL), so the base is
pretrained like a real VLM, in two stages: its vision tower and merger first, as an image classifier of the scenes'
attributes (``vlmtune.builtin.tower``, like the CLIP or SigLIP tower a real VLM starts from); then, with them frozen,
the language model and lm_head on a mixture of caption / shape / size / position questions whose vocabulary also
covers the held-out fine-tuning task (the colour question). The build is deterministic and cached under
``$VLMTUNE_CACHE/builtin/`` (default ~/.cache/vlmtune).

Building the base runs the training recipe, so this module sits above it, with the commands: they resolve
``model.path: builtin:tiny-qwen2-vl`` through ``model_folder`` and hand that function to the recipe.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from vlmtune.builtin.tower import pretrain_tower
from vlmtune.config.overrides import deep_merge
from vlmtune.config.schema import BUILTIN_MODEL, Config, ModelConfig
from vlmtune.data.shapes import corpus_texts
from vlmtune.model.tiny_qwen import build_processor, build_tokenizer, tiny_config
from vlmtune.paths import cache_dir
from vlmtune.train.recipe import train

# Bump when anything below changes, so cached bases from another recipe are not reused.
RECIPE_VERSION = 5
# Patch 8 on 64-pixel images (8 x 8 patches), each 4 x 4 square of patches merged into one image token: one token per
# quadrant, and a shape never leaves its quadrant, so one token holds the whole shape and the other three the
# background. The language model then reads the shape from the tokens' mean (what attention starts as). With 16
# tokens (merge 2) a shape spans several tokens at varying places, and the same two-stage recipe read the shape at
# 0.75 (tower and merger frozen) or 0.50-0.59 (trained on), against 1.0 with this merge (probe, bench/BASE.md).
MERGE_SIZE = 4
# Qwen2-VL's rotary base (1e6) leaves M-RoPE's height and width sections (the lowest frequencies of a 32-wide head)
# turning by at most 0.03 and 2e-4 rad per grid step, so on a grid of image tokens attention can hardly tell top
# from bottom or left from right; a base of 2 turns them by 0.5-0.8 rad per step. Measured with the probe
# (vlmtune.eval.probe) on a 4 x 4 grid: base 1e6: position 0.25 (chance) to 0.81; base 2: position 1.0.
ROPE_THETA = 2.0
PRETRAIN = {
    "model": {"dtype": "float32"},
    # The tower and merger come pretrained from the first stage and stay frozen (trained on with the language model,
    # they lose what they read of the shape: 0.59 instead of 0.75 at merge 2); the vision cache then runs the tower
    # once per image.
    "groups": {
        "vision_tower": {"mode": "frozen"},
        "projector": {"mode": "frozen"},
        "language_model": {"mode": "full"},
        "lm_head": {"mode": "full"},
    },
    # 4096 images: 1000 steps of 16 see each about 4 times. 16384 images (each seen once) read less in 1000 steps:
    # shape 0.31, size 0.88, position 0.84 (probe, 1 thread, recipe 4).
    "data": {"train": "builtin:shapes:pretrain", "builtin_train_samples": 4096, "max_length": 256},
    "train": {
        # Measured with the probe (shape / size / position / colour exact match, gap): 1000 steps 1.0 / 1.0 / 1.0 /
        # 1.0, +2.27 (2 threads; +1.94 at 1 thread); 800 steps (1 thread) shape 0.91 (seed 1: 1.0), the rest 1.0.
        # Without the tower stage (every group trained here, as until recipe 4) the shape stayed at 0.41-0.69, told
        # by its area (a large circle called a square, a small one a triangle). The two stages take about 40 + 100 s
        # on 2 cores, which keeps the quickstart from a fresh cache under 3 minutes.
        "max_steps": 1000,
        "batch_size": 16,
        "learning_rate": 2e-3,
        "warmup_steps": 40,
        "scheduler": "cosine",
        "weight_decay": 0.0,
        "seed": 0,
        "logging_steps": 25,
        # Shuffled batches: grouped by length, a batch holds one task (lengths follow the task) and the
        # base never learns to use the image (answer loss 0.49 with its own image and with another's).
        "group_by_length": False,
    },
}


def base_dir() -> Path:
    """Where the builtin base lives once built."""
    return cache_dir() / "builtin" / f"tiny-qwen2-vl-v{RECIPE_VERSION}"


def is_builtin_base(folder: Path) -> bool:
    """Whether ``folder`` is a builtin base this cache holds (this version's or an earlier recipe's)."""
    builtin = (cache_dir() / "builtin").resolve()
    folder = Path(folder).resolve()
    return folder.parent == builtin and folder.name.startswith("tiny-qwen2-vl-v")


def builtin_processor():
    """The builtin base's processor: from its folder once built, else built from code (what ``write_random_init``
    saves), so data can be checked without building the model."""
    from transformers import AutoProcessor

    if (base_dir() / "model.safetensors").is_file():
        return AutoProcessor.from_pretrained(base_dir())
    return build_processor(build_tokenizer(corpus_texts()), merge_size=MERGE_SIZE)


def random_init(merge_size: int = MERGE_SIZE):
    """The untrained tiny Qwen2-VL and its processor (tokenizer inside), seeded.

    Args:
        merge_size: Side of the square of patches one image token holds: the base's (4: one token per quadrant of a
            64-pixel image), or Qwen2-VL's own 2 (16 tokens), which the tests' random model keeps.
    """
    from transformers import Qwen2VLForConditionalGeneration

    tokenizer = build_tokenizer(corpus_texts())
    processor = build_processor(tokenizer, merge_size=merge_size)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(tiny_config(tokenizer, rope_theta=ROPE_THETA, merge_size=merge_size))
    return model, processor


def write_random_init(out: Path, merge_size: int = MERGE_SIZE) -> Path:
    """``random_init``'s model and processor, as a model folder."""
    model, processor = random_init(merge_size)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def ensure_base(echo=print) -> Path:
    """Returns the builtin base's folder, building it first if it is not cached (about 2.5 minutes on 2 cores)."""
    final = base_dir()
    if (final / "model.safetensors").is_file():
        return final
    work = final.with_name(final.name + ".build")
    if work.exists():
        shutil.rmtree(work)
    echo(f"building the builtin base model once (cached in {final}) ...")
    # First stage: the tower and merger as a classifier of the scenes; the recipe then starts from its folder.
    model, processor = random_init()
    tower = pretrain_tower(model, processor, echo=echo)
    model.save_pretrained(work / "tower", safe_serialization=True)
    processor.save_pretrained(work / "tower")
    cfg = Config.model_validate(
        deep_merge(
            PRETRAIN,
            {
                "model": {"path": str(work / "tower")},
                "train": {"output_dir": str(work / "run"), "progress_bar": False},
            },
        )
    )
    result = train(cfg)
    shutil.copy(work / "run" / "metrics.jsonl", result.final_dir / "pretrain_metrics.jsonl")
    (result.final_dir / "tower_metrics.json").write_text(json.dumps(tower, indent=1) + "\n")
    if final.exists():
        shutil.rmtree(final)
    result.final_dir.rename(final)
    shutil.rmtree(work, ignore_errors=True)
    echo(f"builtin base ready: {final} (pretraining loss {result.last_loss:.3f})")
    return final


def build_base_alone() -> None:
    """Builds the builtin base in a single-process child (its pretraining is a one-process run whatever launched
    this one, so the cached base is the same however it was first built)."""
    if (base_dir() / "model.safetensors").is_file():
        return
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "RANK",
            "LOCAL_RANK",
            "WORLD_SIZE",
            "LOCAL_WORLD_SIZE",
            "GROUP_RANK",
            "ROLE_RANK",
            "ROLE_WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
            "TORCHELASTIC_RUN_ID",
        )
    }
    subprocess.run(
        [sys.executable, "-c", "from vlmtune.builtin.base import ensure_base; ensure_base()"], env=env, check=True
    )


def model_folder(mcfg: ModelConfig, echo=print, alone: bool = False) -> Path:
    """The local folder to load: the configured one, or the builtin base (built on first use).

    Args:
        alone: other processes of a multi-process run are running this too; the base is then built in a
            single-process child, so the cached base is the same however it was first built.
    """
    if mcfg.path != BUILTIN_MODEL:
        return Path(mcfg.path)
    if alone:
        build_base_alone()
    return ensure_base(echo=echo)
