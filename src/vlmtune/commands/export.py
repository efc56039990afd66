"""Export a checkpoint for deployment: the peft adapter alone, LoRA merged into the base weights, or a base + adapter
pair for vLLM.

A merged export is written so that plain ``AutoModelForImageTextToText.from_pretrained`` and
``AutoProcessor.from_pretrained`` load it, and is checked before it is kept: the folder is reloaded with
plain transformers and its logits on a probe batch are compared with the unmerged model's. LoRA is merged
in float32 and the result is saved in the base model's own dtype (``config.json``), unless told otherwise.

A vLLM export (``--format vllm``) writes ``base/`` (a plain transformers folder: the base with every LoRA outside the
language model merged in and the fully trained groups' weights written in, processor included) and, if the language
model has LoRA, ``adapter/`` (a peft adapter of the language model's LoRA only). It is checked the same way: ``base/``
reloaded with plain transformers, ``adapter/`` put on it with ``PeftModel.from_pretrained``, logits compared with the
checkpoint's. Why this split, from vLLM's source:

- ``vllm/lora/peft_helper.py`` (``PEFTHelper``) reads ``adapter_config.json``: ``r``, ``lora_alpha`` and
  ``target_modules`` are required; ``modules_to_save`` must be empty and DoRA is refused, so fully trained groups
  cannot travel in an adapter; ``r`` must not exceed ``--max-lora-rank`` (``vllm/config/lora.py``: 1, 8, 16, 32, 64,
  128, 256, 320 or 512, default 16). It keeps one ``r`` and one ``lora_alpha`` per adapter (``rank_pattern`` and
  ``alpha_pattern`` are not among its fields), so the adapter holds one group's LoRA. ``base_model_name_or_path`` is
  not read: the base is what ``vllm serve`` is given.
- ``vllm/lora/lora_model.py`` (``LoRAModel.from_local_checkpoint``) reads ``adapter_model.safetensors`` and refuses a
  tensor whose module's last name is not a linear layer of the served model (``expected_lora_modules``; packed
  layers are unpacked through ``packed_modules_mapping``, e.g. ``qkv_proj`` -> ``q_proj``, ``k_proj``, ``v_proj``).
  Names are peft's own (``base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight``): the
  model's ``hf_to_vllm_mapper`` (``vllm/model_executor/models/qwen2_vl.py``) maps them onto vLLM's modules.
- ``vllm/lora/model_manager.py``: for a multimodal model, LoRA layers are made only under the language model
  (``get_mm_mapping``; Qwen2-VL: tower ``visual.``, connector ``visual.merger.``) unless the experimental
  ``--enable-tower-connector-lora`` is given and the model supports it; vision-tower and projector LoRA would pass
  the name check (``qkv``, ``proj``, ``fc1``, ``fc2`` are linear names of the served model) and then be left out
  silently, so they are merged into ``base/``, as is LoRA on ``lm_head`` (vLLM's is a ``ParallelLMHead``, not a
  linear layer, and takes LoRA only where the model lists it in ``embedding_modules``).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from vlmtune.commands.loading import load_checkpoint, resolve_checkpoint
from vlmtune.config.schema import ModelConfig
from vlmtune.eval.alignment import token_ids
from vlmtune.eval.generate import left_padded, prompt_features
from vlmtune.model.groups import GroupMap, assign_groups, strip_peft_prefix
from vlmtune.model.load import arch_for
from vlmtune.paths import begin, commit, overlap_problem
from vlmtune.tracking import echo

# Max |merged - unmerged| logit allowed, per unit of the largest |logit| (at least 1): float32 only sees
# summation-order noise; half precisions round every merged weight (bf16 keeps 8 mantissa bits).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
FORMATS = ("adapter", "merged", "vllm")
# The values vLLM's --max-lora-rank takes (vllm/config/lora.py, MaxLoRARanks).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class ExportError(RuntimeError):
    """An export that cannot be written or fails its logits check."""


@dataclass
class ExportReport:
    """What was written: kind (adapter / merged / vllm), weight bytes, the logits check of a merged or vLLM export,
    and for a vLLM export the command that serves it."""

    out: Path
    kind: str
    weight_bytes: int
    max_abs_diff: float | None = None
    tolerance: float | None = None
    dtype: str | None = None
    serve: str | None = None
    notes: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        out = [f"wrote {self.kind} export to {self.out} ({self.weight_bytes / 1e6:.2f} MB of weights)"]
        if self.max_abs_diff is not None:
            reload = "plain transformers + peft reload" if self.kind == "vllm" else "plain transformers reload"
            out.append(
                f"logits check ({reload} vs. unmerged, {self.dtype}): max abs diff "
                f"{self.max_abs_diff:.3g} <= tolerance {self.tolerance:.3g}"
            )
        if self.serve is not None:
            out.append(f"serve it with vLLM (not run here): {self.serve}")
        return out + list(self.notes)


def probe_batch(processor) -> dict:
    """Two fixed prompts with seeded noise images of different sizes (left-padded), for the logits check."""
    gen = torch.Generator().manual_seed(0)
    feats = []
    for (h, w), question in (((64, 64), "Describe the image."), ((48, 80), "What is in the picture?")):
        pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()
        feats.append(prompt_features(processor, [("user", "<image>" + question)], [Image.fromarray(pixels, "RGB")]))
    return left_padded(feats, *token_ids(processor))


def saved_dtype(model) -> torch.dtype:
    """The dtype the base model was published in (its ``config.json``), float32 if it does not say."""
    base = getattr(model, "get_base_model", lambda: model)()
    folder = Path(getattr(base, "name_or_path", "") or ".")
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    name = config.get("dtype") or config.get("torch_dtype") or config.get("text_config", {}).get("dtype")
    return (
        getattr(torch, name)
        if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype)
        else torch.float32
    )


def _prepare(out: Path, overwrite: bool, checkpoint: Path) -> Path:
    """The temporary folder to write the export into (``paths.begin``), once ``out`` may be written: never the
    checkpoint itself, a folder around or inside it, nor a run folder (``--overwrite`` would delete them)."""
    why = overlap_problem(out, checkpoint)
    if why is not None:
        raise ExportError(f"--out {why}; an export goes to a folder of its own, outside checkpoints and run folders")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"output folder '{out}' exists and is not empty; choose a new folder or pass --overwrite")
    return begin(out)


def _format(merge: bool, kind: str | None) -> str:
    """The export format: ``kind``, or ``--merge`` (an alias of ``merged``), or ``adapter``."""
    if kind is not None and kind not in FORMATS:
        raise ExportError(f"unknown export format '{kind}'; formats are {', '.join(FORMATS)}")
    if merge and kind not in (None, "merged"):
        raise ExportError(f"--merge means --format merged; it cannot be combined with --format {kind}")
    return kind or ("merged" if merge else "adapter")


def _check_logits(what: str, tmp: Path, out: Path, reloaded, probe: dict, reference, target, atol) -> tuple:
    """(max abs diff, tolerance) of the reloaded export's logits against the checkpoint's; above the tolerance the
    temporary folder is removed and ExportError raised, so that nothing is written."""
    diff = float((reloaded(**probe).logits.float() - reference).abs().max())
    tol = atol if atol is not None else TOLERANCE.get(target, 1e-2) * max(1.0, float(reference.abs().max()))
    if not diff <= tol:
        shutil.rmtree(tmp)
        raise ExportError(
            f"{what} logits differ from the unmerged model's by {diff:.3g} (max abs, {target}) on the "
            f"probe batch, above the tolerance {tol:.3g}; nothing was written to '{out}'"
        )
    return diff, tol


@torch.no_grad()
def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    merge: bool = False,
    dtype: str | None = None,
    atol: float | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    kind: str | None = None,
) -> ExportReport:
    """Writes the adapter, the merged model or the vLLM pair (``base/`` + ``adapter/``) of a checkpoint to ``out``.

    Args:
        checkpoint: a checkpoint folder written by ``vlmtune train`` (or a full model folder, except as an adapter).
        out: the export folder; written atomically (``out.tmp`` first).
        merge: merge LoRA (and the fully trained groups) into the base weights: the same as ``kind="merged"``.
        dtype: the saved dtype of a merged model or of ``base/``; None means the base model's own.
        atol: the allowed max abs logit difference; None means ``TOLERANCE`` for the saved dtype.
        overwrite: replace a non-empty ``out``.
        trust_remote_code: the user's opt-in to running the model folder's own code (``--trust-remote-code``).
        kind: ``adapter``, ``merged`` or ``vllm`` (``--format``); None means ``merged`` with ``merge``, else ``adapter``.

    Raises:
        CheckpointError: the checkpoint is missing or incomplete.
        ExportError: an unknown format or ``merge`` with another one, an adapter export of a checkpoint without
            LoRA, a vLLM export whose language-model LoRA vLLM cannot hold, or a merged or vLLM export whose logits
            differ from the unmerged model's beyond the tolerance (nothing is written then).
    """
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    kind = _format(merge, kind)
    checkpoint, out = resolve_checkpoint(checkpoint)[0], Path(out)  # a run folder means its final/
    # Every export works on the base in full precision, also after QLoRA (model.quantize): the quantized weights
    # are the base's, rounded; merging into them would round LoRA's update too (and an adapter is the same either way).
    model, processor, cfg = load_checkpoint(
        checkpoint, "cpu", dtype="float32", trust_remote_code=trust_remote_code, quantized=False
    )
    is_adapter = isinstance(model, PeftModel)
    if kind == "adapter" and not is_adapter:
        raise ExportError(
            f"'{checkpoint}' holds a full model (no group used LoRA), not an adapter; "
            "export it with --merge (or --format vllm) to write a plain transformers folder"
        )
    if kind == "vllm":
        return _export_vllm(model, processor, cfg, checkpoint, out, dtype, atol, overwrite)
    tmp = _prepare(out, overwrite, checkpoint)
    if kind == "adapter":
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        if (checkpoint / "config.yaml").is_file():
            shutil.copy(checkpoint / "config.yaml", tmp / "config.yaml")
        commit(tmp, out)
        return ExportReport(out, "adapter", sum(p.stat().st_size for p in out.rglob("*.safetensors")))

    target = getattr(torch, dtype) if dtype else saved_dtype(model)
    probe = probe_batch(processor)
    reference = model(**probe).logits.float()
    merged = model.merge_and_unload() if is_adapter else model
    merged.to(target).save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp, dtype=target, use_safetensors=True).eval()
    diff, tol = _check_logits("merged", tmp, out, reloaded, probe, reference, target, atol)
    commit(tmp, out)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    notes = ()
    if cfg is not None and cfg.model.quantize != "none":
        notes = (
            f"merged into the base's full-precision weights, saved as {str(target).removeprefix('torch.')} "
            f"(the run trained on them quantized, model.quantize: {cfg.model.quantize})",
        )
    return ExportReport(out, "merged", size, diff, tol, str(target).removeprefix("torch."), notes=notes)


def _language_model_lora(model, gmap: GroupMap) -> tuple[list[str], int, float, bool, str]:
    """The language model's LoRA layers (module names as peft wraps them), their one rank, alpha and rsLoRA flag,
    and the adapter that holds them (``default``, or ``language_model`` when the groups' variants differ).

    Raises:
        ExportError: the layers differ in rank or alpha, use DoRA, or the rank is above what vLLM serves.
    """
    from peft.tuners.lora import LoraLayer

    active = model.active_adapters
    held = {
        name: next(a for a in active if a in module.r)
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
        and any(a in module.r for a in active)
        and gmap.group_of(name) == "language_model"
    }
    if not held:
        return [], 0, 0.0, False, ""
    adapter = next(iter(held.values()))
    if model.peft_config[adapter].use_dora:
        raise ExportError(
            "the language model's LoRA uses DoRA (groups.language_model.dora), which vLLM refuses "
            "(vllm/lora/peft_helper.py); export with --format merged instead"
        )
    modules = dict(model.named_modules())
    layers = {name: (modules[name].r[a], modules[name].lora_alpha[a]) for name, a in held.items()}
    settings = set(layers.values())
    if len(settings) > 1:
        raise ExportError(
            f"the language model's LoRA layers differ in (rank, alpha): {sorted(settings)}; vLLM holds one rank and "
            "one alpha per adapter (vllm/lora/peft_helper.py); export with --format merged instead"
        )
    ((rank, alpha),) = settings
    if rank > VLLM_MAX_LORA_RANKS[-1]:
        raise ExportError(
            f"the language model's LoRA rank {rank} is above {VLLM_MAX_LORA_RANKS[-1]}, the largest --max-lora-rank "
            "vLLM takes (vllm/config/lora.py); export with --format merged instead"
        )
    return list(layers), rank, alpha, bool(model.peft_config[adapter].use_rslora), adapter


def _serve_command(out: Path, rank: int) -> str:
    """``vllm serve`` for the export: the base, and the adapter under the export folder's name if there is one."""
    base = f"vllm serve {out.resolve() / 'base'}"
    if not rank:
        return base
    max_rank = next(r for r in VLLM_MAX_LORA_RANKS if r >= rank)
    return f"{base} --enable-lora --lora-modules {out.name}={out.resolve() / 'adapter'} --max-lora-rank {max_rank}"


def _export_vllm(model, processor, cfg, checkpoint: Path, out: Path, dtype, atol, overwrite) -> ExportReport:
    """``base/`` (every LoRA outside the language model merged, full groups written in) and ``adapter/`` (the
    language model's LoRA), checked by reloading both with plain transformers + peft."""
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForImageTextToText

    is_adapter = isinstance(model, PeftModel)
    plain = model.get_base_model() if is_adapter else model
    mcfg = cfg.model if cfg is not None else ModelConfig()
    gmap = assign_groups([n for n, _ in plain.named_parameters()], arch_for(plain, mcfg))
    layers, rank, alpha, rslora, adapter = _language_model_lora(model, gmap) if is_adapter else ([], 0, 0.0, False, "")
    tmp = _prepare(out, overwrite, checkpoint)
    target = getattr(torch, dtype) if dtype else saved_dtype(model)
    probe = probe_batch(processor)
    reference = model(**probe).logits.float()

    base = model
    if is_adapter:
        prefixes = tuple(name + "." for name in layers)
        kept = {k: v for k, v in get_peft_model_state_dict(model, adapter_name=adapter or "default").items()}
        kept = {k: v for k, v in kept.items() if k.startswith(prefixes)}
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and name not in layers:
                module.merge()  # in float32, into the base weight
        base = model.unload()  # fully trained groups: their trained copies replace the originals
    if layers:
        lm_config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            use_rslora=rslora,
            target_modules=[strip_peft_prefix(n) for n in layers],
            lora_dropout=0.0,
            bias="none",
        )
        lm = get_peft_model(base, lm_config)
        loaded = set_peft_model_state_dict(lm, kept)
        missing = [k for k in loaded.missing_keys if ".lora_" in k]
        if loaded.unexpected_keys or missing:  # the same layers were wrapped; anything else is a vlmtune bug
            raise RuntimeError(f"adapter of the language model: unexpected {loaded.unexpected_keys}, missing {missing}")
        lm.peft_config["default"].base_model_name_or_path = str(out.resolve() / "base")
        # save_embedding_layers=False: no embedding is a target, and "auto" would look the base up (not written yet)
        lm.save_pretrained(tmp / "adapter", safe_serialization=True, save_embedding_layers=False)
        base = lm.unload()
    base.to(target).save_pretrained(tmp / "base", safe_serialization=True)
    processor.save_pretrained(tmp / "base")

    reloaded = AutoModelForImageTextToText.from_pretrained(tmp / "base", dtype=target, use_safetensors=True).eval()
    if layers:
        reloaded = PeftModel.from_pretrained(reloaded, tmp / "adapter").eval()
    diff, tol = _check_logits("exported (base/ + adapter/)", tmp, out, reloaded, probe, reference, target, atol)
    commit(tmp, out)
    size = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    notes = () if layers else ("the language model has no LoRA: everything is merged into base/; no adapter/ written",)
    dtype_name = str(target).removeprefix("torch.")
    return ExportReport(out, "vllm", size, diff, tol, dtype_name, _serve_command(out, rank), notes)


def command(args) -> int:
    """``vlmtune export --checkpoint DIR --out DIR [--format adapter|merged|vllm] [--merge] [--dtype D] [--atol X]
    [--overwrite]``."""
    try:
        report = export_checkpoint(
            args.checkpoint,
            args.out,
            args.merge,
            args.dtype,
            args.atol,
            args.overwrite,
            args.trust_remote_code,
            args.format,
        )
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in report.lines():
        echo(line)
    return 0
