"""Loading what ``vlmtune train`` wrote (or any plain transformers model folder) for eval, predict and export.

A checkpoint folder is one of:

- a peft adapter: ``adapter_config.json`` + ``adapter_model.safetensors`` (LoRA and the fully trained
  groups' ``modules_to_save``; when the LoRA groups differ in their variant, the other groups' adapters in
  sub-folders of their names), with ``config.yaml`` naming the base model (``model.path``);
- a full model: ``config.json`` + ``model.safetensors`` (or a sharded ``model.safetensors.index.json``);

plus the processor files. A run folder (with ``final/`` and ``metrics.jsonl``) stands for its ``final/``.
Weights are read from safetensors only; remote code runs only if the run's config allows it.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from vlmtune.builtin.base import model_folder
from vlmtune.config.errors import ConfigError, format_validation_error
from vlmtune.config.overrides import apply_overrides
from vlmtune.config.schema import BUILTIN_MODEL, Config, ModelConfig
from vlmtune.config.stages import resolve_stages
from vlmtune.data.dataset import build_dataset
from vlmtune.data.sharegpt import DataError
from vlmtune.eval.alignment import eval_items
from vlmtune.model.adapters import adapter_folders, load_adapters
from vlmtune.model.build import precise_modules
from vlmtune.model.load import load_model
from vlmtune.paths import damaged_weights
from vlmtune.tracking import echo

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PROCESSOR_FILES = ("tokenizer_config.json",)
IMAGE_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


class CheckpointError(FileNotFoundError):
    """A checkpoint folder that is missing or incomplete; the message names the missing file."""


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """A checkpoint or run folder -> (checkpoint folder, run folder if it has ``metrics.jsonl``, else None).

    Raises:
        CheckpointError: the folder does not exist.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder '{folder}' does not exist")
    if (folder / "metrics.jsonl").is_file() and (folder / "final").is_dir():
        return folder / "final", folder
    run = folder.parent if (folder.parent / "metrics.jsonl").is_file() else None
    return folder, run


def read_run_config(folder: Path) -> Config | None:
    """The resolved vlmtune config saved beside a checkpoint (``config.yaml``), or None if there is none.

    Raises:
        ConfigError: the file is not a valid vlmtune config; every problem names its key.
    """
    path = folder / "config.yaml"
    if not path.is_file():
        return None
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path} is damaged: not valid YAML ({e})"], str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path} is damaged: not a mapping of config keys"], str(path))
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e), str(path)) from None


def _check_files(folder: Path) -> str:
    """'adapter' or 'model', after checking every file that kind of checkpoint needs."""
    if (folder / "adapter_config.json").is_file():
        kind, needed = "adapter", [*ADAPTER_FILES, "config.yaml"]
    elif (folder / "config.json").is_file():
        kind, needed = "model", ["config.json"]
        if not (folder / "model.safetensors.index.json").is_file():
            needed.append("model.safetensors")
    else:
        hint = (
            " (a run folder: give its final/ or a checkpoint-N/ folder)" if (folder / "metrics.jsonl").is_file() else ""
        )
        raise CheckpointError(
            f"'{folder}' is not a checkpoint{hint}: it has neither adapter_config.json (a peft adapter written by "
            "vlmtune train) nor config.json (a full transformers model folder)"
        )
    if kind == "adapter":  # the adapters of the groups beyond the first, when they differ in their LoRA variant
        needed += [f"{p.name}/{ADAPTER_FILES[1]}" for p in adapter_folders(folder)]
    missing = [f for f in needed + list(PROCESSOR_FILES) if not (folder / f).is_file()]
    if not any((folder / f).is_file() for f in IMAGE_PROCESSOR_FILES):
        missing.append(" or ".join(IMAGE_PROCESSOR_FILES))
    if missing:
        why = " (config.yaml names the base model of the adapter)" if "config.yaml" in missing else ""
        raise CheckpointError(f"checkpoint '{folder}' ({kind}) is incomplete: missing {', '.join(missing)}{why}")
    damaged = next(filter(None, (damaged_weights(f) for f in [folder, *adapter_folders(folder)])), None)
    if damaged is not None:
        raise CheckpointError(f"checkpoint '{folder}': {damaged}")
    return kind


def _warn_if_other_base(folder: Path, base: Path) -> None:
    """Says so when adapter_config.json names another existing base folder than config.yaml resolves to
    (e.g. a builtin base rebuilt by a newer vlmtune): the adapter's figures would not be its own."""
    import json

    named = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if named and Path(named).is_dir() and Path(named).resolve() != base.resolve():
        echo(
            f"warning: {folder} was trained on base '{named}' (adapter_config.json), but config.yaml's "
            f"model.path loads '{base}'"
        )


def load_checkpoint(
    folder: str | Path,
    device="cpu",
    dtype: str | None = None,
    trust_remote_code: bool = False,
    quantized: bool = True,
):
    """Loads a checkpoint for inference: (model in eval mode, processor, the run's Config or None).

    An adapter is loaded onto its base (``config.yaml``'s ``model.path``) as a ``PeftModel``, every adapter of the
    folder active (``vlmtune.model.adapters.load_adapters``); a full model
    folder is loaded as it is (its own ``config.yaml``, if any, only sets dtype and attention).

    No code from the checkpoint, its base or their folders runs unless the user says so: ``trust_remote_code``
    comes from the command line (``--trust-remote-code``), never from the checkpoint's own ``config.yaml``.

    Args:
        folder: the checkpoint folder (``final/``, ``checkpoint-N/``, a stage folder, or a model folder).
        device: where to put the model (a ``torch.device`` or its name).
        dtype: overrides the run's ``model.dtype`` (``float32``, ``bfloat16``, ...).
        trust_remote_code: the user's own opt-in to running the model folder's Python code.
        quantized: load the base as the run trained on it (``model.quantize``); False loads it in full precision
            (what a merged export merges into).

    Raises:
        CheckpointError: the folder is missing or incomplete (names the missing file), or its config asks to run
            its own code and the user did not opt in.
    """
    import torch
    from transformers import AutoProcessor

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder '{folder}' does not exist")
    kind = _check_files(folder)
    cfg = read_run_config(folder)
    mcfg = cfg.model if cfg is not None else ModelConfig()
    if mcfg.trust_remote_code and not trust_remote_code:
        raise CheckpointError(
            f"{folder / 'config.yaml'} sets model.trust_remote_code: true, which would run Python code from the model "
            "folder; vlmtune never takes that from a checkpoint. If you trust the folder, pass --trust-remote-code"
        )
    mcfg = mcfg.model_copy(update={"trust_remote_code": trust_remote_code})
    if dtype is not None:
        mcfg = mcfg.model_copy(update={"dtype": dtype})
    if not quantized:
        mcfg = mcfg.model_copy(update={"quantize": "none"})
    device = torch.device(device)
    if kind == "adapter":
        if mcfg.path != BUILTIN_MODEL and not (Path(mcfg.path) / "config.json").is_file():
            raise CheckpointError(
                f"the base model of '{folder}' ('model.path: {mcfg.path}' in "
                f"{folder / 'config.yaml'}) is missing: no config.json there"
            )
        base_folder = model_folder(mcfg)
        precise = precise_modules(cfg, [s.cfg for s in resolve_stages(cfg)], base_folder) if cfg and quantized else []
        base, _ = load_model(mcfg, device, base_folder, precise)
        _warn_if_other_base(folder, Path(base.name_or_path))
        model = load_adapters(base, folder)
    else:
        model, _ = load_model(mcfg, device, folder)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=mcfg.trust_remote_code)
    return model.to(device).eval(), processor, cfg


def with_overrides(cfg: Config | None, overrides: list[str] | None) -> Config:
    """The checkpoint's config (defaults if it has none) with ``key.path=value`` overrides, validated.

    Raises:
        ConfigError: every bad key or value, each named.
    """
    raw = (cfg or Config()).model_dump(mode="json")
    try:
        return Config.model_validate(apply_overrides(raw, overrides or []))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e), "command line") from None


def load_eval_data(cfg: Config, spec: str | None, processor, limit: int | None = None) -> list:
    """Eval samples (as ``EvalItem``s, images decoded) from ``spec`` or else the run's ``data.eval``.

    Raises:
        DataError: no data named, a bad or unreadable file or image (named by sample and path), or samples
            without a reference answer.
    """
    spec = spec or cfg.data.eval
    if not spec:
        raise DataError(
            [
                "no eval data: give --data FILE (a JSON/JSONL file in ShareGPT format or builtin:shapes:TASK); "
                "the checkpoint's config.yaml sets no data.eval"
            ]
        )
    try:
        ds = build_dataset(spec, cfg.data, processor, "eval")
    except DataError as e:
        if any("last turn is from the user" in p or "assistant turn" in p for p in e.problems):
            raise DataError(
                e.problems
                + [
                    "evaluation compares generated answers with references: every sample needs a "
                    "final, non-empty assistant turn (the reference answer)"
                ]
            ) from None
        raise
    if len(ds) == 0:
        raise DataError([f"no eval sample of '{spec}' fits data.max_length={cfg.data.max_length}"])
    try:
        return eval_items(ds, limit)
    except ValueError as e:  # an image that opens but cannot be decoded; the message names sample and path
        raise DataError([str(e)]) from None
