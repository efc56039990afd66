"""Loading a model folder with its processor, and choosing its registry entry.

``model.path: builtin:...`` is resolved to a folder by the commands (``vlmtune.builtin.base.model_folder``),
which hand the recipe a ``ModelFolder`` function; this layer only loads local folders.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Protocol

import torch

from vlmtune.config.errors import ConfigError
from vlmtune.config.schema import BUILTIN_MODEL, ModelConfig
from vlmtune.model.archs import REGISTRY, ArchSpec, arch_from_dict, find_arch
from vlmtune.paths import damaged_weights


class ModelFolder(Protocol):
    """Resolves ``model.path`` to a local folder; ``alone``: another process may be running the same code."""

    def __call__(self, mcfg: ModelConfig, echo=print, alone: bool = False) -> Path: ...


def local_folder(mcfg: ModelConfig, echo=print, alone: bool = False) -> Path:
    """``model.path`` as a folder; the builtin base needs the commands' resolver (it is built by training)."""
    if mcfg.path == BUILTIN_MODEL:
        raise ConfigError(
            [
                f"'model.path': {BUILTIN_MODEL} is resolved by the vlmtune commands; "
                "pass vlmtune.builtin.base.model_folder to the recipe"
            ]
        )
    return Path(mcfg.path)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: float32 on CPU, bfloat16 on a GPU that supports it (else float16)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def model_type_of(folder: Path) -> str | None:
    """``model_type`` from the folder's config.json.

    Raises:
        ConfigError: config.json is missing or not valid JSON (named).
    """
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except FileNotFoundError:
        raise ConfigError([f"'model.path': '{folder}' has no config.json"], str(folder)) from None
    except (ValueError, AttributeError) as e:
        raise ConfigError([f"{path} is not a valid config.json ({e})"], str(folder)) from None


def empty_model(mcfg: ModelConfig, folder: Path):
    """The folder's model without weights (on the meta device): its module names, before anything is loaded."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(folder, trust_remote_code=mcfg.trust_remote_code)
    with init_empty_weights():
        return AutoModelForImageTextToText.from_config(config, trust_remote_code=mcfg.trust_remote_code)


def quantization_config(mcfg: ModelConfig, device: torch.device, skip: list[str]):
    """transformers' BitsAndBytesConfig for ``model.quantize``; ``skip``: module-name patterns left in full precision.

    Raises:
        ConfigError: bitsandbytes is not installed.
    """
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            [
                f"'model.quantize': {mcfg.quantize} needs bitsandbytes, which is not installed: "
                "pip install 'vlmtune[quant]' (or bitsandbytes), or set model.quantize: none"
            ]
        ) from None
    from transformers import BitsAndBytesConfig

    if mcfg.quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    name = mcfg.quant_compute_dtype
    compute = resolve_dtype(mcfg.dtype, device) if name == "auto" else getattr(torch, name)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=mcfg.quantize,
        bnb_4bit_use_double_quant=mcfg.double_quant,
        bnb_4bit_compute_dtype=compute,
        llm_int8_skip_modules=skip,
    )


def load_model(mcfg: ModelConfig, device: torch.device, folder: Path, keep_precision: list[str] | None = None):
    """Loads (model, processor) from a local folder; safetensors weights only, remote code only if allowed.

    With ``model.quantize`` the linear layers are loaded quantized (bitsandbytes), except the modules named in
    ``keep_precision`` (exact module paths: the groups that stay in full precision, ``model.build.precise_modules``).

    Raises:
        ConfigError: the folder's model is of a family vlmtune has no entry for (a text-only model, say) and the
            config gives none (``model.arch_entry``).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_type = model_type_of(folder)
    damaged = damaged_weights(folder)
    if damaged is not None:
        raise ConfigError([f"'model.path': {damaged}"], str(folder))
    if mcfg.arch is None and mcfg.arch_entry is None:
        try:
            find_arch(model_type)
        except ValueError as e:
            raise ConfigError([f"'model.path': '{folder}' holds a '{model_type}' model: {e}"], str(folder)) from None
    quantized = {}
    if mcfg.quantize != "none":
        skip = [re.escape(n) for n in keep_precision or []]
        quantized = {"quantization_config": quantization_config(mcfg, device, skip), "device_map": {"": str(device)}}
    model = AutoModelForImageTextToText.from_pretrained(
        folder,
        dtype=resolve_dtype(mcfg.dtype, device),
        attn_implementation=mcfg.attn_implementation,
        trust_remote_code=mcfg.trust_remote_code,
        use_safetensors=True,
        **quantized,
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
