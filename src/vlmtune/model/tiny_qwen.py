"""A builtin tiny Qwen2-VL: tokenizer, processor and config built locally, no download.

The pieces are the real transformers classes (``Qwen2VLProcessor``,
``Qwen2VLImageProcessor``, ``Qwen2VLConfig``), only small, so every code path that a
full Qwen2-VL checkpoint takes (chat template, image-token expansion, M-RoPE position
ids, ``mm_token_type_ids``) is exercised in seconds on a CPU.

Notes on transformers 5.x, checked against 5.24:
    * M-RoPE is configured through ``text_config.rope_parameters`` with
      ``rope_type="default"`` plus ``mrope_section``; the legacy ``rope_scaling={"type":
      "mrope"}`` is rewritten to that. Without ``mrope_section`` the model silently uses
      the 7B default ``[16, 24, 24]``, which is wrong for any other head size.
    * ``Qwen2VLProcessor`` requires a video processor; it returns ``mm_token_type_ids``,
      which the model requires whenever ``image_grid_thw`` is passed.
    * min/max pixels live in the image processor's ``size={"shortest_edge": min_pixels,
      "longest_edge": max_pixels}`` (both are pixel counts, not edge lengths).
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

SPECIAL_TOKENS: list[str] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Verbatim from Qwen2-VL-*-Instruct's tokenizer_config.json / chat_template.json.
QWEN2_VL_CHAT_TEMPLATE: str = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PATCH_SIZE = 8
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2


def build_tokenizer(corpus: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer with Qwen2-VL's special tokens and chat template.

    The 256 byte symbols are always in the vocabulary, so any text (including
    Chinese or emoji) encodes and decodes back exactly; merges are learnt from
    ``corpus`` only, which keeps the vocabulary (and the model's embedding) tiny.
    Training is deterministic without pinning ``RAYON_NUM_THREADS``: the BPE trainer
    breaks count ties by pair ids, not by hash order, and builds in separate processes
    with 1, 2, 4 and 16 threads gave identical vocab and merges (tokenizers 0.23).

    Args:
        corpus: Texts to learn merges from, e.g. ``vlmtune.data.shapes.corpus_texts()``.
        vocab_size: Target size including the 14 special tokens; the result is smaller
            when the corpus runs out of merges.

    Returns:
        A fast tokenizer; ``eos_token`` is ``<|im_end|>``, ``pad_token`` is
        ``<|endoftext|>``, ``model_max_length`` 4096, ``chat_template`` Qwen2-VL's.

    Raises:
        ValueError: If ``vocab_size`` cannot hold the byte alphabet and special tokens.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {len(alphabet) + len(SPECIAL_TOKENS)}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a prefix space would change the text and break the
    # exact decode(encode(s)) == s round trip that chat-template masking relies on.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=1,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    # Every byte is in the initial alphabet already; these strings only make sure the
    # trainer has seen all printable ASCII, adding at most a few count-1 merges.
    extra = [string.ascii_letters, string.digits, string.punctuation]
    tok.train_from_iterator([*corpus, *extra], trainer=trainer)
    # Added after training so they get the last ids in Qwen's order (as in the real
    # vocab) and are matched before pre-tokenization, i.e. never split.
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
        model_max_length=4096,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
        # Cleaning up spaces before punctuation would break the exact round trip (5.24
        # skips it for BPE anyway, but warns on every decode when it is True).
        clean_up_tokenization_spaces=False,
    )


def build_processor(
    tokenizer: PreTrainedTokenizerFast,
    min_pixels: int = 32 * 32,
    max_pixels: int = 128 * 128,
    patch_size: int = PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
    image_mean: tuple[float, float, float] | None = None,
) -> Qwen2VLProcessor:
    """Wraps ``tokenizer`` in a real Qwen2VLProcessor with a tiny patch size.

    Args:
        tokenizer: A tokenizer from ``build_tokenizer``.
        min_pixels: Smallest resized image area in pixels (``size["shortest_edge"]``).
        max_pixels: Largest resized image area in pixels (``size["longest_edge"]``).
        patch_size: Side of a square patch in pixels; must equal the model config's.
        merge_size: Side of the square of patches merged into one image token; must equal the config's.
        image_mean: Per-channel mean (0-1) subtracted before dividing by the standard deviation; empty: CLIP's, as
            Qwen2-VL's.

    Returns:
        A processor with patch size 8, merge size 2 and temporal patch size 2, so a
        64x64 image becomes an 8x8 patch grid and 16 ``<|image_pad|>`` tokens.
    """
    vision = dict(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        **({"image_mean": list(image_mean)} if image_mean is not None else {}),
    )
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**vision),
        tokenizer=tokenizer,
        # Not optional in transformers 5.x: the constructor rejects None.
        video_processor=Qwen2VLVideoProcessor(**vision),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def _mrope_section(head_dim: int) -> list[int]:
    # Qwen2-VL splits the head_dim / 2 rotary frequencies into (temporal, height,
    # width) in the ratio 16:24:24; keep that ratio, with the remainder on width.
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def tiny_config(
    tokenizer: PreTrainedTokenizerFast,
    text_hidden: int = 128,
    text_layers: int = 2,
    vision_dim: int = 64,
    vision_depth: int = 2,
    rope_theta: float = 1_000_000.0,
    patch_size: int = PATCH_SIZE,
    vision_heads: int = 2,
    merge_size: int = MERGE_SIZE,
) -> Qwen2VLConfig:
    """Builds a small Qwen2VLConfig matching ``tokenizer`` and ``build_processor``.

    Args:
        tokenizer: A tokenizer from ``build_tokenizer``; fixes the vocab and token ids.
        text_hidden: LLM hidden size (4 attention heads, 2 KV heads).
        text_layers: Number of LLM decoder layers.
        vision_dim: Vision transformer width.
        vision_depth: Number of vision transformer blocks.
        rope_theta: The LLM's rotary base (M-RoPE).
        patch_size: Side of a square patch in pixels; must equal the processor's.
        vision_heads: Attention heads of the vision transformer.
        merge_size: Side of the square of patches the merger joins into one image token; must equal the processor's.

    Returns:
        A config for ``Qwen2VLForConditionalGeneration``.

    Raises:
        ValueError: If ``text_hidden`` does not give an even head size divisible into 3 M-RoPE sections.
    """
    heads = 4
    head_dim = text_hidden // heads
    if text_hidden % heads or head_dim % 2 or head_dim < 6:
        raise ValueError(f"text_hidden must be a multiple of 8 and >= 24, got {text_hidden}")
    ids = dict(zip(SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)))
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        # Loaded tokenizers may report a huge sentinel as model_max_length.
        max_position_embeddings=min(tokenizer.model_max_length, 32768),
        # "mrope" is not a rope_type in 5.x: M-RoPE is the default rope plus a section.
        rope_parameters={
            "rope_type": "default",
            "rope_theta": rope_theta,
            "mrope_section": _mrope_section(head_dim),
        },
        # Like the real config: Qwen's tokenizer has no BOS token, the config uses <|endoftext|>.
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else ids["<|endoftext|>"],
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = dict(
        depth=vision_depth,
        embed_dim=vision_dim,
        # The patch merger projects to hidden_size, which must equal the LLM width.
        hidden_size=text_hidden,
        num_heads=vision_heads,
        mlp_ratio=2,
        patch_size=patch_size,
        spatial_merge_size=merge_size,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        in_channels=3,
    )
    return Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def save_tiny_assets(out_dir: str | Path, corpus: list[str]) -> None:
    """Builds the tiny tokenizer and processor and saves them to ``out_dir``.

    ``transformers.AutoProcessor.from_pretrained(out_dir)`` and
    ``AutoTokenizer.from_pretrained(out_dir)`` load them back (the chat template is
    written to ``chat_template.jinja``).

    Args:
        out_dir: Folder to write; created if missing.
        corpus: Texts to train the tokenizer on.
    """
    processor = build_processor(build_tokenizer(corpus))
    processor.save_pretrained(str(out_dir))
