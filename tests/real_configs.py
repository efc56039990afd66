"""Published ``config.json`` contents of four Qwen vision-language checkpoints, as Python dicts.

The tests build these models on the meta device (no weights, no hub access) to check the component
grouping against the real module trees. Key order and values follow the hub files as published
(JSON ``true``/``false`` written as ``True``/``False``). None of the hub pages could be fetched from
here; each dict was transcribed from a verbatim copy of that hub file found in public sources, named
in the comment above it.
"""

from __future__ import annotations

# Source: hub repo Qwen/Qwen2-VL-2B-Instruct, config.json (1.2 kB, "Initial commit" e28f5d3).
# Text taken from a byte-for-byte copy at huggingface.co/lightonai/MonoQwen2-VL-v0.1, config.json at
# commit 0ed3a95 (1,196 bytes, no fields added); the same vision_config block and values also
# appear in mlx-community/Qwen2-VL-2B-Instruct-4bit and mlx-community/Qwen2-VL-2B-bf16.
QWEN2_VL_2B_INSTRUCT = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 1536,
    "initializer_range": 0.02,
    "intermediate_size": 8960,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2_vl",
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "mlp_ratio": 4,
        "num_heads": 16,
        "in_chans": 3,
        "hidden_size": 1536,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}

# Source: hub repo Qwen/Qwen2-VL-7B-Instruct, config.json.
# Text taken from verbatim copies: the VARGPT-v1.1 preparation script embeds this file as ``cfg``
# (same keys, order and values; it drops "architectures" and renames model_type to
# "vargpt_qwen2_vl" — both restored here to the hub values), and
# huggingface.co/decompute/Qwen2-VL-7B-Instruct-4bit config.json carries the same values
# (plus its own "quantization" block, not copied).
QWEN2_VL_7B_INSTRUCT = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "mlp_ratio": 4,
        "num_heads": 16,
        "in_chans": 3,
        "hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}

# Source: hub repo Qwen/Qwen2.5-VL-3B-Instruct, config.json (the original upload, in the same
# hand-written key order as the Qwen2-VL files).
# Text taken from a GitHub notes file headed "# Qwen/Qwen2.5-VL-3B-Instruct / ## model config" that
# quotes the file verbatim; the HCPO GUI-agent README quotes the same text (model_type renamed there).
QWEN2_5_VL_3B_INSTRUCT = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 128000,
    "max_window_layers": 70,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 16,
    "num_hidden_layers": 36,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}

# Source: hub repo Qwen/Qwen2.5-VL-7B-Instruct, config.json.
# Text taken from a GitHub README that quotes ".../Qwen2.5-VL-7B-Instruct/config.json" verbatim and
# then appends three project-specific keys (skip_layer_mlp, skip_layer_attn, mlp_scalars) after
# vocab_size; those three are not part of the hub file and are left out. The same vision_config
# block is quoted in PaddleFormers' DFNRopeVisionTransformerConfig as "qwen2_5 视觉参数".
QWEN2_5_VL_7B_INSTRUCT = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}

REAL_CONFIGS: dict[str, dict] = {
    "Qwen/Qwen2-VL-2B-Instruct": QWEN2_VL_2B_INSTRUCT,
    "Qwen/Qwen2-VL-7B-Instruct": QWEN2_VL_7B_INSTRUCT,
    "Qwen/Qwen2.5-VL-3B-Instruct": QWEN2_5_VL_3B_INSTRUCT,
    "Qwen/Qwen2.5-VL-7B-Instruct": QWEN2_5_VL_7B_INSTRUCT,
}
"""Hub repo id -> published config.json contents."""
