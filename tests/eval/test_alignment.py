"""Alignment measures on real tiny models: ranks on hand-built scores, a model forced to ignore the image sits
exactly at chance, and the projector similarity equals a direct computation from the model's own API."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vlmtune.data.shapes import Scene, render_scene
from vlmtune.data.sharegpt import Sample
from vlmtune.eval.alignment import (
    EvalItem,
    caption_retrieval,
    encode,
    image_ablation,
    projector_alignment,
    projector_module,
    rank_metrics,
    score,
)
from vlmtune.model.archs import find_arch

COLORS = ("red", "green", "blue", "yellow")


def color_items(folder: Path, colors=COLORS, size: int = 64) -> list[EvalItem]:
    """One large square per colour, same place and size, same question: only the image tells them apart."""
    items = []
    for i, color in enumerate(colors):
        image = render_scene(Scene("square", color, "large", "top left"), size)
        path = folder / f"{color}_{i}.png"
        image.save(path)
        sample = Sample([("user", "<image>What color is the shape?"), ("assistant", color)], [path], f"hand[{i}]")
        items.append(EvalItem(sample, [image]))
    return items


def blind(tiny_dir: Path):
    """The tiny model with its projector's last layer zeroed: every image becomes the same (zero) features."""
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    last = model.model.visual.merger.mlp[2]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    return model


RANK_CASES = [
    # name, scores (images x candidates), true candidate per image, recall@1, mean rank
    ("all-right", [[3.0, 1.0, 2.0], [0.0, 5.0, 1.0], [1.0, 2.0, 9.0]], [0, 1, 2], 1.0, 1.0),
    ("one-wrong-one-tie", [[3.0, 1.0, 2.0], [0.0, 5.0, 1.0], [2.0, 2.0, 0.0]], [0, 2, 1], 0.5, (1 + 2 + 1.5) / 3),
    ("all-last", [[1.0, 2.0], [2.0, 1.0]], [0, 1], 0.0, 2.0),
]


@pytest.mark.parametrize("scores,truth,r1,mean_rank", [c[1:] for c in RANK_CASES], ids=[c[0] for c in RANK_CASES])
def test_rank_metrics_on_hand_built_scores(scores, truth, r1, mean_rank):
    m = rank_metrics(torch.tensor(scores), truth)
    n = len(scores[0])
    assert m == pytest.approx({"r1": r1, "mean_rank": mean_rank, "r1_chance": 1 / n, "mean_rank_chance": (n + 1) / 2})


def test_model_that_ignores_the_image_shows_no_gap_and_chance_retrieval(tiny_dir, tiny, tmp_path):
    _, processor = tiny
    model = blind(tiny_dir)
    items = color_items(tmp_path)
    true = score(model, processor, [encode(processor, it) for it in items], batch_size=4)
    gaps = image_ablation(model, processor, items, true, batch_size=4)
    assert abs(gaps["ablation_gap_blank"]) < 1e-5 and abs(gaps["ablation_gap_other"]) < 1e-5, gaps
    retrieval, notes = caption_retrieval(model, processor, items, k=4, batch_size=8)
    # every image ranks the four answers the same way, so each rank 1..4 is taken exactly once
    assert retrieval["retrieval_r1"] == pytest.approx(1 / 4) == pytest.approx(retrieval["retrieval_r1_chance"])
    assert (
        retrieval["retrieval_mean_rank"] == pytest.approx(2.5) == pytest.approx(retrieval["retrieval_mean_rank_chance"])
    )
    assert notes == []


def test_image_ablation_sees_a_model_that_uses_the_image(tiny, tmp_path):
    model, processor = tiny  # random, but its image features reach the language model
    items = color_items(tmp_path)
    true = score(model, processor, [encode(processor, it) for it in items], batch_size=4)
    gaps = image_ablation(model, processor, items, true, batch_size=4)
    assert abs(gaps["ablation_gap_blank"]) > 1e-3 and abs(gaps["ablation_gap_other"]) > 1e-3, gaps


def test_retrieval_k_above_the_eval_set_is_reduced_and_reported(tiny, tmp_path):
    model, processor = tiny
    retrieval, notes = caption_retrieval(model, processor, color_items(tmp_path), k=10, batch_size=16)
    assert retrieval["retrieval_k"] == 4.0
    assert notes == ["retrieval K reduced from 10 to 4 (the number of single-image eval samples)"]


def test_retrieval_candidates_are_the_distinct_answers_of_a_group(tiny, tmp_path):
    model, processor = tiny
    items = color_items(tmp_path, ("red", "red", "blue", "green", "blue", "red"))
    retrieval, notes = caption_retrieval(model, processor, items, k=4, batch_size=16)
    assert retrieval["retrieval_r1_chance"] == pytest.approx(1 / 3)  # the first group has red, blue, green
    assert notes == ["caption retrieval used 4 of 6 samples (1 groups of 4)"]


def test_projector_alignment_equals_direct_computation(tiny, tmp_path):
    model, processor = tiny
    items = color_items(tmp_path, ("red", "green", "blue"), size=64) + color_items(tmp_path, ("yellow",), size=96)
    true = score(
        model,
        processor,
        [encode(processor, it) for it in items],
        batch_size=3,
        projector=projector_module(model, find_arch("qwen2_vl")),
    )
    got = projector_alignment(model, processor, items, [s.pooled for s in true])

    # The same quantities from transformers' own API: image features per image, input embeddings per answer.
    with torch.no_grad():
        pooled = []
        for it in items:
            px = processor.image_processor(images=it.images, return_tensors="pt")
            feats = model.model.get_image_features(px["pixel_values"], px["image_grid_thw"]).pooler_output
            pooled.append(torch.cat(list(feats)).mean(0))
        emb = model.get_input_embeddings()
        answers = [
            emb(torch.tensor(processor.tokenizer(it.answer, add_special_tokens=False)["input_ids"])).mean(0)
            for it in items
        ]
    cos = torch.nn.functional.cosine_similarity(torch.stack(pooled)[:, None], torch.stack(answers)[None], dim=-1)
    eye = torch.eye(len(items), dtype=torch.bool)
    assert got["projector_cos_matched"] == pytest.approx(float(cos[eye].mean()), abs=1e-5)
    assert got["projector_cos_mismatched"] == pytest.approx(float(cos[~eye].mean()), abs=1e-5)


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "peft"])
def test_projector_found_from_the_registry_through_peft(tiny_dir, wrap):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    merger = model.model.visual.merger
    if wrap:
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["model.visual.merger.mlp.0"]))
    assert projector_module(model, find_arch("qwen2_vl")) is merger
