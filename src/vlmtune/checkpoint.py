"""Writing checkpoints: a peft adapter (or a full model) plus the processor and the resolved config."""

from __future__ import annotations

import shutil
from pathlib import Path

from vlmtune.config import Config, config_to_yaml


def save_checkpoint(model, processor, cfg: Config, out: Path) -> Path:
    """Writes ``out`` atomically: into ``out.tmp`` first, then renamed, so a crash never leaves half a folder.

    A PeftModel writes ``adapter_config.json`` + ``adapter_model.safetensors`` (LoRA weights and the
    fully-trained groups' modules_to_save); a plain model writes ``config.json`` + ``model.safetensors``.
    """
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    (tmp / "config.yaml").write_text(config_to_yaml(cfg), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def adapter_size(folder: Path) -> int:
    """Bytes of the weight files in a checkpoint folder."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
