"""Per-architecture component groups, as data.

Each entry names, for every transformers layout the family has had, the module-path patterns of its
component groups. A pattern is a dotted module path anchored at the model root; ``*`` stands for one
path component. A parameter belongs to the group whose pattern matches the longest prefix of its
name, because the projector sits inside the vision tower (Qwen2-VL: ``model.visual.merger``).
"""

from __future__ import annotations

from dataclasses import dataclass

GROUPS: tuple[str, ...] = ("vision_tower", "projector", "language_model", "lm_head")
"""The component groups every architecture entry names, in the order plans are printed."""


@dataclass(frozen=True)
class Layout:
    """One module layout of an architecture: group name -> anchored module-path patterns."""

    name: str
    patterns: dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class ArchSpec:
    """A registry entry: which configs it covers and the layouts its modules come in."""

    name: str
    model_types: tuple[str, ...]
    layouts: tuple[Layout, ...]
    description: str = ""
    # Leaf-module container names that make a linear layer count as "attention" or "mlp" when a
    # group's LoRA targets say so. Path components, matched exactly, never as substrings.
    attention_containers: tuple[str, ...] = ("self_attn", "attn", "attention", "cross_attn")
    mlp_containers: tuple[str, ...] = ("mlp", "feed_forward", "ffn")


def _qwen_vl_layouts() -> tuple[Layout, ...]:
    # transformers >= 4.52 nests the backbone: model.visual / model.language_model / lm_head.
    # Older checkpoints and code use visual / model / lm_head; the patterns of both are kept so the
    # same entry resolves either naming.
    nested = Layout(
        name="nested (model.visual / model.language_model)",
        patterns={
            "vision_tower": ("model.visual",),
            "projector": ("model.visual.merger",),
            "language_model": ("model.language_model",),
            "lm_head": ("lm_head",),
        },
    )
    flat = Layout(
        name="flat (visual / model)",
        patterns={
            "vision_tower": ("visual",),
            "projector": ("visual.merger",),
            "language_model": ("model",),
            "lm_head": ("lm_head",),
        },
    )
    return (nested, flat)


REGISTRY: dict[str, ArchSpec] = {
    "qwen2_vl": ArchSpec(
        name="qwen2_vl",
        model_types=("qwen2_vl",),
        layouts=_qwen_vl_layouts(),
        description="Qwen2-VL (vision tower model.visual, projector model.visual.merger)",
    ),
    "qwen2_5_vl": ArchSpec(
        name="qwen2_5_vl",
        model_types=("qwen2_5_vl",),
        layouts=_qwen_vl_layouts(),
        description="Qwen2.5-VL (vision tower model.visual, projector model.visual.merger)",
    ),
}


def arch_from_dict(name: str, data: dict) -> ArchSpec:
    """Builds a user-supplied registry entry from config data (``model.arch_entry``).

    Args:
        name: the entry's name.
        data: ``{"model_types": [...], "layouts": [{"name": ..., "patterns": {group: [patterns]}}]}``
            or a single ``{"patterns": {...}}``.
    """
    layouts_data = data.get("layouts") or [{"name": "user", "patterns": data.get("patterns", {})}]
    layouts = tuple(
        Layout(
            name=str(item.get("name", f"user-{i}")),
            patterns={g: tuple(p) if isinstance(p, (list, tuple)) else (p,) for g, p in item["patterns"].items()},
        )
        for i, item in enumerate(layouts_data)
    )
    return ArchSpec(name=name, model_types=tuple(data.get("model_types", ())), layouts=layouts,
                    description=str(data.get("description", "user-supplied entry")))


def find_arch(model_type: str) -> ArchSpec:
    """Returns the registry entry for a transformers ``config.model_type``.

    Raises:
        ValueError: the model type has no entry; the message lists the supported ones and how to add one.
    """
    for spec in REGISTRY.values():
        if model_type in spec.model_types:
            return spec
    supported = ", ".join(sorted(t for s in REGISTRY.values() for t in s.model_types))
    raise ValueError(
        f"no vlmtune architecture entry for model_type '{model_type}'. Supported: {supported}. "
        "To add one without editing vlmtune, give `model.arch_entry` in the config: "
        "{model_types: [...], patterns: {vision_tower: [...], projector: [...], language_model: [...], "
        "lm_head: [...]}} with anchored module paths such as 'model.visual.merger'."
    )
