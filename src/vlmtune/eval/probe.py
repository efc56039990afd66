"""The builtin base's probe: does it read each attribute of a generated scene from the image?

The base is pretrained on generated shapes images (``vlmtune.data.shapes``, task ``pretrain``) with questions about
the shape, its size, its position, and captions and attribute lists that also name its colour. The probe asks those
questions about held-out images (scenes drawn from their own seed, not the pretraining's or the ``builtin:shapes``
eval splits'; a large shape has a few pixels of room in its quadrant, so a probe image can still equal a pretraining
image pixel for pixel, as two images of one split can) and measures, per attribute:

- exact match of the greedy answer (the colour: the first item of the answer to "List the color, shape, size and
  position."). Each attribute's values are equally frequent among its images, so a model that ignores the image
  and always gives one answer scores 1 / (number of values);
- the image-ablation gap: answer loss (nats per answer token, end-of-turn included, as in training) with the next
  probe image whose attribute differs, minus the loss with the image's own. A model that ignores the image: 0.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vlmtune.data.shapes import COLORS, IMAGE_SIZE, POSITIONS, QUESTIONS, SHAPES, SIZES, random_scene, render_scene
from vlmtune.data.sharegpt import IMAGE_PLACEHOLDER, Sample
from vlmtune.eval.alignment import EvalItem, encode, mean_loss, score
from vlmtune.eval.generate import GenerationSettings, generate, item_prompt
from vlmtune.tracking import text_table

# attribute -> (the pretraining question that asks for it, its values)
PROBE_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "shape": ("shape", SHAPES),
    "size": ("size", SIZES),
    "position": ("position", POSITIONS),
    "color": ("attributes", tuple(COLORS)),  # the colour question itself is held out of pretraining
}


@dataclass(frozen=True)
class ProbeItem:
    """One probe question: the attribute it tests, that attribute's true value, and the eval item."""

    kind: str
    value: str
    item: EvalItem


@dataclass
class KindResult:
    """One attribute's figures: exact match beside its chance level, answer losses and their gap."""

    exact_match: float
    chance: float
    loss_own: float
    loss_other: float

    @property
    def gap(self) -> float:
        return self.loss_other - self.loss_own


@dataclass
class ProbeResult:
    """Every attribute's figures, and the gap over all probe answers (their tokens pooled)."""

    kinds: dict[str, KindResult]
    loss_own: float
    loss_other: float

    @property
    def gap(self) -> float:
        return self.loss_other - self.loss_own

    def metrics(self) -> dict[str, float]:
        """Flat figures for a report: ``probe/<kind>_exact_match``, ``probe/<kind>_gap``, ``probe/gap``, ..."""
        out: dict[str, float] = {}
        for kind, r in self.kinds.items():
            out |= {
                f"probe/{kind}_exact_match": r.exact_match,
                f"probe/{kind}_chance": r.chance,
                f"probe/{kind}_loss_own": r.loss_own,
                f"probe/{kind}_loss_other": r.loss_other,
                f"probe/{kind}_gap": r.gap,
            }
        return out | {"probe/loss_own": self.loss_own, "probe/loss_other": self.loss_other, "probe/gap": self.gap}


def probe_items(per_kind: int = 32, seed: int = 0, image_size: int = IMAGE_SIZE) -> list[ProbeItem]:
    """``per_kind`` held-out questions per attribute, the attribute's values in equal shares (the remainder to the
    first values), in shuffled order; the scene's other attributes and its place in the quadrant are random."""
    rng = random.Random(f"shapes/probe/{seed}")  # its own draws: never a pretraining or eval split's scene
    out = []
    for kind, (task, values) in PROBE_KINDS.items():
        shares = [values[i % len(values)] for i in range(per_kind)]
        rng.shuffle(shares)
        for i, value in enumerate(shares):
            scene = replace(random_scene(rng), **{kind: value})
            sample = Sample(
                [("user", IMAGE_PLACEHOLDER + QUESTIONS[task]), ("assistant", scene.answer(task))],
                [Path(f"probe-{kind}-{i}.png")],
                where=f"probe {kind} #{i}",
            )
            out.append(ProbeItem(kind, value, EvalItem(sample, [render_scene(scene, image_size)])))
    return out


def _given(kind: str, answer: str) -> str:
    """The attribute an answer gives: the whole answer, or for the colour the first item of the attribute list."""
    answer = " ".join(answer.split()).casefold()
    return answer.split(",")[0].strip() if kind == "color" else answer


def _other(items: list[ProbeItem], i: int) -> int:
    """The next item of the same attribute (cyclically) whose value differs from item i's."""
    same = [j for j, it in enumerate(items) if it.kind == items[i].kind]
    at = same.index(i)
    for step in range(1, len(same)):
        j = same[(at + step) % len(same)]
        if items[j].value != items[i].value:
            return j
    raise ValueError(f"the probe's '{items[i].kind}' items all have one value: no other image to compare with")


@torch.no_grad()
def probe_base(model, processor, per_kind: int = 32, batch_size: int = 32, seed: int = 0) -> ProbeResult:
    """Greedy exact match and the image-ablation gap per attribute on held-out generated images.

    The model is put in eval mode and its mode restored afterwards.
    """
    items = probe_items(per_kind, seed)
    was_training = model.training
    model.eval()
    settings = GenerationSettings(max_new_tokens=24)
    answers = generate(model, processor, [item_prompt(processor, p.item) for p in items], settings, batch_size)
    own = score(model, processor, [encode(processor, p.item) for p in items], batch_size)
    swapped = [encode(processor, p.item, items[_other(items, i)].item.images) for i, p in enumerate(items)]
    other = score(model, processor, swapped, batch_size)
    model.train(was_training)
    kinds = {}
    for kind, (_, values) in PROBE_KINDS.items():
        at = [i for i, p in enumerate(items) if p.kind == kind]
        right = sum(_given(kind, answers[i]) == items[i].value for i in at)
        kinds[kind] = KindResult(
            right / len(at), 1 / len(values), mean_loss([own[i] for i in at]), mean_loss([other[i] for i in at])
        )
    return ProbeResult(kinds, mean_loss(own), mean_loss(other))


def probe_table(result: ProbeResult, per_kind: int) -> str:
    """The probe as a text table: per attribute, exact match beside chance, and the image-ablation gap."""
    rows = [("attribute", f"exact match ({per_kind} images)", "chance", "loss own image", "other image", "gap")]
    for kind, r in result.kinds.items():
        rows.append(
            (
                kind,
                f"{r.exact_match:.3f}",
                f"{r.chance:.3f}",
                f"{r.loss_own:.4f}",
                f"{r.loss_other:.4f}",
                f"{r.gap:+.4f}",
            )
        )
    rows.append(("all", "", "", f"{result.loss_own:.4f}", f"{result.loss_other:.4f}", f"{result.gap:+.4f}"))
    return "\n".join(text_table(rows))
