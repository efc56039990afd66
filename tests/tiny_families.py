"""Tiny random models of each supported family, with the family's real processor class and chat template.

Every tokenizer is a byte-level BPE trained here (as ``vlmtune.model.tiny_qwen`` does) with the family's special
tokens; configs are tiny (width 32, one layer, 32-64 px images) but use the family's real config, model and
processor classes, so the processor expands image placeholders the family's own way. ``save_family(name, dir)``
writes a model folder that ``AutoModelForImageTextToText`` / ``AutoProcessor`` load like a downloaded one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from vlmtune.model.tiny_qwen import QWEN2_VL_CHAT_TEMPLATE

CORPUS = ["What color is the shape?", "red green blue square circle triangle", "Describe the image.", "top left"]
TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def tokenizer(
    specials: list[str], template: str, bos: str | None, eos: str, pad: str, **extra
) -> tf.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ``specials`` (never split) and ``extra`` named special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, min_frequency=1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_special_tokens(specials)
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        additional_special_tokens=specials,
        chat_template=template,
        clean_up_tokenization_spaces=False,
        extra_special_tokens=extra or None,
    )


def _parts(image: str) -> str:
    # the message's parts in order: an image part renders ``image``, a text part its text
    return (
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}"
        + image
        + "{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    )


# LLaVA-1.5 (llava-hf) conversation format: "USER: <image>\n... ASSISTANT: answer</s>".
LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    + _parts("<image>\n")
    + " {% elif m['role'] == 'assistant' %}"
    "ASSISTANT: " + _parts("") + "</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)
# Mistral instruct format (LLaVA-NeXT-Mistral, Mistral 3): "[INST] ... [/INST] answer</s>".
MISTRAL_TEMPLATE = (
    "<s>{% for m in messages %}{% if m['role'] == 'user' %}[INST]" + _parts("{IMG}") + "[/INST]"
    "{% elif m['role'] == 'assistant' %}" + _parts("") + "</s>{% endif %}{% endfor %}"
)
# ChatML (Qwen2 text models: LLaVA-OneVision, InternVL).
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n" + _parts("{IMG}") + "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Gemma 3: "<start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n".
GEMMA_TEMPLATE = (
    "<bos>{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    + _parts("<start_of_image>")
    + "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# PaliGemma has no chat template upstream; it is fine-tuned as prefix -> suffix (big_vision's PaliGemma README):
# "<image>...<bos>question\n" then "answer<eos>". This one renders the user turn as the prefix and the assistant
# turn as the suffix. PaliGemmaProcessor itself puts <bos> after the last <image> and "\n" after the prefix when
# the text has images, so only a turn without an image renders them here.
PALIGEMMA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% set text_only = m['content'] | selectattr('type', 'equalto', 'image') | list | length == 0 %}"
    "{% if text_only %}<bos>{% endif %}" + _parts("<image>") + "{% if text_only %}{{ '\\n' }}{% endif %}"
    "{% else %}" + _parts("") + "<eos>{% endif %}{% endfor %}"
)
# Idefics3 / SmolVLM: "User:<image>...<end_of_utterance>\nAssistant: ...<end_of_utterance>\n".
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:"
    + _parts("<image>")
    + "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def llava():
    tok = tokenizer(["<s>", "</s>", "<pad>", "<image>"], LLAVA_TEMPLATE, "<s>", "</s>", "<pad>")
    vision = tf.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    proc = tf.LlavaProcessor(
        tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    cfg = tf.LlavaConfig(
        vision_config=vision,
        text_config=tf.LlamaConfig(vocab_size=len(tok), **TEXT),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    return cfg, proc


def llava_next():
    template = MISTRAL_TEMPLATE.replace("{IMG}", "<image>\n")
    tok = tokenizer(["<s>", "</s>", "<pad>", "<image>"], template, "<s>", "</s>", "<pad>")
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    vision = tf.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    ip = tf.LlavaNextImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    proc = tf.LlavaNextProcessor(
        ip,
        tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    )
    cfg = tf.LlavaNextConfig(
        vision_config=vision,
        text_config=tf.MistralConfig(vocab_size=len(tok), **TEXT),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=pinpoints,
    )
    return cfg, proc


def mistral3():
    template = MISTRAL_TEMPLATE.replace("{IMG}", "[IMG]")
    tok = tokenizer(
        ["<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"],
        template,
        "<s>",
        "</s>",
        "<pad>",
    )
    vision = tf.PixtralVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=16,
        image_size=64,
        patch_size=8,
    )
    proc = tf.PixtralProcessor(
        tf.PixtralImageProcessor(size={"longest_edge": 64}, patch_size=8),
        tok,
        patch_size=8,
        spatial_merge_size=2,
        chat_template=template,
    )
    cfg = tf.Mistral3Config(
        vision_config=vision,
        text_config=tf.MistralConfig(vocab_size=len(tok), **TEXT),
        image_token_index=tok.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )
    return cfg, proc


def gemma3():
    specials = [
        "<bos>",
        "<eos>",
        "<pad>",
        "<start_of_turn>",
        "<end_of_turn>",
        "<start_of_image>",
        "<end_of_image>",
        "<image_soft_token>",
    ]
    tok = tokenizer(
        specials,
        GEMMA_TEMPLATE,
        "<bos>",
        "<end_of_turn>",
        "<pad>",
        boi_token="<start_of_image>",
        eoi_token="<end_of_image>",
        image_token="<image_soft_token>",
    )
    vision = tf.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        vision_use_head=False,
    )
    proc = tf.Gemma3Processor(
        tf.Gemma3ImageProcessor(size={"height": 32, "width": 32}), tok, chat_template=GEMMA_TEMPLATE, image_seq_length=4
    )
    text = tf.Gemma3TextConfig(vocab_size=len(tok), sliding_window=64, **TEXT)
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    cfg = tf.Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=4,
        image_token_index=ids["<image_soft_token>"],
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
    )
    return cfg, proc


def llava_onevision():
    # Qwen2 text model with ChatML; SigLIP features ("full": no CLS to drop), anyres tiling with image_newline.
    template = CHATML_TEMPLATE.replace("{IMG}", "<image>\n")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tok = tokenizer(
        specials, template, None, "<|im_end|>", "<|endoftext|>", image_token="<image>", video_token="<video>"
    )
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    ip = tf.LlavaOnevisionImageProcessor(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    proc = tf.LlavaOnevisionProcessor(
        ip,
        tok,
        tf.LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32}),
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        chat_template=template,
    )
    vision = tf.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        vision_use_head=False,
    )
    cfg = tf.LlavaOnevisionConfig(
        vision_config=vision,
        text_config=tf.Qwen2Config(vocab_size=len(tok), **TEXT),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=pinpoints,
    )
    return cfg, proc


def paligemma():
    tok = tokenizer(
        ["<bos>", "<eos>", "<pad>", "<image>"], PALIGEMMA_TEMPLATE, "<bos>", "<eos>", "<pad>", image_token="<image>"
    )
    ip = tf.SiglipImageProcessor(size={"height": 32, "width": 32}, image_seq_length=16)  # (32 / 8) ** 2 patches
    proc = tf.PaliGemmaProcessor(ip, tok, chat_template=PALIGEMMA_TEMPLATE)  # adds the <loc>/<seg> tokens
    vision = tf.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        vision_use_head=False,
        projection_dim=32,
    )
    text = tf.GemmaConfig(vocab_size=len(tok), **TEXT)
    cfg = tf.PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        projection_dim=32,
        hidden_size=32,
        vocab_size=len(tok),
    )
    return cfg, proc


def internvl():
    template = CHATML_TEMPLATE.replace("{IMG}", "<IMG_CONTEXT>\n")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    tok = tokenizer(
        specials,
        template,
        None,
        "<|im_end|>",
        "<|endoftext|>",
        start_image_token="<img>",
        end_image_token="</img>",
        context_image_token="<IMG_CONTEXT>",
        video_token="<video>",
    )
    vision = tf.InternVLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=[32, 32],
        patch_size=[8, 8],
    )
    ip = tf.GotOcr2ImageProcessor(size={"height": 32, "width": 32}, crop_to_patches=False)
    proc = tf.InternVLProcessor(
        ip, tok, tf.InternVLVideoProcessor(size={"height": 32, "width": 32}), image_seq_length=4, chat_template=template
    )
    cfg = tf.InternVLConfig(
        vision_config=vision,
        text_config=tf.Qwen2Config(vocab_size=len(tok), **TEXT),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        downsample_ratio=0.5,
    )
    return cfg, proc


def idefics3():
    specials = [
        "<|im_start|>",
        "<end_of_utterance>",
        "<|endoftext|>",
        "<fake_token_around_image>",
        "<image>",
        "<global-img>",
    ]
    tok = tokenizer(specials, IDEFICS3_TEMPLATE, "<|im_start|>", "<end_of_utterance>", "<|endoftext|>")
    ip = tf.Idefics3ImageProcessor(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True
    )
    proc = tf.Idefics3Processor(ip, tok, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE)  # adds row/col tokens
    vision = tf.Idefics3VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    cfg = tf.Idefics3Config(
        vision_config=vision,
        text_config=tf.LlamaConfig(vocab_size=len(tok), **TEXT),
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    return cfg, proc


def _qwen(processor_cls, video_cls, config_cls, text: dict, vision: dict):
    """A tiny Qwen-VL family member: Qwen's tokens and template, patch 8, merge 2, 32x32 to 64x64 pixels."""
    from vlmtune.model.tiny_qwen import SPECIAL_TOKENS

    tok = tokenizer(SPECIAL_TOKENS, QWEN2_VL_CHAT_TEMPLATE, None, "<|im_end|>", "<|endoftext|>")
    vision_ip = dict(
        size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64}, patch_size=8, merge_size=2, temporal_patch_size=2
    )
    proc = processor_cls(
        tf.Qwen2VLImageProcessor(**vision_ip), tok, video_cls(**vision_ip), chat_template=QWEN2_VL_CHAT_TEMPLATE
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=32,
        patch_size=8,
        spatial_merge_size=2,
        temporal_patch_size=2,
        **vision,
    )
    cfg = config_cls(
        text_config=dict(TEXT, vocab_size=len(tok), **text),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    return cfg, proc


def qwen3_vl():
    # Two text layers: deepstack features are added to the hidden states after layer i (here 0); with a single
    # layer they would reach only the image positions' own logits, which carry no label, and get no gradient.
    text = dict(
        num_hidden_layers=2,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
    )
    return _qwen(
        tf.Qwen3VLProcessor,
        tf.Qwen3VLVideoProcessor,
        tf.Qwen3VLConfig,
        text,
        dict(num_position_embeddings=64, deepstack_visual_indexes=[0]),
    )


def qwen2_5_vl():
    """Qwen2.5-VL: window attention in the tower (windows of 2x2 merged tokens here, so a 64x64 image's tokens are
    reordered), full attention in block 1."""
    text = dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    return _qwen(
        tf.Qwen2_5_VLProcessor,
        tf.Qwen2VLVideoProcessor,
        tf.Qwen2_5_VLConfig,
        text,
        dict(window_size=32, fullatt_block_indexes=[1]),
    )


FAMILIES: dict[str, Callable] = {
    "qwen3_vl": qwen3_vl,
    "llava": llava,
    "llava_next": llava_next,
    "llava_onevision": llava_onevision,
    "idefics3": idefics3,
    "gemma3": gemma3,
    "internvl": internvl,
    "mistral3": mistral3,
    "paligemma": paligemma,
}


def save_family(name: str, out: Path) -> Path:
    """Builds the tiny ``name`` model (seed 0) and its processor and saves both to ``out``."""
    cfg, proc = FAMILIES[name]()
    torch.manual_seed(0)
    model = tf.AutoModelForImageTextToText.from_config(cfg)
    model.save_pretrained(out, safe_serialization=True)
    proc.save_pretrained(out)
    return out
