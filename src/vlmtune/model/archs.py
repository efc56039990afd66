"""Per-architecture component groups, as data.

Each entry names, for every transformers layout the family has had, the module-path patterns of its
component groups. A pattern is a dotted module path anchored at the model root; ``*`` stands for one
path component. A parameter belongs to the group whose pattern matches the longest prefix of its
name, because the projector sits inside the vision tower (Qwen2-VL: ``model.visual.merger``).
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmtune.config.schema import GROUPS  # noqa: F401  (the group names, re-exported beside the entries)


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
    # What the family supports, so that the recipe asks the registry instead of testing model types itself.
    packing: bool = (
        False  # per-sample M-RoPE positions (``get_rope_index``): train.packing is exact (tests/train/test_packing.py)
    )
    vision_cache: bool = False  # the projector maps the tower's final output to the image embeddings, nothing else
    window_order: bool = (
        False  # the tower emits tokens in window order; the image order is restored after the projector
    )


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


def _qwen3_vl_layouts() -> tuple[Layout, ...]:
    # Qwen3-VL feeds the language model from the final merger and from one "deepstack" merger per
    # chosen vision layer (model.visual.deepstack_merger_list.N); all of them map vision features
    # into the LLM width, so all are projector parameters although they sit under model.visual.
    return (
        Layout(
            name="nested (model.visual / model.language_model)",
            patterns={
                "vision_tower": ("model.visual",),
                "projector": ("model.visual.merger", "model.visual.deepstack_merger_list"),
                "language_model": ("model.language_model",),
                "lm_head": ("lm_head",),
            },
        ),
    )


def _llava_style_layouts(extra_projector: tuple[str, ...] = ()) -> tuple[Layout, ...]:
    # LLaVA-style models (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Gemma 3, PaliGemma, InternVL, Mistral 3):
    # transformers >= 4.52 nests them as model.vision_tower / model.multi_modal_projector /
    # model.language_model / lm_head; before that the language model was a whole causal LM under
    # language_model (language_model.model, language_model.lm_head). ``extra_projector`` names
    # parameters outside the projector module that only exist to place image features in the LLM
    # input, such as LLaVA-NeXT's learned ``image_newline`` separator.
    nested = Layout(
        name="nested (model.vision_tower / model.multi_modal_projector / model.language_model)",
        patterns={
            "vision_tower": ("model.vision_tower",),
            "projector": ("model.multi_modal_projector", *(f"model.{p}" for p in extra_projector)),
            "language_model": ("model.language_model",),
            "lm_head": ("lm_head",),
        },
    )
    flat = Layout(
        name="flat (vision_tower / multi_modal_projector / language_model.model)",
        patterns={
            "vision_tower": ("vision_tower",),
            "projector": ("multi_modal_projector", *extra_projector),
            "language_model": ("language_model.model",),
            "lm_head": ("language_model.lm_head",),
        },
    )
    return (nested, flat)


def _idefics3_layouts() -> tuple[Layout, ...]:
    # Idefics3 and SmolVLM: SigLIP under model.vision_model, pixel-shuffle + linear under model.connector.
    return (
        Layout(
            name="nested (model.vision_model / model.connector / model.text_model)",
            patterns={
                "vision_tower": ("model.vision_model",),
                "projector": ("model.connector",),
                "language_model": ("model.text_model",),
                "lm_head": ("lm_head",),
            },
        ),
    )


def _entry(
    name: str, model_types: tuple[str, ...], layouts: tuple[Layout, ...], description: str, **capabilities: bool
) -> ArchSpec:
    return ArchSpec(name=name, model_types=model_types, layouts=layouts, description=description, **capabilities)


REGISTRY: dict[str, ArchSpec] = {
    "qwen2_vl": _entry(
        "qwen2_vl",
        ("qwen2_vl",),
        _qwen_vl_layouts(),
        "Qwen2-VL (vision tower model.visual, projector model.visual.merger)",
        packing=True,
        vision_cache=True,
    ),
    "qwen2_5_vl": _entry(
        "qwen2_5_vl",
        ("qwen2_5_vl",),
        _qwen_vl_layouts(),
        "Qwen2.5-VL (vision tower model.visual, projector model.visual.merger)",
        packing=True,
        vision_cache=True,
        window_order=True,
    ),
    "qwen3_vl": _entry(
        "qwen3_vl",
        ("qwen3_vl",),
        _qwen3_vl_layouts(),
        "Qwen3-VL (projector model.visual.merger + model.visual.deepstack_merger_list)",
        packing=True,
    ),  # no vision cache: deepstack takes features from inside the tower
    "llava": _entry(
        "llava", ("llava",), _llava_style_layouts(), "LLaVA 1.5 and Pixtral (projector model.multi_modal_projector)"
    ),
    "llava_next": _entry(
        "llava_next",
        ("llava_next",),
        _llava_style_layouts(("image_newline",)),
        "LLaVA-NeXT (projector model.multi_modal_projector + model.image_newline)",
    ),
    "llava_onevision": _entry(
        "llava_onevision",
        ("llava_onevision",),
        _llava_style_layouts(("image_newline",)),
        "LLaVA-OneVision (projector model.multi_modal_projector + model.image_newline)",
    ),
    "idefics3": _entry(
        "idefics3",
        ("idefics3", "smolvlm"),
        _idefics3_layouts(),
        "Idefics3 and SmolVLM (vision model.vision_model, projector model.connector)",
    ),
    "gemma3": _entry("gemma3", ("gemma3",), _llava_style_layouts(), "Gemma 3 (projector model.multi_modal_projector)"),
    "paligemma": _entry(
        "paligemma", ("paligemma",), _llava_style_layouts(), "PaliGemma (projector model.multi_modal_projector)"
    ),
    "internvl": _entry(
        "internvl",
        ("internvl",),
        _llava_style_layouts(),
        "InternVL, transformers-native checkpoints (*-hf) (projector model.multi_modal_projector)",
    ),
    "mistral3": _entry(
        "mistral3",
        ("mistral3",),
        _llava_style_layouts(),
        "Mistral 3 / Mistral Small 3.1 (Pixtral vision, projector model.multi_modal_projector)",
    ),
}


def arch_from_dict(name: str, data) -> ArchSpec:
    """Builds a user-supplied registry entry from config data (``model.arch_entry``).

    Args:
        name: the entry's name.
        data: ``{"model_types": [...], "layouts": [{"name": ..., "patterns": {group: [patterns]}}]}``
            or a single ``{"patterns": {...}}``.
    """
    data = data.model_dump(exclude_none=True) if hasattr(data, "model_dump") else data
    layouts_data = data.get("layouts") or [{"name": "user", "patterns": data.get("patterns", {})}]
    layouts = tuple(
        Layout(
            name=str(item.get("name", f"user-{i}")),
            patterns={g: tuple(p) if isinstance(p, (list, tuple)) else (p,) for g, p in item["patterns"].items()},
        )
        for i, item in enumerate(layouts_data)
    )
    return ArchSpec(
        name=name,
        model_types=tuple(data.get("model_types", ())),
        layouts=layouts,
        description=str(data.get("description", "user-supplied entry")),
    )


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


def family_problems(arch: ArchSpec, model_type: str, train) -> list[str]:
    """Settings of ``train`` (the config's train section) that this family cannot honour, each naming the key."""
    problems = []
    if train.packing and not arch.packing:
        supported = ", ".join(t for s in REGISTRY.values() if s.packing for t in s.model_types)
        problems.append(
            f"'train.packing': model_type '{model_type}' ({arch.name}) has no per-sample M-RoPE positions; "
            f"packing supports {supported} (Qwen2-VL, Qwen2.5-VL, Qwen3-VL); set train.packing: false"
        )
    return problems
