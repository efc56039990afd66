"""What `vlmtune bench` measures: presets (model shape, dtype, batch, LoRA, steps), the random-weight model
folders they name, and the two generated workloads. Everything is built in code (no download) and cached
under ``$VLMTUNE_CACHE/bench/``, so both sides of the benchmark read the very same files.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from vlmtune.config.overrides import apply_overrides
from vlmtune.data.collate import to_chat
from vlmtune.data.shapes import corpus_texts, random_scene, render_scene
from vlmtune.data.sharegpt import Sample
from vlmtune.model.tiny_qwen import QWEN2_VL_CHAT_TEMPLATE, build_tokenizer
from vlmtune.paths import cache_dir

VERSION = 1  # bump when a model or workload recipe below changes, so cached files are rebuilt


@dataclass(frozen=True)
class ModelShape:
    """A Qwen2-VL shape: language model, vision tower (patch 14, merge 2 like the real one) and vocabulary."""

    text_hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vision_dim: int
    vision_depth: int
    vision_heads: int
    vocab_size: int  # the model's embedding rows; the bench tokenizer uses the first 512


@dataclass(frozen=True)
class Preset:
    """One benchmark setting, applied identically to vlmtune and to the reference loop."""

    name: str
    shape: ModelShape
    dtype: str  # torch dtype name, for both sides
    batch_size: int
    steps: int  # optimizer steps per epoch (the workload has batch_size x steps samples)
    epochs: int  # epochs per run; all but the last are warm-up, the last is measured
    rounds: int  # vlmtune, reference, vlmtune, reference, ...
    fixed_side: int  # the fixed workload's square image side
    variable_sides: tuple[int, ...]  # image sides drawn (independently for height and width) in the variable workload
    text_tokens: int = 128  # fixed workload: non-image tokens per sample, chat template included
    min_pixels: int = 56 * 56  # the processor's pixel bounds (Qwen2-VL's min_pixels)
    max_pixels: int = 448 * 448
    lora_rank: int = 16
    lora_alpha: float = 32.0
    learning_rate: float = 1e-4
    seed: int = 42
    notes: str = ""
    extra: dict = field(default_factory=dict)


# Qwen2-VL-2B-Instruct's config.json: text 1536 wide, 28 layers, 12 heads / 2 KV heads, MLP 8960, vocab 151936,
# tied embeddings; vision tower 1280 wide, 32 blocks, 16 heads.
QWEN2_VL_2B = ModelShape(1536, 8960, 28, 12, 2, 1280, 32, 16, 151936)
# The 2B's proportions at 1/6 of its width and 1/7 of its depth, sized so that one step takes about a second on
# 2 CPU cores: the vision tower's cost per patch is ~0.3x the language model's per token and the logits
# ~1/5 of the language model's linear layers, as in the 2B (see bench/NOTES.md).
CPU_SHAPE = ModelShape(256, 1408, 4, 4, 2, 192, 4, 3, 4096)
TINY_SHAPE = ModelShape(64, 128, 2, 4, 2, 32, 2, 2, 512)

PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        "cpu",
        CPU_SHAPE,
        "float32",
        batch_size=4,
        steps=8,
        epochs=2,
        rounds=2,
        fixed_side=448,
        variable_sides=tuple(range(112, 449, 28)),
        notes="scaled-down Qwen2-VL-2B shape (9.0M parameters), random weights, fp32, sdpa",
    ),
    "gpu-2b": Preset(
        "gpu-2b",
        QWEN2_VL_2B,
        "bfloat16",
        batch_size=8,
        steps=20,
        epochs=2,
        rounds=2,
        fixed_side=448,
        variable_sides=tuple(range(112, 449, 28)),
        notes="Qwen2-VL-2B shape (2.2B parameters), random weights, bf16, sdpa",
    ),
    # For the tests: seconds per run.
    "tiny": Preset(
        "tiny",
        TINY_SHAPE,
        "float32",
        batch_size=2,
        steps=3,
        epochs=2,
        rounds=1,
        fixed_side=56,
        variable_sides=(28, 56, 84),
        text_tokens=48,
        min_pixels=28 * 28,
        max_pixels=84 * 84,
        notes="tiny random Qwen2-VL, for tests",
    ),
}


def bench_dir() -> Path:

    return cache_dir() / "bench"


def build_processor(preset: Preset):
    """A real Qwen2VLProcessor (patch 14, merge 2) with the builtin byte-level BPE tokenizer and Qwen's template."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    vision = dict(
        size={"shortest_edge": preset.min_pixels, "longest_edge": preset.max_pixels},
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
    )
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**vision),
        tokenizer=build_tokenizer(corpus_texts()),
        video_processor=Qwen2VLVideoProcessor(**vision),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def model_config(shape: ModelShape, tokenizer):
    """A Qwen2VLConfig of the given shape (M-RoPE sections in the 2B's 16:24:24 ratio)."""
    from transformers import Qwen2VLConfig

    head_dim = shape.text_hidden // shape.heads
    half = head_dim // 2
    section = [half // 4, (half - half // 4) // 2]
    section.append(half - sum(section))
    ids = {
        t: tokenizer.convert_tokens_to_ids(t)
        for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>")
    }
    text = dict(
        vocab_size=shape.vocab_size,
        hidden_size=shape.text_hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": section},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        depth=shape.vision_depth,
        embed_dim=shape.vision_dim,
        hidden_size=shape.text_hidden,
        num_heads=shape.vision_heads,
        mlp_ratio=4,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def ensure_model(preset: Preset, echo=print) -> Path:
    """The preset's model folder (random weights, seed 0, safetensors, the preset's dtype), built once."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    out = bench_dir() / f"model-{preset.name}-v{VERSION}"
    if (out / "config.json").is_file():
        return out
    echo(f"building the {preset.name} benchmark model (random weights) in {out} ...")
    processor = build_processor(preset)
    config = model_config(preset.shape, processor.tokenizer)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # initialising 2B weights is much faster on a GPU
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=getattr(torch, preset.dtype))
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    del model
    tmp.rename(out)
    return out


def single_token_words(tokenizer) -> list[str]:
    """Words that encode to exactly one token after a space, so texts of an exact token count are easy to make."""
    words = []
    for token in sorted(tokenizer.get_vocab()):
        word = token[1:]
        if (
            token.startswith("\u0120")
            and word.isalpha()
            and len(word) >= 3
            and len(tokenizer(" " + word)["input_ids"]) == 1
        ):
            words.append(word)
    return words


def text_of(rng: random.Random, words: list[str], n: int) -> str:
    """``n`` space-led single-token words: exactly ``n`` tokens."""
    return "".join(" " + rng.choice(words) for _ in range(n))


def count_text_tokens(processor, messages: list[dict], images: int) -> int:
    """Non-image tokens of a sample as the chat template renders it (each image placeholder counts 0)."""
    chat = to_chat(Sample([(m["role"], m["content"]) for m in messages], [], "bench"))
    text = processor.apply_chat_template(chat, tokenize=False)
    return len(processor.tokenizer(text)["input_ids"]) - images


def make_workload(preset: Preset, kind: str, samples: int, processor) -> Path:
    """Writes (once) a ShareGPT JSONL of ``samples`` samples with PNG images; returns the JSONL path.

    fixed: one ``fixed_side`` square image and ``text_tokens`` non-image tokens per sample (a quarter of them the answer).
    variable: image sides drawn from ``variable_sides`` (height and width independently), answers of 5-200 tokens,
    questions of 8-32, a quarter of the samples with two images.
    """
    out = bench_dir() / f"data-{preset.name}-{kind}-n{samples}-v{VERSION}"
    path = out / "train.jsonl"
    if path.is_file():
        return path
    tmp = out.with_name(out.name + ".tmp")
    (tmp / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{preset.name}-{kind}")
    words = single_token_words(processor.tokenizer)
    lines = []
    for i in range(samples):
        if kind == "fixed":
            sizes, answer_len, question_len = [(preset.fixed_side, preset.fixed_side)], preset.text_tokens // 4, 1
        else:
            n_images = 2 if i % 4 == 3 else 1
            sizes = [(rng.choice(preset.variable_sides), rng.choice(preset.variable_sides)) for _ in range(n_images)]
            answer_len, question_len = rng.randint(5, 200), rng.randint(8, 32)
        names = []
        for k, (h, w) in enumerate(sizes):
            name = f"images/{i:05d}-{k}.png"
            render_scene(random_scene(rng), image_size=max(h, w)).resize((w, h)).save(tmp / name)
            names.append(name)
        answer = text_of(rng, words, answer_len)
        messages = [
            {"role": "user", "content": "<image>" * len(sizes) + text_of(rng, words, question_len)},
            {"role": "assistant", "content": answer},
        ]
        if kind == "fixed":  # grow the question to the exact non-image token count
            missing = preset.text_tokens - count_text_tokens(processor, messages, len(sizes))
            if missing < 0:
                raise ValueError(f"text_tokens={preset.text_tokens} is below the template's own tokens")
            messages[0]["content"] += text_of(rng, words, missing)
            assert count_text_tokens(processor, messages, len(sizes)) == preset.text_tokens
        lines.append(json.dumps({"messages": messages, "images": names}))
    (tmp / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.rename(out)
    return path


def vlmtune_config(
    preset: Preset, model_dir: Path, data: Path, output_dir: Path, steps: int, overrides: tuple[str, ...] = ()
) -> dict:
    """The vlmtune config of a benchmark run: LoRA r/alpha on every language-model linear layer and the projector,
    vision tower and lm_head frozen, one learning rate, constant schedule, clipping at 1, no evaluation, and batches
    grouped by length (``train.group_by_length``, off by default); the vision-feature cache and logits at answer
    positions are vlmtune's defaults. ``overrides`` (``key.path=value``, as on the ``vlmtune train`` command line)
    change it, e.g. ``train.packing=true``."""

    lora = {
        "mode": "lora",
        "rank": preset.lora_rank,
        "alpha": preset.lora_alpha,
        "dropout": 0.0,
        "targets": "all-linear",
    }
    return apply_overrides(
        {
            "model": {"path": str(model_dir), "dtype": preset.dtype, "attn_implementation": "sdpa"},
            "groups": {
                "vision_tower": {"mode": "frozen"},
                "projector": lora,
                "language_model": lora,
                "lm_head": {"mode": "frozen"},
            },
            "data": {"train": str(data), "max_length": 8192},
            "train": {
                "output_dir": str(output_dir),
                "max_steps": steps,
                "batch_size": preset.batch_size,
                "learning_rate": preset.learning_rate,
                "weight_decay": 0.0,
                "scheduler": "constant",
                "warmup_steps": 0,
                "max_grad_norm": 1.0,
                "seed": preset.seed,
                "logging_steps": 1,
                "progress_bar": False,
                "group_by_length": True,
            },
        },
        list(overrides),
    )
