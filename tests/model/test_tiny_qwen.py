"""Tests for the builtin tiny Qwen2-VL (vlmtune.model.tiny_qwen): no download, CPU only."""

from __future__ import annotations

import hashlib

import pytest
import torch
import transformers
from PIL import Image

from vlmtune.data.shapes import Scene, corpus_texts, render_scene
from vlmtune.model.tiny_qwen import (
    QWEN2_VL_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_processor,
    build_tokenizer,
    save_tiny_assets,
    tiny_config,
)

QUESTION = "What color is the shape?"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(corpus_texts())


@pytest.fixture(scope="module")
def processor(tokenizer):
    return build_processor(tokenizer)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return transformers.Qwen2VLForConditionalGeneration(tiny_config(tokenizer)).eval()


def _digest(tok) -> str:
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()


def test_tokenizer_build_is_deterministic(tokenizer):
    again = build_tokenizer(corpus_texts())
    assert again.get_vocab() == tokenizer.get_vocab()
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()  # merges included
    # Each build uses fresh Rust hash seeds, so this also covers hash-order effects. (Fresh
    # processes with RAYON_NUM_THREADS=1/2/4/16 were checked by hand; a subprocess here
    # would spend ~10 s importing transformers.)
    assert _digest(build_tokenizer(list(corpus_texts()))) == _digest(tokenizer)


def test_tokenizer_settings(tokenizer):
    assert 300 < len(tokenizer) <= 512
    assert len(build_tokenizer(corpus_texts() * 3 + ["the quick brown fox jumps over the lazy dog"] * 5, 400)) == 400
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.model_max_length == 4096
    assert tokenizer.chat_template == QWEN2_VL_CHAT_TEMPLATE
    # Merges were learnt from the corpus: a known question takes far fewer tokens than bytes.
    assert len(tokenizer(QUESTION, add_special_tokens=False)["input_ids"]) <= 8
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(["x"], vocab_size=100)


def test_special_tokens_are_single_ids(tokenizer):
    assert len(SPECIAL_TOKENS) == 14 and len(set(SPECIAL_TOKENS)) == 14
    ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    # Last ids of the vocab, in Qwen's order (endoftext, im_start, im_end, ...).
    assert ids == list(range(len(tokenizer) - 14, len(tokenizer)))
    for token, tid in zip(SPECIAL_TOKENS, ids):
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [tid]
        assert tokenizer(f"ab{token}cd", add_special_tokens=False)["input_ids"].count(tid) == 1
    assert set(SPECIAL_TOKENS) <= set(tokenizer.all_special_tokens)


@pytest.mark.parametrize(
    "text",
    [
        *corpus_texts()[:20],
        "a small red circle at the top left",
        "你好，世界！这是一个测试。",
        "  leading spaces, tabs\tand\nnew lines  ",
        "Unseen words: zebra quixotic 12345 ~!@#$%^&*() 🙂 café",
        "<|im_start|>user\nWhat shape?<|im_end|>\n",
        "spaces before punctuation stay : yes , no . why ? it 's don 't !",
    ],
)
def test_decode_round_trips(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_chat_template_matches_qwen2_vl(processor):
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    assert processor.apply_chat_template(parts, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What color is the shape?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    conversation = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "image"}]},
        {"role": "assistant", "content": "red"},
    ]
    assert processor.tokenizer.apply_chat_template(conversation, tokenize=False, add_vision_id=True) == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n"
        "Picture 1: <|vision_start|><|image_pad|><|vision_end|>"
        "Video 1: <|vision_start|><|video_pad|><|vision_end|>"
        "Picture 2: <|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
    )


def test_processor_pixels_and_patches(processor):
    ip = processor.image_processor
    assert isinstance(processor, transformers.Qwen2VLProcessor)
    assert isinstance(ip, transformers.Qwen2VLImageProcessor)
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (8, 2, 2)
    assert (ip.size["shortest_edge"], ip.size["longest_edge"]) == (32 * 32, 128 * 128)
    text = "<|vision_start|><|image_pad|><|vision_end|>"
    grids = {}
    for side in (16, 64, 512):
        out = processor(text=[text], images=[Image.new("RGB", (side, side))], return_tensors="pt")
        t, h, w = out["image_grid_thw"][0].tolist()
        grids[side] = (t, h, w)
        assert 32 * 32 <= h * w * 64 <= 128 * 128  # resized area within [min_pixels, max_pixels]
        assert out["pixel_values"].shape == (h * w, 3 * 2 * 8 * 8)
    assert grids == {16: (1, 4, 4), 64: (1, 8, 8), 512: (1, 16, 16)}


def test_save_tiny_assets_round_trip(tmp_path, tokenizer, processor):
    save_tiny_assets(tmp_path, corpus_texts())
    loaded = transformers.AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is transformers.Qwen2VLProcessor
    assert loaded.chat_template == QWEN2_VL_CHAT_TEMPLATE
    assert loaded.image_processor.patch_size == 8 and loaded.image_processor.size["longest_edge"] == 128 * 128
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tok.get_vocab() == tokenizer.get_vocab() and _digest(tok) == _digest(tokenizer)
    assert (tok.eos_token, tok.pad_token, tok.model_max_length) == ("<|im_end|>", "<|endoftext|>", 4096)
    assert tok.chat_template == QWEN2_VL_CHAT_TEMPLATE
    image = render_scene(Scene("circle", "red", "small", "top left"))
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n"
    a = processor(text=[text], images=[image], return_tensors="pt")
    b = loaded(text=[text], images=[image], return_tensors="pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_config(tokenizer):
    cfg = tiny_config(tokenizer, text_hidden=96)
    text, vision = cfg.text_config, cfg.vision_config
    assert (text.vocab_size, text.hidden_size, text.intermediate_size) == (len(tokenizer), 96, 192)
    assert (text.num_attention_heads, text.num_key_value_heads, text.num_hidden_layers) == (4, 2, 2)
    assert sum(text.rope_parameters["mrope_section"]) == 96 // 4 // 2
    assert vision.hidden_size == 96 and (vision.embed_dim, vision.depth, vision.patch_size) == (64, 2, 8)
    assert cfg.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert (text.eos_token_id, text.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert cfg.tie_word_embeddings is False
    with pytest.raises(ValueError, match="text_hidden"):
        tiny_config(tokenizer, text_hidden=100)


def test_model_forward_end_to_end(tokenizer, processor, model):
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image = render_scene(Scene("triangle", "blue", "large", "bottom right"))
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    assert "mm_token_type_ids" in inputs
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    n_pad = int((inputs["input_ids"] == image_pad).sum())
    assert n_pad == int(inputs["image_grid_thw"].prod()) // 4 == 16
    assert int((inputs["mm_token_type_ids"] != 0).sum()) == n_pad
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(out.logits).all()


def test_model_trains_on_two_images(tokenizer, processor, model):
    text = processor.apply_chat_template(
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
            {"role": "assistant", "content": "yes"},
        ],
        tokenize=False,
    )
    images = [render_scene(Scene("circle", "red", "small", "top left")), Image.new("RGB", (32, 96), "white")]
    inputs = processor(text=[text], images=images, return_tensors="pt")
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == image_pad).sum()) == int(inputs["image_grid_thw"].prod(-1).sum()) // 4
    model.zero_grad()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0  # gradient reaches the vision tower
    model.zero_grad()
