"""Chat template, label masking, image-token counts and batching (vlmtune.data.collate) with the real tiny processor."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlmtune.data.collate import (
    IGNORE,
    collate,
    encode_text,
    image_grid,
    image_token_counts,
    label_segments,
    load_images,
    process_images,
    to_chat,
)
from vlmtune.data.sharegpt import Sample

ASSETS = Path(__file__).parents[1] / "assets"
RED, BLUE, BIG, CORRUPT = (ASSETS / n for n in ("red_square.png", "blue_circle.png", "big_gray.png", "corrupt.png"))


@pytest.fixture(scope="module")
def processor(tiny):
    return tiny[1]


@pytest.fixture(scope="module")
def model(tiny):
    return tiny[0].eval()


def _ids(processor):
    tok = processor.tokenizer
    return tok, tok.convert_tokens_to_ids(processor.image_token)


def _encode(processor, sample: Sample, min_pixels=None, max_pixels=None):
    """What VLMDataset.__getitem__ produces for a sample: token ids and labels plus pixel inputs."""
    images = load_images(sample)
    pixels = process_images(processor, images, min_pixels, max_pixels)
    merge = processor.image_processor.merge_size
    counts = [int(g.prod()) // merge**2 for g in pixels["image_grid_thw"]] if images else []
    enc = encode_text(processor, to_chat(sample), counts)
    return enc, {"input_ids": enc.input_ids, "labels": enc.labels, **pixels}


def _label_runs(labels: list[int]) -> list[list[int]]:
    runs, cur = [], []
    for label in labels:
        if label == IGNORE:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(label)
    if cur:
        runs.append(cur)
    return runs


SINGLE = Sample(messages=[("user", "<image>What color is the shape?"), ("assistant", "red")], images=[RED], where="t:1")
MULTI = Sample(
    messages=[
        ("system", "Answer with a few words."),
        ("user", "<image>Describe the image."),
        ("assistant", "a large red square at the top left"),
        ("user", "Where is the shape?"),
        ("assistant", "top left"),
        ("user", "And the color?"),
        ("assistant", "red"),
    ],
    images=[RED],
    where="t:2",
)
TWO_IMAGES = Sample(
    messages=[("user", "<image>and<image>Do the two shapes have the same color?"), ("assistant", "no")],
    images=[RED, BLUE],
    where="t:3",
)
TEXT_ONLY = Sample(messages=[("user", "Describe a square."), ("assistant", "a small blue square")], where="t:4")


# ---------------------------------------------------------------------------------------------
# to_chat
# ---------------------------------------------------------------------------------------------

IMG = {"type": "image"}


def _t(text):
    return {"type": "text", "text": text}


@pytest.mark.parametrize(
    "content, parts",
    [
        ("plain", [_t("plain")]),
        ("<image>What?", [IMG, _t("What?")]),
        ("a<image>b", [_t("a"), IMG, _t("b")]),
        ("<image><image>x", [IMG, IMG, _t("x")]),
        ("x<image>", [_t("x"), IMG]),
    ],
    ids=["text", "image-first", "image-middle", "two-images", "image-last"],
)
def test_to_chat_parts(content, parts):
    chat = to_chat(Sample(messages=[("user", content), ("assistant", "ok")]))
    assert chat == [{"role": "user", "content": parts}, {"role": "assistant", "content": [_t("ok")]}]


# ---------------------------------------------------------------------------------------------
# Label masking
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sample, answers",
    [
        (SINGLE, ["red"]),
        (MULTI, ["a large red square at the top left", "top left", "red"]),
        (TWO_IMAGES, ["no"]),
        (TEXT_ONLY, ["a small blue square"]),
    ],
    ids=["single-turn", "multi-turn-system", "two-images", "text-only"],
)
def test_labels_are_exactly_the_assistant_answers(processor, sample, answers):
    tok, image_id = _ids(processor)
    enc, _ = _encode(processor, sample)
    assert len(enc.labels) == len(enc.input_ids)
    # every label is either -100 or the input token at that place
    assert all(lab == IGNORE or lab == i for lab, i in zip(enc.labels, enc.input_ids))
    runs = _label_runs(enc.labels)
    assert [tok.decode(r) for r in runs] == [a + "<|im_end|>\n" for a in answers]
    assert tok.decode([lab for lab in enc.labels if lab != IGNORE]) == "".join(a + "<|im_end|>\n" for a in answers)
    # image tokens never carry labels
    assert all(lab == IGNORE for lab, i in zip(enc.labels, enc.input_ids) if i == image_id)
    # everything that is not an answer (system, user, template) is masked
    masked = tok.decode([i for lab, i in zip(enc.labels, enc.input_ids) if lab == IGNORE])
    for role, content in sample.messages:
        if role != "assistant":
            for piece in content.split("<image>"):
                assert piece in masked, (role, piece)


def test_label_segments_of_multi_turn(processor):
    segments = label_segments(processor, to_chat(MULTI))
    assert [(t, a) for t, a in segments if a] == [
        ("a large red square at the top left<|im_end|>\n", True),
        ("top left<|im_end|>\n", True),
        ("red<|im_end|>\n", True),
    ]
    assert "".join(t for t, _ in segments) == processor.apply_chat_template(to_chat(MULTI), tokenize=False)
    assert segments[0][0].startswith("<|im_start|>system\nAnswer with a few words.<|im_end|>\n")
    assert segments[0][0].endswith("<|im_start|>assistant\n")


def test_label_segments_default_system_prompt(processor):
    # Qwen's template inserts its default system prompt; it is masked like any prompt text.
    segments = label_segments(processor, to_chat(SINGLE))
    assert segments[0] == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What color is the shape?<|im_end|>\n<|im_start|>assistant\n",
        False,
    )
    assert segments[1:] == [("red<|im_end|>\n", True)]


# A template that starts with one mark per message: a conversation prefix renders differently from
# the start of the whole conversation, so the answers' places cannot be found from prefixes.
ODD_TEMPLATE = (
    "{{ 'x' * (messages | length) }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{{ c.get('text', '') }}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("sample", [TEXT_ONLY, MULTI], ids=["single-turn", "multi-turn"])
def test_template_whose_prefixes_are_not_prefixes_is_rejected(processor, sample):
    odd = copy.deepcopy(processor)
    odd.chat_template = ODD_TEMPLATE
    with pytest.raises(ValueError, match="does not render conversation prefixes as prefixes of the whole"):
        label_segments(odd, to_chat(sample))


# ---------------------------------------------------------------------------------------------
# Image tokens: our count == the real processor's
# ---------------------------------------------------------------------------------------------


def test_64px_image_token_count_matches_processor(processor):
    _, image_id = _ids(processor)
    images = load_images(SINGLE)
    grid = process_images(processor, images, None, None)["image_grid_thw"]
    assert grid.tolist() == [[1, 8, 8]]
    assert int(grid.prod()) // 4 == 16
    assert image_token_counts(processor, [(64, 64)], None, None) == [16]
    enc, _ = _encode(processor, SINGLE)
    assert enc.image_spans == [(enc.input_ids.index(image_id), enc.input_ids.index(image_id) + 16)]
    assert enc.input_ids.count(image_id) == 16


@pytest.mark.parametrize(
    "sample, prompt_only",
    [(SINGLE, True), (TWO_IMAGES, True), (SINGLE, False), (MULTI, False), (TWO_IMAGES, False), (TEXT_ONLY, False)],
    ids=["single-prompt", "two-images-prompt", "single-full", "multi-full", "two-images-full", "text-only-full"],
)
def test_input_ids_equal_the_processors_own(processor, sample, prompt_only):
    if prompt_only:
        sample = Sample(
            messages=[m for m in sample.messages if m[0] != "assistant"][:1], images=sample.images, where="p"
        )
    chat = to_chat(sample)
    images = load_images(sample)
    text = processor.apply_chat_template(chat, tokenize=False)
    own = processor(text=[text], images=images or None, return_tensors="pt")
    enc, item = _encode(processor, sample)
    assert enc.input_ids == own["input_ids"][0].tolist()
    _, image_id = _ids(processor)
    assert enc.input_ids.count(image_id) == int((own["input_ids"] == image_id).sum())
    if images:
        assert torch.equal(item["image_grid_thw"], own["image_grid_thw"])
        assert torch.equal(item["pixel_values"], own["pixel_values"])
        assert torch.equal(collate([item], 0, image_id)["mm_token_type_ids"], own["mm_token_type_ids"])


@pytest.mark.parametrize(
    "path, max_pixels, grid",
    [
        (RED, None, [1, 8, 8]),
        (BIG, None, [1, 16, 16]),
        (BIG, 8192, [1, 10, 10]),
        (BIG, 4096, [1, 8, 8]),
        (BIG, 2048, [1, 4, 4]),
    ],
    ids=["64px", "448px", "448px-8192", "448px-4096", "448px-2048"],
)
def test_token_count_without_decoding_matches_processed_grid(processor, path, max_pixels, grid):
    images = load_images(Sample(messages=[], images=[path]))
    got = process_images(processor, images, None, max_pixels)["image_grid_thw"]
    assert got.tolist() == [grid]
    h, w = images[0].height, images[0].width
    assert image_token_counts(processor, [(h, w)], None, max_pixels) == [grid[0] * grid[1] * grid[2] // 4]
    assert list(image_grid(processor, h, w, None, max_pixels)) == grid  # what the vision cache uses


def test_image_grid_without_decoding_matches_the_processor_over_many_sizes(processor):
    from PIL import Image

    for h, w in [(28, 28), (29, 57), (100, 33), (240, 320), (333, 777), (900, 60), (1000, 1000)]:
        for bounds in [(None, None), (None, 8192), (4096, None), (56 * 56, 200 * 200)]:
            got = process_images(processor, [Image.new("RGB", (w, h))], *bounds)["image_grid_thw"][0].tolist()
            assert list(image_grid(processor, h, w, *bounds)) == got, (h, w, bounds)


def test_encode_text_counts_must_match_images(processor):
    chat = to_chat(SINGLE)
    with pytest.raises(ValueError, match=r"rendered 1 image placeholder\(s\) for 2 image\(s\)"):
        encode_text(processor, chat, [16, 16])
    with pytest.raises(ValueError, match="more image tokens than the sample has images"):
        encode_text(processor, chat, [])


def test_load_images_rgb_and_corrupt(tmp_path):
    gray = tmp_path / "gray.png"
    from PIL import Image

    Image.new("L", (40, 30), 128).save(gray)
    (im,) = load_images(Sample(messages=[], images=[gray], where="g:1"))
    assert im.mode == "RGB" and im.size == (40, 30)
    with pytest.raises(ValueError) as info:
        load_images(Sample(messages=[], images=[RED, CORRUPT], where="data.jsonl:7"))
    assert str(info.value).startswith(f"data.jsonl:7: image '{CORRUPT}' cannot be decoded:")


# ---------------------------------------------------------------------------------------------
# collate
# ---------------------------------------------------------------------------------------------


def test_collate_pads_right_and_masks(processor):
    tok, image_id = _ids(processor)
    pad = tok.pad_token_id
    _, a = _encode(processor, SINGLE)
    _, b = _encode(processor, MULTI)
    _, c = _encode(processor, TWO_IMAGES)
    batch = collate([a, b, c], pad, image_id)
    lengths = [len(x["input_ids"]) for x in (a, b, c)]
    width = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    assert batch["input_ids"].dtype == torch.long
    for i, (x, n) in enumerate(zip((a, b, c), lengths)):
        assert batch["input_ids"][i, :n].tolist() == x["input_ids"]
        assert batch["labels"][i, :n].tolist() == x["labels"]
        assert (batch["input_ids"][i, n:] == pad).all()
        assert (batch["labels"][i, n:] == IGNORE).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
    assert batch["mm_token_type_ids"].tolist() == (batch["input_ids"] == image_id).long().tolist()
    assert int(batch["mm_token_type_ids"].sum()) == 16 + 16 + 32
    # pixel inputs concatenated in batch order
    assert torch.equal(batch["pixel_values"], torch.cat([a["pixel_values"], b["pixel_values"], c["pixel_values"]]))
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]] * 4
    assert set(batch) == {
        "input_ids",
        "attention_mask",
        "labels",
        "mm_token_type_ids",
        "pixel_values",
        "image_grid_thw",
    }


def test_collate_video_tokens_marked_2():
    batch = collate([{"input_ids": [1, 5, 7, 7, 2], "labels": [IGNORE] * 5}], 0, image_token_id=5, video_token_id=7)
    assert batch["mm_token_type_ids"].tolist() == [[0, 1, 2, 2, 0]]


def test_collate_mixes_text_only_and_image_samples(processor):
    tok, image_id = _ids(processor)
    _, text = _encode(processor, TEXT_ONLY)
    _, image = _encode(processor, SINGLE)
    assert "pixel_values" not in text and "image_grid_thw" not in text
    for order in ([text, image], [image, text]):
        batch = collate(order, tok.pad_token_id, image_id)
        assert torch.equal(batch["pixel_values"], image["pixel_values"])
        assert batch["image_grid_thw"].tolist() == [[1, 8, 8]]
        t = order.index(text)
        assert int(batch["mm_token_type_ids"][t].sum()) == 0
        assert int(batch["mm_token_type_ids"][1 - t].sum()) == 16


def test_collate_text_only_batch_has_no_pixels(processor):
    tok, image_id = _ids(processor)
    _, text = _encode(processor, TEXT_ONLY)
    batch = collate([text, text], tok.pad_token_id, image_id)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "mm_token_type_ids"}


# ---------------------------------------------------------------------------------------------
# The model takes a collated batch
# ---------------------------------------------------------------------------------------------


def test_forward_on_collated_batch_gives_finite_loss(processor, model):
    tok, image_id = _ids(processor)
    items = [_encode(processor, s)[1] for s in (SINGLE, TEXT_ONLY, TWO_IMAGES, MULTI)]
    batch = collate(items, tok.pad_token_id, image_id)
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss)
    # the loss is the mean next-token cross entropy over labelled tokens only
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert 0 < out.loss.item() < 2 * torch.log(torch.tensor(float(len(tok)))).item()


def test_padding_does_not_change_a_samples_logits(processor, model):
    tok, image_id = _ids(processor)
    short = _encode(processor, SINGLE)[1]
    long = _encode(processor, MULTI)[1]
    with torch.no_grad():
        alone = model(**collate([short], tok.pad_token_id, image_id)).logits[0]
        batched = model(**collate([short, long], tok.pad_token_id, image_id)).logits[0, : len(short["input_ids"])]
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)
