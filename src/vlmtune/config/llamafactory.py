"""LLaMA-Factory's flat keys -> vlmtune's config, with every translation printed.

A flat LLaMA-Factory YAML (``lora_target: merger``, ``additional_target``, ``freeze_*``, ``cutoff_len``, ...)
trains as it is; the keys of precision, quantization and LoRA variants are ``llamafactory_weights.py``'s. The keys mean what their users expect, including the cases that other tools get
wrong: ``lora_target: merger`` puts LoRA on the projector's linear layers (never on the PatchMerger
container), and ``lora_target: all`` covers the projector too unless ``freeze_multi_modal_projector: true``.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

from vlmtune.config.llamafactory_weights import (
    QUANTIZATION_KEYS,
    VARIANT_KEYS,
    WEIGHT_KEYS,
    precision,
    quantization,
    variants,
)
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
    "max_samples": "data.max_samples",
    "dataloader_num_workers": "data.num_workers",
    "video_fps": "data.video_fps",
    "video_maxlen": "data.video_max_frames",
    "video_max_pixels": "data.video_max_pixels",
    "video_min_pixels": "data.video_min_pixels",
    "save_total_limit": "train.save_total_limit",
    "per_device_eval_batch_size": "eval.batch_size",
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
    "pref_ftx": "train.dpo.sft_weight",
    "simpo_gamma": "train.dpo.simpo_gamma",
    "dpo_label_smoothing": "train.dpo.label_smoothing",
    "kto_chosen_weight": "train.kto.desirable_weight",
    "kto_rejected_weight": "train.kto.undesirable_weight",
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
# Keys accepted with a printed note: vlmtune always does what they ask, or they have no meaning here (and why).
NO_EFFECT: dict[str, str] = {
    "do_train": "vlmtune train trains",
    "template": "the processor's own chat template builds prompts",
    "plot_loss": "loss.png is always written",
    "overwrite_output_dir": "a run writes into output_dir; a finished run there is refused unless resumed",
    "overwrite_cache": "vlmtune keeps no preprocessed copy of the data: samples are checked each run, and generated "
    "data and the vision cache are keyed by their content",
    "preprocessing_num_workers": "samples are checked and tokenized in the main process before training "
    "(dataloader_num_workers / data.num_workers sets the loader's workers)",
    "save_only_model": "checkpoints always hold what resuming needs (optimizer, scheduler, RNG, data position); "
    "final/ holds the model alone",
    "ddp_timeout": "processes wait with torch.distributed's default timeout",
    "eval_strategy": "train.eval_steps sets when to evaluate (and eval data, when set, is scored at the start and end)",
    "val_size": "give eval data as eval_dataset (data.eval); vlmtune does not split it off the training data",
    "deepspeed": "sharding is chosen at launch: accelerate launch --config_file examples/accelerate/deepspeed_zero3.yaml "
    "-m vlmtune train CONFIG",
}
# stage -> train.method; pref_beta -> train.dpo.beta and train.kto.beta; pref_loss -> train.dpo.loss.
METHOD_KEYS = {"stage", "pref_beta", "pref_loss"}
STAGES = ("sft", "dpo", "kto")
PREF_LOSSES = ("sigmoid", "hinge", "ipo", "orpo", "simpo")
NOTED_KEYS = {
    "bf16",
    "fp16",
    "report_to",
    "resume_from_checkpoint",
    "mix_strategy",
    "interleave_probs",
    "streaming",
    *NO_EFFECT,
}

LLAMA_FACTORY_KEYS = set(RENAMES) | TUNING_KEYS | METHOD_KEYS | NOTED_KEYS | WEIGHT_KEYS


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


def without_shadowed(raw: dict, override_keys: list[str]) -> dict:
    """``raw`` without the keys that a command-line override names in the other vocabulary, so the command line wins
    whichever vocabulary the file and the override use (``output_dir=DIR`` over a file's ``train.output_dir``, and
    ``train.output_dir=DIR`` over a file's ``output_dir``)."""
    out = dict(raw)
    native_of = dict(RENAMES)
    flat_of = {v: k for k, v in RENAMES.items()}
    for key in override_keys:
        if key in native_of:
            first, *rest = native_of[key].split(".")
            if isinstance(out.get(first), dict):
                node = out[first] = dict(out[first])
                for part in rest[:-1]:
                    if not isinstance(node.get(part), dict):
                        break
                    node = node[part] = dict(node[part])
                else:
                    node.pop(rest[-1], None)
        elif key in flat_of:
            out.pop(flat_of[key], None)
    return out


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
    if (TUNING_KEYS | VARIANT_KEYS) & set(flat):
        out["groups"] = _tuning(flat, lines, problems)
        variants(flat, out["groups"], lines, problems)
    if QUANTIZATION_KEYS & set(flat):
        quantization(flat, out, lines, problems)
    if METHOD_KEYS & set(flat):
        _method(flat, out, lines, problems)
    if "finetuning_type" in flat and flat["finetuning_type"] == "lora":
        lines.append("finetuning_type: lora -> LoRA per group, as lora_target says")
    precision(flat, out, lines)
    if "report_to" in flat:
        targets = [t for t in _split_list(flat["report_to"]) if t != "none"]
        bad = [t for t in targets if t != "tensorboard"]
        if bad:
            problems.append(f"'report_to: {', '.join(bad)}' is not supported; use tensorboard or none")
        _set(out, "train.report_to", [t for t in targets if t == "tensorboard"])
        lines.append(f"report_to: {flat['report_to']} -> train.report_to")
    if "resume_from_checkpoint" in flat:
        _resume(flat, out, lines, problems)
    if "streaming" in flat:
        load = "lazy" if flat["streaming"] else "upfront"
        _set(out, "data.load", load)
        lines.append(f"streaming: {flat['streaming']} -> data.load={load} (JSONL read by a byte-offset index)")
    if "mix_strategy" in flat or "interleave_probs" in flat:
        _mix(flat, out, lines, problems)
    for key, why in NO_EFFECT.items():
        if key in flat:
            lines.append(f"{key}: {flat[key]} -> no effect ({why})")
    return deep_merge(out, native), lines, problems


def _method(flat: dict, out: dict, lines: list[str], problems: list[str]) -> None:
    """stage -> train.method; pref_beta -> the beta of dpo and kto (whichever runs); pref_loss -> train.dpo.loss."""
    if "stage" in flat:
        stage = flat["stage"]
        if stage in STAGES:
            _set(out, "train.method", stage)
            lines.append(f"stage: {stage} -> train.method={stage}")
        else:
            problems.append(
                f"'stage: {stage}' is not supported; vlmtune trains stage: {', '.join(STAGES)} (train.method: "
                "sft, dpo, kto), and grpo (train.method: grpo, rewards in train.grpo.rewards) in place of ppo; "
                "it has no pre-training (pt) or reward-model (rm) stage"
            )
    if "pref_beta" in flat:
        _set(out, "train.dpo.beta", flat["pref_beta"])
        _set(out, "train.kto.beta", flat["pref_beta"])
        lines.append(f"pref_beta: {flat['pref_beta']} -> train.dpo.beta and train.kto.beta")
    if "pref_loss" in flat:
        loss = flat["pref_loss"]
        if loss in PREF_LOSSES:
            _set(out, "train.dpo.loss", loss)
            lines.append(f"pref_loss: {loss} -> train.dpo.loss={loss}")
        elif loss == "kto_pair":
            problems.append(
                "'pref_loss: kto_pair' is not supported; for KTO use stage: kto (train.method: kto) with answers "
                "labelled desirable or undesirable (a kto_tag column)"
            )
        else:
            problems.append(
                f"'pref_loss: {loss}' is not supported; valid: {', '.join(PREF_LOSSES)} "
                "(and vlmtune's own train.dpo.loss: robust)"
            )


def _resume(flat: dict, out: dict, lines: list[str], problems: list[str]) -> None:
    """resume_from_checkpoint: a checkpoint of this run's output_dir resumes it (vlmtune takes the newest complete
    one, which is also what LLaMA-Factory users almost always give); elsewhere is refused."""
    value = flat["resume_from_checkpoint"]
    if value in (None, False, "", "null", "none", "None"):
        lines.append(f"resume_from_checkpoint: {value} -> no effect (a new run; `vlmtune train --resume` resumes)")
        return
    output_dir = flat.get("output_dir")
    if value is True or (output_dir and PurePath(str(value)).parent == PurePath(str(output_dir))):
        _set(out, "train.resume", "auto")
        lines.append(
            f"resume_from_checkpoint: {value} -> train.resume=auto (the newest complete checkpoint of output_dir)"
        )
        return
    problems.append(
        f"'resume_from_checkpoint: {value}': vlmtune resumes a run from its own output_dir (train.resume: auto, "
        "or `vlmtune train --resume`); set output_dir to the run folder that holds this checkpoint"
    )


def _mix(flat: dict, out: dict, lines: list[str], problems: list[str]) -> None:
    """mix_strategy: concat | interleave_under | interleave_over, with interleave_probs -> weighted sources."""
    strategy = str(flat.get("mix_strategy", "concat"))
    if strategy not in ("concat", "interleave_under", "interleave_over"):
        problems.append(f"'mix_strategy: {strategy}' is not one of concat, interleave_under, interleave_over")
        return
    if strategy == "concat":
        if "interleave_probs" in flat:
            problems.append("'interleave_probs' is set but mix_strategy is concat; use interleave_under or _over")
        else:
            lines.append("mix_strategy: concat -> no effect (sources are read one after another)")
        return
    names = _split_list(flat.get("dataset"))
    raw_probs = _split_list(flat.get("interleave_probs"))
    try:
        probs = [float(p) for p in raw_probs] if raw_probs else [1.0] * len(names)
    except ValueError:
        problems.append(f"'interleave_probs: {flat['interleave_probs']}' must be numbers, one per dataset")
        return
    if len(probs) != len(names) or any(p <= 0 for p in probs):
        problems.append(
            f"'interleave_probs' needs one positive number per dataset ({len(names)}: {', '.join(names)}), "
            f"got {len(probs)}"
        )
        return
    data = out.setdefault("data", {})
    data["train"] = [{"path": n, "weight": p} for n, p in zip(names, probs)]
    data["mix_epoch"] = "under" if strategy == "interleave_under" else "over"
    lines.append(
        f"mix_strategy: {strategy}, interleave_probs: {','.join(map(str, probs))} -> data.train weights "
        f"{', '.join(f'{n}={p}' for n, p in zip(names, probs))}, data.mix_epoch={data['mix_epoch']}"
    )
