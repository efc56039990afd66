"""Parameter name -> component group (longest anchored match), and a group's linear layers."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from vlmtune.model.archs import GROUPS, ArchSpec, Layout

# peft wraps the model as ``base_model.model.<original path>``; group resolution works on original paths.
PEFT_PREFIX = "base_model.model."


def strip_peft_prefix(name: str) -> str:
    """Returns ``name`` as it reads on the unwrapped model."""
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def pattern_match_length(pattern: str, name: str) -> int:
    """Number of path components ``pattern`` covers when it is an anchored prefix of ``name``, else 0.

    ``*`` matches exactly one component. Matching is by whole components, never by substring, so
    ``model.visual`` does not match ``model.visual_extra.x``.
    """
    pat = pattern.split(".")
    parts = name.split(".")
    if len(pat) > len(parts):
        return 0
    for p, n in zip(pat, parts):
        if p != "*" and p != n:
            return 0
    return len(pat)


def group_of(name: str, layout: Layout) -> str | None:
    """The group of one parameter or module path under ``layout``: the longest matching pattern wins."""
    best, best_len = None, 0
    for group, patterns in layout.patterns.items():
        for pattern in patterns:
            length = pattern_match_length(pattern, name)
            if length > best_len:
                best, best_len = group, length
    return best


@dataclass(frozen=True)
class GroupMap:
    """The resolved grouping of one model: which layout applied and each parameter's group."""

    arch: ArchSpec
    layout: Layout
    param_groups: dict[str, str]

    def params_in(self, group: str) -> list[str]:
        """Parameter names of one group, in model order."""
        return [n for n, g in self.param_groups.items() if g == group]

    def group_of(self, name: str) -> str | None:
        """Group of a parameter or module path (peft prefixes allowed)."""
        return group_of(strip_peft_prefix(name), self.layout)


def assign_groups(param_names: Iterable[str], arch: ArchSpec) -> GroupMap:
    """Puts every parameter into exactly one group, choosing the first layout that covers them all.

    Raises:
        ValueError: no layout covers every parameter; names the uncovered parameters of the closest layout.
    """
    names = [strip_peft_prefix(n) for n in param_names]
    best_missing: list[str] | None = None
    best_layout = None
    for layout in arch.layouts:
        groups = {n: group_of(n, layout) for n in names}
        missing = [n for n, g in groups.items() if g is None]
        if not missing and any(g == "language_model" for g in groups.values()):
            return GroupMap(arch=arch, layout=layout, param_groups=groups)  # type: ignore[arg-type]
        if best_missing is None or len(missing) < len(best_missing):
            best_missing, best_layout = missing, layout
    shown = ", ".join((best_missing or [])[:8])
    raise ValueError(
        f"architecture entry '{arch.name}': no layout places every parameter in a group. Closest layout "
        f"'{best_layout.name if best_layout else '?'}' leaves {len(best_missing or [])} parameter(s) without a "
        f"group, e.g. {shown}. Groups are {', '.join(GROUPS)}; add the missing module paths to the entry."
    )


def linear_modules(model: nn.Module, groups: GroupMap, group: str) -> list[str]:
    """Names of the ``nn.Linear`` modules of one group, in model order.

    Only real ``nn.Linear`` leaves count: a container such as Qwen2-VL's ``PatchMerger`` or a conv
    such as ``patch_embed`` is never a LoRA target (peft cannot wrap them, and wrapping a container
    is what makes other tools fail with "Target module PatchMerger(...) is not supported").
    """
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and groups.group_of(name) == group
    ]


def module_kind(name: str, arch: ArchSpec) -> str | None:
    """'attention' or 'mlp' by the module's container path components, else None."""
    parts = name.split(".")[:-1]
    if any(p in arch.attention_containers for p in parts):
        return "attention"
    if any(p in arch.mlp_containers for p in parts):
        return "mlp"
    return None


def matches_target_name(module_name: str, target: str) -> bool:
    """True if ``target`` names ``module_name`` by a whole-component dotted suffix (``q_proj``,
    ``self_attn.q_proj``, ``mlp.0``) or the full path."""
    return module_name == target or module_name.endswith("." + target)


def owner_modules(model: nn.Module, groups: GroupMap, group: str) -> list[str]:
    """Modules of ``group`` that own parameters directly (linear, conv, norm, embedding leaves).

    A fully trained group is saved through peft's ``modules_to_save``, which takes module names.
    Leaf owners rather than the group's root, so that peft never wraps a ModuleList (which cannot be
    iterated through its wrapper) or a container holding a LoRA group of its own (the projector
    inside the vision tower).
    """
    return [
        name
        for name, module in model.named_modules()
        if name and any(True for _ in module.parameters(recurse=False)) and groups.group_of(name) == group
    ]
