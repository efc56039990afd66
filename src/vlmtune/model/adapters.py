"""A run's peft adapters on disk: saved so that the original base model takes them, loaded back all active.

A run has one LoRA adapter, ``default``, or, when its LoRA groups differ in a variant peft holds per adapter (DoRA,
rsLoRA, the initialisation), one per group (``model/tuning.adapter_plans``). peft's ``save_pretrained`` writes
``default`` in the folder itself and every other adapter in a sub-folder of its name; ``load_adapters`` reads them
all back, active together.

PiSSA and OLoRA start from the base weights' principal directions and subtract them from the base weights, so the
trained adapter only fits that changed base. peft's way to share such an adapter (its ``save_pretrained`` argument
``path_initial_model_for_weight_conversion``, see peft's PiSSA and OLoRA docs) saves the difference between the
trained and the initial adapter as a plain LoRA of twice the rank, which the original base takes: the adapter's
initial weights are kept from the start of the run (``initial_weights``) for that.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from vlmtune.model.tuning import ADAPTER

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CONVERTED = ("pissa", "olora")  # peft init_lora_weights values whose adapters are saved converted


def converted(init) -> bool:
    """Whether an adapter of this init_lora_weights is saved converted for the original base."""
    return isinstance(init, str) and init.lower().startswith(CONVERTED)


def initial_weights(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Per PiSSA/OLoRA adapter, its LoRA A and B matrices as initialised (on the CPU, as peft saves them); taken
    right after the adapters are injected. Empty for any other model."""
    config = getattr(model, "peft_config", {})
    if not any(converted(getattr(c, "init_lora_weights", None)) for c in config.values()):
        return {}
    from peft import get_peft_model_state_dict

    out = {}
    for name, c in config.items():
        if converted(c.init_lora_weights):
            weights = get_peft_model_state_dict(model, adapter_name=name)
            out[name] = {k: v.detach().cpu().clone() for k, v in weights.items() if ".lora_A." in k or ".lora_B." in k}
    return out


def save_adapters(
    model: nn.Module, folder: Path, initial: dict[str, dict[str, torch.Tensor]], state_dict: dict | None = None
) -> None:
    """Writes every adapter of a PeftModel to ``folder`` (``default`` there, the others in sub-folders), those in
    ``initial`` converted into plain LoRA for the original base (peft's PiSSA/OLoRA conversion).

    Raises:
        ValueError: a PiSSA/OLoRA adapter without its initial weights in ``initial``.
    """
    missing = [n for n, c in model.peft_config.items() if converted(c.init_lora_weights) and n not in initial]
    if missing:  # saved as they are, they would only fit the base as PiSSA/OLoRA changed it
        raise ValueError(f"adapters {missing} start with PiSSA/OLoRA but their initial weights were not given")
    extra = {} if state_dict is None else {"state_dict": state_dict}
    plain = [name for name in model.peft_config if name not in initial]
    if plain:
        model.save_pretrained(folder, safe_serialization=True, selected_adapters=plain, **extra)
    for name, weights in initial.items():
        _save_converted(model, folder, name, weights, extra)


def _save_converted(model, folder: Path, name: str, weights: dict[str, torch.Tensor], extra: dict) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    trains = {n: p.requires_grad for n, p in model.named_parameters()}
    active = list(model.active_adapters)
    # The conversion keeps LoRA's matrices only; fully trained groups (modules_to_save) travel in the same file,
    # and the initial adapter needs them to load (their values play no part in the conversion).
    rest = {
        k: v.detach().cpu().contiguous()
        for k, v in get_peft_model_state_dict(model, adapter_name=name, **extra).items()
        if ".lora_A." not in k and ".lora_B." not in k
    }
    # peft drops the temporary initial adapter again afterwards, which fails with several adapters active and fully
    # trained groups (modules_to_save holds one active adapter): the adapter being converted alone is active meanwhile.
    model.base_model.set_adapter(name)
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            # The conversion loads the initial adapter beside the PiSSA/OLoRA one (peft warns against mixing those).
            warnings.filterwarnings("ignore", message=".*changes the base weights of the model.*")
            start = Path(tmp) / "vlmtune_initial"  # peft loads it as an adapter of this (folder) name, then drops it
            start.mkdir()
            save_file({**weights, **rest}, str(start / ADAPTER_WEIGHTS))
            model.save_pretrained(
                folder,
                safe_serialization=True,
                selected_adapters=[name],
                path_initial_model_for_weight_conversion=str(start),
                **extra,
            )
    finally:
        model.base_model.set_adapter(active)
        # Loading the initial adapter and switching adapters re-mark what trains (peft's defaults); the plan decides.
        for n, p in model.named_parameters():
            p.requires_grad_(trains.get(n, False))
    if rest:
        path = (folder if name == ADAPTER else folder / name) / ADAPTER_WEIGHTS
        save_file({**load_file(str(path)), **rest}, str(path), metadata={"format": "pt"})


def adapter_folders(folder: Path) -> list[Path]:
    """The folders of a checkpoint's adapters other than ``default``: its sub-folders with an adapter config."""
    return sorted(p for p in Path(folder).iterdir() if p.is_dir() and (p / ADAPTER_CONFIG).is_file())


def load_adapters(base: nn.Module, folder: Path, trainable: bool = False) -> nn.Module:
    """``base`` with every adapter of ``folder`` (peft ``PeftModel.from_pretrained``, then ``load_adapter`` for each
    sub-folder), all active."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, folder, is_trainable=trainable)
    others = adapter_folders(folder)
    for sub in others:
        model.load_adapter(sub, adapter_name=sub.name, is_trainable=trainable)
    if others:
        model.base_model.set_adapter([ADAPTER, *(p.name for p in others)], inference_mode=not trainable)
    return model
