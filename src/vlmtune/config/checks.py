"""Checks a schema cannot express: group names on the raw dict, cross-field rules on a validated config."""

from __future__ import annotations

import re
from pathlib import Path

from vlmtune.config.data import DataSource
from vlmtune.config.schema import BUILTIN_MODEL, GROUPS, Config

INITS = "default, gaussian, pissa, pissa_niter_N (N >= 1 SVD iterations, e.g. pissa_niter_16), olora, loftq"
INIT_PATTERN = re.compile(r"default|gaussian|pissa|pissa_niter_[1-9][0-9]*|olora|loftq")
# What LoftQ quantizes to for each model.quantize (peft LoftQConfig loftq_bits: 4 means NF4); fp4 has none.
LOFTQ_BITS = {"nf4": 4, "int8": 8}


def raw_problems(raw: dict) -> list[str]:
    """Checks that need only the raw config dict, so they are reported even beside schema errors."""
    problems = []
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    path = model.get("path", BUILTIN_MODEL)
    if isinstance(path, str) and path != BUILTIN_MODEL:
        p = Path(path)
        if not p.is_dir():
            problems.append(
                f"'model.path': '{p}' is not a local folder (vlmtune loads local model folders only; download it first, or use {BUILTIN_MODEL})"
            )
        elif not (p / "config.json").is_file():
            problems.append(f"'model.path': '{p}' has no config.json")
    return problems


def semantic_problems(cfg: Config) -> list[str]:
    """Cross-field checks on a validated config that a schema cannot express."""
    problems = []
    for name, g in cfg.groups.items():
        if isinstance(g.targets, str) and g.targets not in ("all-linear", "attention", "mlp"):
            problems.append(
                f"'groups.{name}.targets': '{g.targets}' is not all-linear, attention or mlp; give a list for module names, e.g. [{g.targets}]"
            )
        if isinstance(g.targets, list) and not g.targets:
            problems.append(f"'groups.{name}.targets' is an empty list")
    if not any(cfg.group(g).mode != "frozen" for g in GROUPS):
        problems.append("every group is frozen: set at least one of groups.<group>.mode to lora or full")
    problems += _mix_problems(cfg.data)
    if cfg.train.packing_length is not None and not cfg.train.packing:
        problems.append(
            "'train.packing_length' is set but train.packing is false: set train.packing: true or drop packing_length"
        )
    problems += _method_problems(cfg)
    problems += _sharding_problems(cfg)
    problems += _quantize_problems(cfg)
    problems += _variant_problems(cfg)
    if cfg.data.load == "lazy" and cfg.train.group_by_length:
        problems.append(
            "'train.group_by_length' sorts batches by every sample's length before training, but 'data.load' is lazy "
            "(a sample's length is known only when it is read): set train.group_by_length: false, or data.load: "
            "upfront (every sample read and measured before the first step)"
        )
    return problems


def _method_problems(cfg: Config) -> list[str]:
    """What a preference or RL method cannot run with: packed rows and lazily read data."""
    method = cfg.train.method
    if method == "sft":
        return []
    problems = []
    what = "rollouts (a prompt's sampled answers)" if method == "grpo" else "preference pairs and labelled answers"
    if cfg.train.packing:
        problems.append(
            f"'train.packing' is true but train.method is {method}: packing lays samples end to end in shared rows; "
            f"{what} are not packed (each answer is scored on its own); set train.packing: false"
        )
    if cfg.data.load == "lazy":
        problems.append(
            f"'data.load' is lazy but train.method is {method}: {method} reads its training data upfront (every "
            "sample checked and paired with what the method needs before the first step); set data.load: upfront "
            "(or auto)"
        )
    dpo = cfg.train.dpo
    if method == "dpo" and dpo.label_smoothing > 0 and dpo.loss not in ("sigmoid", "robust"):
        problems.append(
            f"'train.dpo.label_smoothing' is {dpo.label_smoothing} but train.dpo.loss is {dpo.loss}: label "
            "smoothing is defined for the sigmoid (cDPO) and robust losses only; set it to 0 or choose one of those"
        )
    return problems


def _sharding_problems(cfg: Config) -> list[str]:
    """What train.sharding: fsdp does not run with (each would need its own handling of weights split across
    processes): other methods than sft, packing, PiSSA/OLoRA adapters, and quantized weights."""
    if cfg.train.sharding != "fsdp":
        return []
    problems = []
    if cfg.train.method != "sft":
        problems.append(
            f"'train.sharding' is fsdp but train.method is {cfg.train.method}: its reference model and rollouts read "
            "whole weights, which sharding splits across processes; vlmtune shards sft only. Set train.sharding: none"
        )
    if cfg.train.packing:
        problems.append(
            "'train.sharding' is fsdp but train.packing is true: packed rows under sharding are not verified yet; "
            "set train.packing: false or train.sharding: none"
        )
    for name, g in cfg.groups.items():
        if g.mode == "lora" and g.init.startswith(("pissa", "olora")):
            problems.append(
                f"'groups.{name}.init' is {g.init} with train.sharding: fsdp: its adapter is saved converted for the "
                "original base weights, which vlmtune does not do for weights split across processes; use init "
                "default or gaussian, or train.sharding: none"
            )
    if cfg.model.quantize != "none":
        problems.append(
            f"'model.quantize' is {cfg.model.quantize} with train.sharding: fsdp: quantized weights are not sharded "
            "by vlmtune; set model.quantize: none or train.sharding: none"
        )
    return problems


def _quantize_problems(cfg: Config) -> list[str]:
    """groups.<g>.quantize needs model.quantize, and a group that trains fully is never quantized."""
    problems = []
    for name, g in cfg.groups.items():
        if g.quantize and cfg.model.quantize == "none":
            problems.append(
                f"'groups.{name}.quantize' is true but model.quantize is none: set model.quantize (nf4, fp4, int8) "
                f"or drop groups.{name}.quantize"
            )
        elif g.quantize and g.mode == "full":
            problems.append(
                f"'groups.{name}.quantize' is true but the group trains fully: quantized weights do not train; "
                "set its mode to lora (QLoRA) or its quantize to false"
            )
    return problems


def _variant_problems(cfg: Config) -> list[str]:
    """LoRA variants: a known init, LoftQ with a quantization it supports, PiSSA/OLoRA without DoRA, none on a full
    group."""
    problems = []
    for name, g in cfg.groups.items():
        key = f"groups.{name}"
        if not INIT_PATTERN.fullmatch(g.init):
            problems.append(f"'{key}.init': '{g.init}' is not one of {INITS}")
        elif g.init == "loftq" and cfg.model.quantize not in LOFTQ_BITS:
            problems.append(
                f"'{key}.init' is loftq but model.quantize is {cfg.model.quantize}: LoftQ starts LoRA from the error of "
                "quantizing the group's weights to nf4 or int8; set model.quantize: nf4 (or int8), or another init"
            )
        elif g.init == "loftq" and g.quantize:
            problems.append(
                f"'{key}.quantize' is true but {key}.init is loftq, which quantizes the group's layers itself "
                f"(peft LoftQ); drop {key}.quantize"
            )
        if g.init.startswith(("pissa", "olora")) and g.dora:
            problems.append(
                f"'{key}.dora' is true with {key}.init {g.init}: a PiSSA/OLoRA adapter is saved converted to a plain "
                "LoRA of the original base weights (peft), which DoRA's magnitudes cannot join; use dora with init "
                "default or gaussian"
            )
        if g.mode == "full":
            lora_only = [k for k in ("dora", "rslora", "lr_ratio_b") if getattr(g, k)]
            lora_only += ["init"] if g.init != "default" else []
            if lora_only:
                problems.append(
                    f"'{key}' trains fully (mode full) but sets {', '.join(lora_only)}, which apply to LoRA only; "
                    "drop them or set its mode to lora"
                )
    return problems


def _mix_problems(data) -> list[str]:
    """Weights are relative shares of one mix: every training source has one, or none does."""
    if not isinstance(data.train, list):
        return []
    weighted = [isinstance(s, DataSource) and s.weight is not None for s in data.train]
    if any(weighted) and not all(weighted):
        bare = [s if isinstance(s, str) else s.path for s, w in zip(data.train, weighted) if not w]
        return [
            f"'data.train': some sources have a weight and {', '.join(bare)} not; give every source a weight "
            "(its share of each epoch) or none (every sample once per epoch)"
        ]
    if isinstance(data.eval, list) and any(isinstance(s, DataSource) and s.weight is not None for s in data.eval):
        return ["'data.eval': weights mix training data only; evaluation reads every eval sample once"]
    return []
