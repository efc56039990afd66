"""LLaMA-Factory's flat keys -> vlmtune's config, with every translation printed.

A flat LLaMA-Factory YAML (``lora_target: merger``, ``additional_target``, ``freeze_*``, ``cutoff_len``, ...)
trains as it is. The keys mean what their users expect, including the cases that other tools get
wrong: ``lora_target: merger`` puts LoRA on the projector's linear layers (never on the PatchMerger
container), and ``lora_target: all`` covers the projector too unless ``freeze_multi_modal_projector: true``.
"""

from __future__ import annotations

from typing import Any

from vlmtune.config.overrides import deep_merge

# lora_target / additional_target words that name a whole component group.
GROUP_ALIASES: dict[str, str] = {
    "merger": "projector",
    "projector": "projector",
    "multi_modal_projector": "projector",
    "mm_projector": "projector",
    "visual": "vision_tower",
    "vision_tower": "vision_tower",
    "language_model": "language_model",
    "lm_head": "lm_head",
}

# Plain renames: LLaMA-Factory key -> vlmtune key path.
RENAMES: dict[str, str] = {
    "model_name_or_path": "model.path",
    "trust_remote_code": "model.trust_remote_code",
    "dataset": "data.train",
    "eval_dataset": "data.eval",
    "dataset_dir": "data.dataset_dir",
    "cutoff_len": "data.max_length",
    "image_max_pixels": "data.image_max_pixels",
    "image_min_pixels": "data.image_min_pixels",
    "preprocessing_num_workers": "data.num_workers",
    "output_dir": "train.output_dir",
    "max_steps": "train.max_steps",
    "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "learning_rate": "train.learning_rate",
    "weight_decay": "train.weight_decay",
    "lr_scheduler_type": "train.scheduler",
    "warmup_ratio": "train.warmup_ratio",
    "warmup_steps": "train.warmup_steps",
    "max_grad_norm": "train.max_grad_norm",
    "seed": "train.seed",
    "logging_steps": "train.logging_steps",
    "save_steps": "train.save_steps",
    "eval_steps": "train.eval_steps",
}

TUNING_KEYS = {
    "lora_target",
    "additional_target",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "freeze_vision_tower",
    "freeze_multi_modal_projector",
    "freeze_language_model",
    "finetuning_type",
}
# Keys accepted for compatibility whose effect vlmtune always has (or that only name LLaMA-Factory's stage).
NOTED_KEYS = {"stage", "do_train", "template", "plot_loss", "overwrite_output_dir", "bf16", "fp16", "report_to"}

LLAMA_FACTORY_KEYS = set(RENAMES) | TUNING_KEYS | NOTED_KEYS


def _split_list(value: Any) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(v).strip() for v in items if str(v).strip()]


def _set(native: dict, path: str, value: Any) -> None:
    node = native
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _tuning(raw: dict, lines: list[str], problems: list[str]) -> dict[str, dict]:
    """Group settings from lora_target / additional_target / freeze_* / lora_* keys."""
    groups: dict[str, dict] = {
        g: {"mode": "frozen"} for g in ("vision_tower", "projector", "language_model", "lm_head")
    }
    finetuning = str(raw.get("finetuning_type", "lora"))
    if finetuning not in ("lora", "full"):
        problems.append(
            f"'finetuning_type: {finetuning}' is not supported; use lora or full (or vlmtune's groups.<group>.mode)"
        )
    freeze_vision = bool(raw.get("freeze_vision_tower", True))
    freeze_language = bool(raw.get("freeze_language_model", False))
    freeze_projector = raw.get("freeze_multi_modal_projector")  # None = not said

    if finetuning == "full":
        for g in ("projector", "language_model", "lm_head"):
            groups[g]["mode"] = "full"
        if not freeze_vision:
            groups["vision_tower"]["mode"] = "full"
        if freeze_projector:
            groups["projector"]["mode"] = "frozen"
        if freeze_language:
            groups["language_model"]["mode"] = groups["lm_head"]["mode"] = "frozen"
        lines.append("finetuning_type: full -> " + ", ".join(f"groups.{g}.mode={s['mode']}" for g, s in groups.items()))
        return groups

    targets = _split_list(raw.get("lora_target", "all"))
    names = [t for t in targets if t not in GROUP_ALIASES and t != "all"]
    fully_trained = {GROUP_ALIASES.get(t) for t in _split_list(raw.get("additional_target"))}
    lora_groups: dict[str, Any] = {}
    if "all" in targets:
        # `all` means every linear layer of the groups that train, the projector included unless it is
        # frozen or trained fully by additional_target.
        if not freeze_language:
            lora_groups["language_model"] = "all-linear"
        if not freeze_projector and "projector" not in fully_trained:
            lora_groups["projector"] = "all-linear"
        if not freeze_vision and "vision_tower" not in fully_trained:
            lora_groups["vision_tower"] = "all-linear"
    for t in targets:
        if t in GROUP_ALIASES:
            lora_groups[GROUP_ALIASES[t]] = "all-linear"
    if names:
        # Layer names (q_proj, v_proj, ...) are the language model's; an unfrozen vision tower is then
        # trained fully (below), as its layers have other names (Qwen2-VL: qkv, proj, fc1, fc2).
        if freeze_language:
            problems.append(
                f"lora_target names {', '.join(names)} but freeze_language_model: true leaves no group for them"
            )
        elif lora_groups.get("language_model") != "all-linear":
            lora_groups["language_model"] = names
    for g, t in lora_groups.items():
        groups[g] = {"mode": "lora", "targets": t}
    # LLaMA-Factory's defaults: rank 8, alpha 2 x rank, no dropout.
    for g in lora_groups:
        groups[g].update(
            rank=raw.get("lora_rank", 8), alpha=raw.get("lora_alpha"), dropout=raw.get("lora_dropout", 0.0)
        )
    lines.append(
        f"lora_target: {raw.get('lora_target', 'all (default)')} -> "
        + "; ".join(f"groups.{g}: lora on {t if isinstance(t, str) else ', '.join(t)}" for g, t in lora_groups.items())
    )
    for key in ("lora_rank", "lora_alpha", "lora_dropout"):
        if key in raw:
            lines.append(f"{key}: {raw[key]} -> groups.<{'|'.join(lora_groups) or 'none'}>.{key[5:]}")

    for t in _split_list(raw.get("additional_target")):
        group = GROUP_ALIASES.get(t)
        if group is None:
            problems.append(
                f"'additional_target: {t}' does not name a component group; use one of {', '.join(sorted(GROUP_ALIASES))}"
            )
            continue
        if groups[group]["mode"] == "lora":
            problems.append(
                f"'additional_target: {t}' trains {group} fully but lora_target already puts LoRA on it; choose one"
            )
            continue
        groups[group] = {"mode": "full"}
        lines.append(f"additional_target: {t} -> groups.{group}.mode=full (saved in the adapter)")
    if freeze_projector is False and groups["projector"]["mode"] == "frozen":
        groups["projector"] = {"mode": "full"}
        lines.append("freeze_multi_modal_projector: false -> groups.projector.mode=full")
    if not freeze_vision and groups["vision_tower"]["mode"] == "frozen":
        groups["vision_tower"] = {"mode": "full"}
        lines.append("freeze_vision_tower: false -> groups.vision_tower.mode=full")
    for key in ("freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model"):
        if key in raw:
            lines.append(f"{key}: {raw[key]} -> applied to the group modes above")
    return groups


def translate(raw: dict) -> tuple[dict, list[str], list[str]]:
    """Splits a raw config into vlmtune's nested keys and translated LLaMA-Factory keys.

    Returns:
        (native config dict, printed translation lines, problems found).
    """
    flat = {k: v for k, v in raw.items() if k in LLAMA_FACTORY_KEYS}
    native = {k: v for k, v in raw.items() if k not in LLAMA_FACTORY_KEYS}
    if not flat:
        return native, [], []
    lines: list[str] = ["LLaMA-Factory keys translated:"]
    problems: list[str] = []
    out: dict = {}
    for key, path in RENAMES.items():
        if key in flat:
            value = flat[key]
            if key in ("dataset", "eval_dataset"):
                value = _split_list(value)
                value = value[0] if len(value) == 1 else value
            _set(out, path, value)
            lines.append(f"{key}: {flat[key]} -> {path}")
    if TUNING_KEYS & set(flat):
        out["groups"] = _tuning(flat, lines, problems)
    if "stage" in flat:
        if flat["stage"] != "sft":
            problems.append(
                f"'stage: {flat['stage']}' is not supported; vlmtune trains supervised fine-tuning (stage: sft)"
            )
        else:
            lines.append("stage: sft -> not needed (vlmtune train is supervised fine-tuning)")
    if "finetuning_type" in flat and flat["finetuning_type"] == "lora":
        lines.append("finetuning_type: lora -> LoRA per group, as lora_target says")
    if flat.get("bf16") or flat.get("fp16"):
        dtype = "bfloat16" if flat.get("bf16") else "float16"
        _set(out, "model.dtype", dtype)
        lines.append(f"{'bf16' if flat.get('bf16') else 'fp16'}: true -> model.dtype={dtype}")
    if "report_to" in flat:
        targets = [t for t in _split_list(flat["report_to"]) if t != "none"]
        bad = [t for t in targets if t != "tensorboard"]
        if bad:
            problems.append(f"'report_to: {', '.join(bad)}' is not supported; use tensorboard or none")
        _set(out, "train.report_to", [t for t in targets if t == "tensorboard"])
        lines.append(f"report_to: {flat['report_to']} -> train.report_to")
    for key in ("template", "plot_loss", "do_train", "overwrite_output_dir"):
        if key in flat:
            lines.append(
                f"{key}: {flat[key]} -> not needed ("
                + {
                    "template": "the processor's own chat template builds prompts",
                    "plot_loss": "loss.png is always written",
                    "do_train": "vlmtune train trains",
                    "overwrite_output_dir": "output_dir is written into",
                }[key]
                + ")"
            )
    return deep_merge(out, native), lines, problems
