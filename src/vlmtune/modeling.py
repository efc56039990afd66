"""Loading a model folder (or the builtin base) with its processor, and choosing its registry entry."""

from __future__ import annotations

from pathlib import Path

import torch

from vlmtune.archs import REGISTRY, ArchSpec, arch_from_dict, find_arch
from vlmtune.config import BUILTIN_MODEL, ModelConfig


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: float32 on CPU, bfloat16 on a GPU that supports it (else float16)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def model_folder(mcfg: ModelConfig, echo=print) -> Path:
    """The local folder to load: the configured one, or the builtin base (built on first use)."""
    if mcfg.path == BUILTIN_MODEL:
        from vlmtune.builtin import ensure_base

        return ensure_base(echo=echo)
    return Path(mcfg.path)


def load_model(mcfg: ModelConfig, device: torch.device, echo=print):
    """Loads (model, processor) from a local folder; safetensors weights only, remote code only if allowed."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = model_folder(mcfg, echo=echo)
    model = AutoModelForImageTextToText.from_pretrained(
        folder,
        dtype=resolve_dtype(mcfg.dtype, device),
        attn_implementation=mcfg.attn_implementation,
        trust_remote_code=mcfg.trust_remote_code,
        use_safetensors=True,
    )
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=mcfg.trust_remote_code)
    return model, processor


def arch_for(model, mcfg: ModelConfig) -> ArchSpec:
    """The registry entry: user-supplied, named, or found from the model's ``config.model_type``."""
    if mcfg.arch_entry is not None:
        return arch_from_dict(mcfg.arch or "user", mcfg.arch_entry)
    if mcfg.arch is not None:
        if mcfg.arch not in REGISTRY:
            raise ValueError(f"'model.arch': no entry '{mcfg.arch}'; entries: {', '.join(REGISTRY)}")
        return REGISTRY[mcfg.arch]
    return find_arch(model.config.model_type)
