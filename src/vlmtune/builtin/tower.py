"""The builtin base's first stage: its vision tower (and merger) pretrained to classify the shapes scenes.

A real VLM starts from a vision tower pretrained on its own (CLIP, SigLIP), and so does the builtin base. Trained only
through the language model's loss, the tiny tower read the size, position and colour but hardly the shape (the probe's
shape exact match 0.47-0.69 after 1000-1200 steps): told by a next-token loss that is low once the other words are
right, it learns the shape by its area and stops there. Here each attribute gets its own classifier on the merger's
image tokens, so the shape has a loss of its own. The classifiers are thrown away; the tower and merger keep what they
learnt, and the language model is then pretrained on them (``vlmtune.builtin.base``).

The heads: a small MLP per attribute on the image tokens max-pooled (one token, wherever it sits, can carry the
shape), and a linear layer on the tokens in order for the position. Measured on 512 held-out images with 16 image
tokens (merge 2; batch 32, lr 2e-3, 2 threads): the shape 0.67 after 400 steps with a linear head on mean-pooled
tokens, 0.84 with an MLP, 0.94 with max pooling and a cosine decay, 0.99 after 600 steps (about 38 s); size,
position and colour 1.0 by step 100. The base's 4 tokens (merge 4): 0.988 after 600 steps (bench/BASE.md).

This is a plain PyTorch loop, not the recipe: the recipe trains a causal language model on chat samples, and this
stage is an image classifier with throw-away heads.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vlmtune.data.shapes import COLORS, POSITIONS, SHAPES, SIZES, Scene, random_scene, render_scene

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "size": SIZES,
    "color": tuple(COLORS),
    "position": POSITIONS,
}


@dataclass(frozen=True)
class TowerRecipe:
    """How the tower is pretrained (defaults: the builtin base's)."""

    steps: int = 600
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_steps: int = 20
    images: int = 4096
    eval_images: int = 512
    hidden: int = 128  # width of each attribute's MLP head
    seed: int = 0


def _encode(processor, scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Pixel values (images x patches x features), grid sizes and each attribute's labels of ``scenes``."""
    out = processor.image_processor(images=[render_scene(s) for s in scenes], return_tensors="pt")
    grid = out["image_grid_thw"]
    pixels = out["pixel_values"].view(len(scenes), int(grid[0].prod()), -1)
    labels = {k: torch.tensor([values.index(getattr(s, k)) for s in scenes]) for k, values in ATTRIBUTES.items()}
    return pixels, grid, labels


class _Heads(nn.Module):
    """One classifier per attribute on a batch of images' tokens (images x tokens x width)."""

    def __init__(self, width: int, tokens: int, hidden: int):
        super().__init__()

        def mlp(n: int) -> nn.Module:
            return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, n))

        self.pooled = nn.ModuleDict({k: mlp(len(v)) for k, v in ATTRIBUTES.items() if k != "position"})
        self.position = nn.Linear(width * tokens, len(POSITIONS))

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = tokens.amax(dim=1)
        return {k: head(pooled) for k, head in self.pooled.items()} | {"position": self.position(tokens.flatten(1))}


def pretrain_tower(model, processor, recipe: TowerRecipe = TowerRecipe(), echo: Callable = print) -> dict[str, float]:
    """Trains ``model``'s vision tower and merger (in place) to classify each attribute of generated scenes.

    Args:
        model: A ``Qwen2VLForConditionalGeneration``; only ``model.model.visual`` changes.
        processor: Its processor (the image processor draws the patches).
        recipe: Steps, batch, rate and image counts.
        echo: Where progress lines go.

    Returns:
        Each attribute's accuracy on held-out images after training (``tower/<attribute>_accuracy``).
    """
    visual = model.model.visual
    torch.manual_seed(recipe.seed)
    rng = random.Random(f"tower/train/{recipe.seed}")
    train_pixels, grid, train_labels = _encode(processor, [random_scene(rng) for _ in range(recipe.images)])
    rng = random.Random(f"tower/eval/{recipe.seed}")
    eval_pixels, _, eval_labels = _encode(processor, [random_scene(rng) for _ in range(recipe.eval_images)])
    tokens = int(grid[0].prod()) // visual.spatial_merge_size**2
    width = visual.merger.mlp[-1].out_features
    heads = _Heads(width, tokens, recipe.hidden)

    def logits(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        n = pixels.shape[0]
        out = visual(pixels.flatten(0, 1), grid_thw=grid[:1].expand(n, 3)).pooler_output
        return heads(out.view(n, tokens, width))

    optimizer = torch.optim.AdamW([*visual.parameters(), *heads.parameters()], lr=recipe.learning_rate, weight_decay=0)

    def rate(step: int) -> float:  # linear warmup, then cosine decay to zero
        return min(1.0, (step + 1) / recipe.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    draw = torch.Generator().manual_seed(recipe.seed)
    visual.train()
    for step in range(1, recipe.steps + 1):
        idx = torch.randint(recipe.images, (recipe.batch_size,), generator=draw)
        out = logits(train_pixels[idx])
        loss = sum(nn.functional.cross_entropy(out[k], train_labels[k][idx]) for k in ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 100 == 0 or step == recipe.steps:
            echo(f"tower step {step}/{recipe.steps}: loss {loss.item():.3f}")
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        out = logits(eval_pixels)
    accuracy = {f"tower/{k}_accuracy": (out[k].argmax(-1) == eval_labels[k]).float().mean().item() for k in ATTRIBUTES}
    echo("tower on held-out images: " + ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in accuracy.items()))
    return accuracy
