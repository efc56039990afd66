"""Export a checkpoint for deployment: the peft adapter alone, or LoRA merged into the base weights.

A merged export is written so that plain ``AutoModelForImageTextToText.from_pretrained`` and
``AutoProcessor.from_pretrained`` load it, and is checked before it is kept: the folder is reloaded with
plain transformers and its logits on a probe batch are compared with the unmerged model's. LoRA is merged
in float32 and the result is saved in the base model's own dtype (``config.json``), unless told otherwise.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from vlmtune.commands.loading import load_checkpoint
from vlmtune.eval.alignment import token_ids
from vlmtune.eval.generate import left_padded, prompt_features
from vlmtune.paths import begin, commit, overlap_problem
from vlmtune.tracking import echo

# Max |merged - unmerged| logit allowed, per unit of the largest |logit| (at least 1): float32 only sees
# summation-order noise; half precisions round every merged weight (bf16 keeps 8 mantissa bits).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class ExportError(RuntimeError):
    """An export that cannot be written or fails its logits check."""


@dataclass
class ExportReport:
    """What was written: kind (adapter / merged), weight bytes, and the logits check of a merged export."""

    out: Path
    kind: str
    weight_bytes: int
    max_abs_diff: float | None = None
    tolerance: float | None = None
    dtype: str | None = None

    def lines(self) -> list[str]:
        out = [f"wrote {self.kind} export to {self.out} ({self.weight_bytes / 1e6:.2f} MB of weights)"]
        if self.max_abs_diff is not None:
            out.append(
                f"logits check (plain transformers reload vs. unmerged, {self.dtype}): max abs diff "
                f"{self.max_abs_diff:.3g} <= tolerance {self.tolerance:.3g}"
            )
        return out


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


@torch.no_grad()
def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    merge: bool = False,
    dtype: str | None = None,
    atol: float | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> ExportReport:
    """Writes the adapter (``merge=False``) or the merged model (``merge=True``) of a checkpoint to ``out``.

    Args:
        checkpoint: a checkpoint folder written by ``vlmtune train`` (or a full model folder, with ``merge``).
        out: the export folder; written atomically (``out.tmp`` first).
        merge: merge LoRA (and the fully trained groups) into the base weights.
        dtype: the merged model's saved dtype; None means the base model's own.
        atol: the allowed max abs logit difference; None means ``TOLERANCE`` for the saved dtype.
        overwrite: replace a non-empty ``out``.
        trust_remote_code: the user's opt-in to running the model folder's own code (``--trust-remote-code``).

    Raises:
        CheckpointError: the checkpoint is missing or incomplete.
        ExportError: an adapter export of a checkpoint without LoRA, or a merged export whose logits differ
            from the unmerged model's beyond the tolerance (nothing is written then).
    """
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    checkpoint, out = Path(checkpoint), Path(out)
    model, processor, cfg = load_checkpoint(checkpoint, "cpu", dtype="float32", trust_remote_code=trust_remote_code)
    is_adapter = isinstance(model, PeftModel)
    if not merge and not is_adapter:
        raise ExportError(
            f"'{checkpoint}' holds a full model (no group used LoRA), not an adapter; "
            "export it with --merge to write a plain transformers folder"
        )
    tmp = _prepare(out, overwrite, checkpoint)
    if not merge:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        if (checkpoint / "config.yaml").is_file():
            shutil.copy(checkpoint / "config.yaml", tmp / "config.yaml")
        commit(tmp, out)
        return ExportReport(out, "adapter", (out / "adapter_model.safetensors").stat().st_size)

    target = getattr(torch, dtype) if dtype else saved_dtype(model)
    probe = probe_batch(processor)
    reference = model(**probe).logits.float()
    merged = model.merge_and_unload() if is_adapter else model
    merged.to(target).save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp, dtype=target, use_safetensors=True).eval()
    diff = float((reloaded(**probe).logits.float() - reference).abs().max())
    tol = atol if atol is not None else TOLERANCE.get(target, 1e-2) * max(1.0, float(reference.abs().max()))
    if not diff <= tol:
        shutil.rmtree(tmp)
        raise ExportError(
            f"merged logits differ from the unmerged model's by {diff:.3g} (max abs, {target}) on the "
            f"probe batch, above the tolerance {tol:.3g}; nothing was written to '{out}'"
        )
    commit(tmp, out)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return ExportReport(out, "merged", size, diff, tol, str(target).removeprefix("torch."))


def command(args) -> int:
    """``vlmtune export --checkpoint DIR --out DIR [--merge] [--dtype D] [--atol X] [--overwrite]``."""
    try:
        report = export_checkpoint(
            args.checkpoint, args.out, args.merge, args.dtype, args.atol, args.overwrite, args.trust_remote_code
        )
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in report.lines():
        echo(line)
    return 0
