"""LLaMA-Factory's keys for how weights are held and adapted: precision (``bf16``, ``fp16``), quantization
(``quantization_bit``, ...) and the LoRA variants (``use_dora``, ``use_rslora``, ``pissa_init``,
``loraplus_lr_ratio``), each translation printed; ``vlmtune.config.llamafactory`` calls these."""

from __future__ import annotations

from typing import Any

# LoRA-variant keys: they apply to every LoRA group the tuning keys make (LLaMA-Factory has one LoRA for all).
VARIANT_KEYS = {"use_dora", "use_rslora", "pissa_init", "pissa_iter", "pissa_convert", "loraplus_lr_ratio"}
QUANTIZATION_KEYS = {"quantization_bit", "quantization_type", "quantization_method", "double_quantization"}
WEIGHT_KEYS = VARIANT_KEYS | QUANTIZATION_KEYS
PISSA_ITER = 16  # LLaMA-Factory's default pissa_iter (-1: the exact SVD)


def _set(out: dict, path: str, value: Any) -> None:
    node = out
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def variants(flat: dict, groups: dict[str, dict], lines: list[str], problems: list[str]) -> None:
    """use_dora, use_rslora, pissa_init (+ pissa_iter) and loraplus_lr_ratio -> the same setting on every LoRA
    group of ``groups`` (the translated tuning keys)."""
    lora = [g for g, s in groups.items() if s.get("mode") == "lora"]
    where = f"groups.<{'|'.join(lora) or 'none'}>"
    settings: dict[str, Any] = {}
    for key, setting in (("use_dora", "dora"), ("use_rslora", "rslora")):
        if key in flat:
            settings[setting] = bool(flat[key])
            lines.append(f"{key}: {flat[key]} -> {where}.{setting}={str(bool(flat[key])).lower()}")
    if flat.get("pissa_init"):
        iters = flat.get("pissa_iter", PISSA_ITER)
        if not isinstance(iters, int) or (iters < 1 and iters != -1):
            problems.append(f"'pissa_iter: {iters}' must be a positive number of SVD iterations, or -1 (exact SVD)")
        else:
            settings["init"] = "pissa" if iters == -1 else f"pissa_niter_{iters}"
            given = f", pissa_iter: {iters}" if "pissa_iter" in flat else f" (pissa_iter {PISSA_ITER}, the default)"
            lines.append(f"pissa_init: true{given} -> {where}.init={settings['init']}")
    else:
        for key in ("pissa_init", "pissa_iter"):
            if key in flat:
                lines.append(f"{key}: {flat[key]} -> no effect (pissa_init is not true)")
    if "pissa_convert" in flat:
        lines.append(
            f"pissa_convert: {flat['pissa_convert']} -> no effect (a PiSSA adapter is always saved converted to LoRA "
            "for the original base)"
        )
    if "loraplus_lr_ratio" in flat and flat["loraplus_lr_ratio"] is not None:
        settings["lr_ratio_b"] = flat["loraplus_lr_ratio"]
        lines.append(f"loraplus_lr_ratio: {flat['loraplus_lr_ratio']} -> {where}.lr_ratio_b")
    for g in lora:
        groups[g].update(settings)


def quantization(flat: dict, out: dict, lines: list[str], problems: list[str]) -> None:
    """quantization_bit 4 | 8 (+ quantization_type, double_quantization) -> model.quantize and model.double_quant,
    through bitsandbytes: quantization_method bnb only."""
    method = flat.get("quantization_method", "bnb")
    if method not in ("bnb", "bitsandbytes"):
        problems.append(
            f"'quantization_method: {method}' is not supported; vlmtune quantizes through bitsandbytes only "
            "(quantization_method: bnb)"
        )
        return
    if "quantization_method" in flat:
        lines.append(f"quantization_method: {method} -> bitsandbytes (model.quantize)")
    bits = flat.get("quantization_bit")
    kind = str(flat.get("quantization_type", "nf4"))
    if bits is None:
        for key in ("quantization_type", "double_quantization"):
            if key in flat:
                lines.append(f"{key}: {flat[key]} -> no effect (quantization_bit is not set)")
        return
    if bits not in (4, 8):
        problems.append(f"'quantization_bit: {bits}' is not supported; bitsandbytes quantizes to 4 or 8 bits")
        return
    if bits == 4 and kind not in ("nf4", "fp4"):
        problems.append(f"'quantization_type: {kind}' is not one of nf4, fp4")
        return
    quantize = kind if bits == 4 else "int8"
    _set(out, "model.quantize", quantize)
    if "quantization_type" in flat and bits == 8:
        lines.append(f"quantization_type: {kind} -> no effect (8-bit weights are int8)")
    typed = f", quantization_type: {kind}" if "quantization_type" in flat and bits == 4 else ""
    lines.append(f"quantization_bit: {bits}{typed} -> model.quantize={quantize}")
    if "double_quantization" in flat:
        _set(out, "model.double_quant", bool(flat["double_quantization"]))
        lines.append(f"double_quantization: {flat['double_quantization']} -> model.double_quant")


def precision(flat: dict, out: dict, lines: list[str]) -> None:
    """bf16 / fp16: the weight dtype on a GPU; on a machine without one they are noted and ignored (float32)."""
    import torch  # here: config loading without a precision key does not pay for it

    for key, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        if not flat.get(key):
            continue
        if not torch.cuda.is_available():
            lines.append(f"{key}: true -> no effect on this machine (no GPU: trains in float32)")
        elif "model" not in out or "dtype" not in out["model"]:
            _set(out, "model.dtype", dtype)
            lines.append(f"{key}: true -> model.dtype={dtype}")
