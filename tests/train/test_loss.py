"""Logits only at label positions give the model's own loss and the same gradients."""

from __future__ import annotations

import torch

from vlmtune.config.data import DataConfig
from vlmtune.data.dataset import build_dataset
from vlmtune.train.loader import make_loader
from vlmtune.train.loss import answer_loss, label_positions


def test_label_positions_are_one_before_each_label():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, 8]])
    assert label_positions(labels).tolist() == [[False, True, True, False, False], [True, False, False, True, False]]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_label_only_logits_equal_full_logits_loss_and_gradients(tiny, compare_batch):
    model, _ = tiny
    model.train()
    model.zero_grad()
    full = answer_loss(model, compare_batch, label_only=False)
    full.backward()
    full_grads = _grads(model)
    model.zero_grad()
    part = answer_loss(model, compare_batch, label_only=True)
    part.backward()
    part_grads = _grads(model)
    model.zero_grad()
    assert (compare_batch["labels"] != -100).sum() < compare_batch[
        "labels"
    ].numel() / 4  # most positions carry no label
    assert torch.allclose(part, full, rtol=1e-6, atol=1e-6), (part.item(), full.item())
    assert full_grads.keys() == part_grads.keys()
    for name in full_grads:
        assert torch.allclose(part_grads[name], full_grads[name], rtol=1e-4, atol=1e-6), name


def test_a_batch_without_answers_gives_zero_not_nan(tiny, compare_batch):
    model, _ = tiny
    empty = dict(compare_batch, labels=torch.full_like(compare_batch["labels"], -100))
    loss = answer_loss(model, empty)
    assert loss.item() == 0.0 and loss.requires_grad


def _per_sample_losses(model, ds, processor, group_by_length: bool) -> dict[int, float]:
    """Answer loss of every sample, computed inside the batches the loader builds."""
    loader = make_loader(ds, processor, 4, True, 0, 0, group_by_length=group_by_length)
    order = loader.sampler.order()
    losses = {}
    with torch.no_grad():
        for k, batch in enumerate(loader):
            logits = model(**{n: v for n, v in batch.items() if n != "labels"}).logits[:, :-1]
            targets = batch["labels"][:, 1:]
            per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            mask = targets != -100
            for row, index in enumerate(order[4 * k : 4 * k + 4]):
                losses[index] = (per_token[row][mask[row]].mean()).item()
    return losses


def test_grouped_batches_give_the_same_per_sample_losses(tiny, shapes_dir):
    model, processor = tiny
    model.eval()
    sources = [str(shapes_dir / "train.jsonl"), str(shapes_dir / "compare.jsonl")]
    ds = build_dataset(sources, DataConfig(max_length=512), processor, "train")
    assert len(set(ds.lengths())) >= 2  # one- and two-image samples: grouping changes who shares a batch
    grouped = _per_sample_losses(model, ds, processor, True)
    shuffled = _per_sample_losses(model, ds, processor, False)
    assert grouped.keys() == shuffled.keys() == set(range(len(ds)))
    for i in grouped:
        assert abs(grouped[i] - shuffled[i]) <= 1e-4 * max(1.0, abs(shuffled[i])), i


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny, compare_batch):
    model, _ = tiny
    model.train()
    results = []
    try:
        for checkpointing in (False, True):
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                assert model.model.language_model.layers[0].gradient_checkpointing
            model.zero_grad()
            loss = answer_loss(model, compare_batch)
            loss.backward()
            results.append((loss.detach(), _grads(model)))
    finally:
        model.gradient_checkpointing_disable()
        model.zero_grad()
    (plain, plain_grads), (ckpt, ckpt_grads) = results
    assert torch.allclose(plain, ckpt, rtol=1e-6, atol=1e-6)
    assert plain_grads.keys() == ckpt_grads.keys() and len(plain_grads) > 10
    for name in plain_grads:
        assert torch.allclose(plain_grads[name], ckpt_grads[name], rtol=1e-4, atol=1e-6), name
