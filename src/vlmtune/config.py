"""Typed run configuration: YAML, then dotted overrides, validated with every problem reported at once.

Every field carries a description; `vlmtune train --help` prints them as the config reference.
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vlmtune.archs import GROUPS

BUILTIN_MODEL = "builtin:tiny-qwen2-vl"
BUILTIN_DATA_PREFIX = "builtin:shapes:"


class ConfigError(ValueError):
    """Every problem found in a config, reported together."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GroupConfig(_Strict):
    """How one component group (vision_tower, projector, language_model, lm_head) is trained."""

    mode: Literal["frozen", "lora", "full"] = Field("frozen", description="frozen: no update; lora: peft LoRA on the group's linear layers; full: every weight trained and saved with the adapter")
    rank: int = Field(8, gt=0, description="LoRA rank r (the seed suggests 8 or 16 for the projector)")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; empty means 2 x rank, the seed's recommended starting point")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input path of this group's layers")
    targets: str | list[str] = Field("all-linear", description="which linear layers get LoRA: all-linear, attention, mlp, or a list of module names (q_proj, mlp.0, ...) matched as whole dotted suffixes")
    lr: float | None = Field(None, gt=0, description="learning rate of this group; empty means train.learning_rate")
    weight_decay: float | None = Field(None, ge=0, description="AdamW weight decay of this group; empty means train.weight_decay")

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank


class ModelConfig(_Strict):
    """Which model to fine-tune and how to load it."""

    path: str = Field(BUILTIN_MODEL, description=f"a local model folder (config.json + safetensors weights), or {BUILTIN_MODEL} for the builtin tiny pretrained Qwen2-VL")
    arch: str | None = Field(None, description="architecture registry entry; empty means chosen from config.json's model_type")
    arch_entry: dict[str, Any] | None = Field(None, description="a user-supplied registry entry: {model_types: [...], patterns: {vision_tower: [...], projector: [...], language_model: [...], lm_head: [...]}}")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="weight dtype; auto is float32 on CPU and bfloat16 on a GPU that supports it")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field("sdpa", description="attention kernel passed to transformers")
    trust_remote_code: bool = Field(False, description="allow a model folder's own Python code to run (off unless you trust the folder)")


class AugmentConfig(_Strict):
    """Seeded visual augmentation of the training split (torchvision transforms); evaluation data is never augmented."""

    enabled: bool = Field(False, description="augment training images; each draw depends only on (seed, sample, epoch), so a resumed run sees the same images")
    seed: int = Field(0, description="seed of the augmentation draws")
    crop_scale: tuple[float, float] = Field((0.8, 1.0), description="random resized crop: range of the kept area fraction ([1, 1] turns cropping off); the crop is resized back to the image's size, so the processor's pixel bounds and image-token count are unchanged")
    crop_ratio: tuple[float, float] = Field((0.75, 4 / 3), description="random resized crop: range of the crop's aspect ratio (width / height)")
    brightness: float = Field(0.2, ge=0, description="colour jitter: brightness factor drawn from [1 - x, 1 + x] (0 turns it off)")
    contrast: float = Field(0.2, ge=0, description="colour jitter: contrast factor drawn from [1 - x, 1 + x]")
    saturation: float = Field(0.2, ge=0, description="colour jitter: saturation factor drawn from [1 - x, 1 + x]")
    hue: float = Field(0.0, ge=0, le=0.5, description="colour jitter: hue shift drawn from [-x, x]; off by default because answers may name colours")
    rotation: float = Field(5.0, ge=0, le=180, description="small rotation: angle in degrees drawn from [-x, x]")
    flip: bool = Field(False, description="horizontal flip with probability 0.5; off by default because answers may say left or right")

    @field_validator("crop_scale", "crop_ratio")
    @classmethod
    def _ordered_range(cls, value: tuple[float, float], info) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high:
            raise ValueError(f"needs 0 < low <= high, got [{low}, {high}]")
        if info.field_name == "crop_scale" and high > 1:
            raise ValueError(f"is a fraction of the image's area, at most 1, got [{low}, {high}]")
        return value


class DataConfig(_Strict):
    """Training and evaluation data."""

    train: str | list[str] = Field(f"{BUILTIN_DATA_PREFIX}position", description=f"JSON/JSONL file(s) in ShareGPT format, a name in dataset_dir/dataset_info.json, or {BUILTIN_DATA_PREFIX}TASK for generated shapes data")
    eval: str | list[str] | None = Field(None, description="evaluation data, same forms as train; empty means no evaluation")
    dataset_dir: str | None = Field(None, description="folder holding dataset_info.json, for dataset names (LLaMA-Factory style)")
    max_length: int = Field(1024, gt=0, description="maximum tokens per sample, image tokens included; never cut inside an image's tokens")
    too_long: Literal["drop", "downscale", "truncate"] = Field("drop", description="a sample over max_length is dropped; downscale shrinks its images until it fits; truncate cuts text after the last image (all are counted and reported)")
    image_max_pixels: int | None = Field(None, gt=0, description="upper bound on an image's pixels after resizing; empty means the processor's own")
    image_min_pixels: int | None = Field(None, gt=0, description="lower bound on an image's pixels after resizing; empty means the processor's own")
    builtin_train_samples: int = Field(512, gt=0, description="number of generated samples for builtin shapes training data")
    builtin_eval_samples: int = Field(64, gt=0, description="number of generated samples for builtin shapes evaluation data")
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field("auto", description="data-loader worker processes (each loads, decodes and preprocesses batches ahead of the step); auto is 0 without a GPU (workers would take the training threads' cores) and, on a GPU, up to 4 per process from the cores the machine leaves each process")
    on_bad_sample: Literal["error", "skip"] = Field("error", description="a bad sample (bad JSON line, unknown role, missing or corrupt image, ...) stops the run listing every problem (error), or is left out, counted by kind and named in the run folder (skip)")
    decode_images: bool = Field(True, description="fully decode every image before training to find corrupt or truncated files (a few ms per image); false reads only image headers")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="visual augmentation of the training split")


class TrainConfig(_Strict):
    """The optimisation loop."""

    output_dir: str = Field("runs/quickstart", description="where config.yaml, metrics.jsonl, loss.png, checkpoints and final/ are written")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps to run; overrides epochs when set")
    epochs: float = Field(1.0, gt=0, description="passes over the training data (used when max_steps is empty)")
    batch_size: int = Field(8, gt=0, description="samples per device per forward pass")
    grad_accum: int = Field(1, gt=0, description="forward passes accumulated per optimizer step")
    learning_rate: float = Field(2e-4, gt=0, description="learning rate of every group that does not set its own lr")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay of groups that do not set their own (biases and norms never decay)")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="learning-rate schedule after warmup")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of steps with linear warmup (ignored when warmup_steps is set)")
    warmup_steps: int | None = Field(None, ge=0, description="number of warmup steps")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the global gradient norm to this; empty disables clipping")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    seed: int = Field(42, description="seed for weights of new adapters, data order and dropout")
    logging_steps: int = Field(10, gt=0, description="log loss, learning rate and throughput every N steps")
    eval_steps: int | None = Field(None, gt=0, description="evaluate every N steps (and always at the start and the end when eval data is set)")
    save_steps: int | None = Field(None, gt=0, description="write a checkpoint every N steps")
    report_to: list[Literal["tensorboard"]] = Field(default_factory=list, description="extra trackers through accelerate (tensorboard)")
    progress_bar: bool = Field(True, description="show a progress bar with loss, learning rate and samples/s")
    save_total_limit: int | None = Field(None, gt=0, description="keep only the newest N checkpoint-STEP folders (stage folders and final/ are always kept); empty keeps all")
    resume: Literal["never", "auto"] = Field("never", description="auto: continue from the newest complete checkpoint in output_dir (weights, optimizer, scheduler, RNG, data position, stage); `vlmtune train --resume` sets it")
    force_resume: bool = Field(False, description="resume even though model, groups, data or stages differ from the checkpoint's config (`--force-resume`)")
    on_nonfinite: Literal["stop", "skip"] = Field("stop", description="a NaN/inf loss or gradient norm: stop (naming stage, step and the last good checkpoint) or skip that optimizer step and count it")
    max_nonfinite_skips: int = Field(10, ge=0, description="with on_nonfinite: skip, stop after this many skipped steps in one run")
    group_by_length: bool = Field(False, description="batch samples of similar length together (sorted, longest first, within shuffled groups of 50 batches): less padding, same samples per epoch and the same per-sample losses, but batches become more alike (where length follows the task, one task per batch), which can slow or stop learning; the padding fraction is logged either way")
    packing: bool = Field(False, description="lay each batch's samples end to end in fewer rows (whole samples, rows no longer than the batch's longest sample, positions restarting per sample so none sees another): same samples, loss and gradients with less padding, and no change to which samples share a batch; M-RoPE models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL); with flash_attention_2 the masked blocks are skipped, with sdpa/eager they are computed and masked")
    packing_length: int | None = Field(None, gt=0, description="with packing, the longest row in tokens (a longer sample gets a row of its own); empty: the batch's longest sample, so no row costs more attention than a padded one; larger fills rows better, which pays with flash_attention_2 (masked blocks skipped) more than with sdpa/eager")
    vision_cache: bool = Field(True, description="where the vision tower trains in no stage and augmentation is off, compute its output once per image, keep it on disk ($VLMTUNE_CACHE/vision) and train projector + language model only (same loss); false always runs the tower")
    gradient_checkpointing: bool = Field(False, description="recompute each transformer layer's forward during the backward instead of keeping its activations: much less activation memory for about one more forward of compute (same loss and gradients); for runs that do not fit otherwise")
    label_only_logits: bool = Field(True, description="compute the lm_head only at positions whose next token is an answer token (same loss, less compute and memory); false computes logits everywhere")
    check_gradient_flow: bool = Field(True, description="at the first step of every stage, check that every trained group gets finite non-zero gradients and no frozen group gets any (stops with the group's name otherwise)")


class StageConfig(_Strict):
    """One stage of a progressive run; anything it does not set comes from the top level."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="stage name; its checkpoint is written to output_dir/<name>/")
    groups: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-group settings that differ from the top-level groups (mode, lr, dropout, ...); LoRA weights and fully-trained weights carry over between stages")
    steps: int | None = Field(None, gt=0, description="optimizer steps in this stage; empty means train.max_steps (or epochs)")
    epochs: float | None = Field(None, gt=0, description="passes over this stage's training data (used when steps is empty)")
    learning_rate: float | None = Field(None, gt=0, description="rate of groups without their own lr in this stage; empty means train.learning_rate")
    warmup_steps: int | None = Field(None, ge=0, description="warmup steps of this stage's schedule; empty means the top-level warmup")
    scheduler: Literal["cosine", "linear", "constant"] | None = Field(None, description="schedule of this stage; empty means train.scheduler")
    data: dict[str, Any] = Field(default_factory=dict, description="data settings that differ in this stage, e.g. {train: file.jsonl, eval: other.jsonl}")


class EvalConfig(_Strict):
    """What `vlmtune eval` and the evaluation during training measure."""

    samples: int | None = Field(64, gt=0, description="evaluate on the first N eval samples; empty means every sample")
    batch_size: int = Field(16, gt=0, description="sequences per forward pass while scoring and generating")
    max_new_tokens: int = Field(32, gt=0, description="longest generated answer (greedy decoding) for exact match, BLEU-4 and ROUGE")
    generate_in_training: bool = Field(True, description="generate answers (exact match, BLEU-4, ROUGE) in the evaluations during training, not only in `vlmtune eval`")
    alignment: bool = Field(True, description="measure vision-language alignment: image-ablation gap, caption retrieval, projector-to-answer similarity")
    retrieval_k: int = Field(8, ge=2, description="caption retrieval group size: each image ranks the distinct answers of its group of K samples (chance = 1/candidates)")


class Config(_Strict):
    """A vlmtune run."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="the model")
    groups: dict[str, GroupConfig] = Field(default_factory=dict, description="per component group: mode, LoRA settings, learning rate")
    data: DataConfig = Field(default_factory=DataConfig, description="the data")
    train: TrainConfig = Field(default_factory=TrainConfig, description="the loop")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="evaluation: metrics, generation and alignment settings")
    stages: list[StageConfig] = Field(default_factory=list, description="progressive training: stages run in order in one command, each writing output_dir/<name>/; empty means one stage")

    def group(self, name: str) -> GroupConfig:
        return self.groups.get(name) or GroupConfig()

    def group_lr(self, name: str) -> float:
        return self.group(name).lr or self.train.learning_rate

    def group_weight_decay(self, name: str) -> float:
        wd = self.group(name).weight_decay
        return self.train.weight_decay if wd is None else wd


# The seed's recipe: projector LoRA and language-model attention LoRA, alpha = 2r, vision tower frozen.
DEFAULT_GROUPS: dict[str, dict[str, Any]] = {
    "vision_tower": {"mode": "frozen"},
    "projector": {"mode": "lora", "rank": 16, "targets": "all-linear"},
    "language_model": {"mode": "lora", "rank": 16, "targets": "attention"},
    "lm_head": {"mode": "frozen"},
}


def deep_merge(base: dict, update: dict) -> dict:
    """Returns ``base`` with ``update`` merged in (nested dicts merged, anything else replaced)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], parsed c); the value is read as YAML so numbers and lists work."""
    if "=" not in text:
        raise ConfigError([f"override '{text}' is not of the form key.path=value"], "command line")
    key, _, raw = text.partition("=")
    if not key.strip():
        raise ConfigError([f"override '{text}' has an empty key"], "command line")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Sets each ``key.path=value`` on a copy of the raw config dict."""
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            if isinstance(node, list):  # stages.1.steps=5: an index into a list
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError([f"override '{text}': '{'.'.join(path[:depth])}' has {len(node)} entries, "
                                       f"'{part}' is not an index 0..{len(node) - 1}"], "command line")
                part = int(part)
                if last:
                    node[part] = value
                elif not isinstance(node[part], (dict, list)):
                    node[part] = {}
            elif last:
                node[part] = value
            elif not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            if not last:
                node = node[part]
    return out


def read_yaml(path: str | Path) -> dict:
    """Reads a YAML mapping, with errors naming the file (and line, for syntax errors)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file '{p}' does not exist"], str(p))
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError([f"{p}: not valid YAML: {e}"], str(p)) from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{p}: the top level must be a mapping of keys, found {type(data).__name__}"], str(p))
    return data


def _fields_at(loc: tuple) -> list[str]:
    """Valid keys beside the last element of ``loc`` (for "did you mean")."""
    parent = loc[:-1]
    if parent and parent[0] == "groups":
        return list(GroupConfig.model_fields) if len(parent) == 2 else []
    if parent and parent[0] == "stages":
        return list(StageConfig.model_fields) if len(parent) == 2 else []
    model: type[BaseModel] = Config
    for part in parent:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def suggest(name: str, valid: list[str]) -> str:
    """' (did you mean X?)' for the closest valid name, or ''."""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


_TYPE_LABELS = {"str", "int", "float", "bool", "dict", "list", "tuple", "none", "literal"}


def format_validation_error(err: ValidationError, extra_valid: list[str] | None = None) -> list[str]:
    """Turns pydantic's errors into one line each, naming the key and what would be valid."""
    problems: list[str] = []
    for e in err.errors():
        # pydantic puts the union member it tried into the location ("targets.list[str].0"); keep only keys and indexes.
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p in _TYPE_LABELS)))
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            valid = _fields_at(loc) + (extra_valid or [] if len(loc) == 1 else [])
            problems.append(f"unknown key '{key}'{suggest(str(loc[-1]), valid)}; valid here: {', '.join(_fields_at(loc))}")
        else:
            line = f"'{key}': {e['msg']} (got {e.get('input')!r})"
            same_key = [i for i, p in enumerate(problems) if p.startswith(f"'{key}': ")]
            if same_key:  # one line per key: a union reports each member's complaint
                problems[same_key[0]] = problems[same_key[0]].replace(" (got", f", or {e['msg']} (got", 1)
            else:
                problems.append(line)
    return problems


def raw_problems(raw: dict) -> list[str]:
    """Checks that need only the raw config dict, so they are reported even beside schema errors."""
    problems = []
    groups = raw.get("groups") if isinstance(raw.get("groups"), dict) else {}
    for name in groups:
        if name not in GROUPS:
            problems.append(f"'groups.{name}' is not a component group{suggest(str(name), list(GROUPS))}; groups are {', '.join(GROUPS)}")
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    path = model.get("path", BUILTIN_MODEL)
    if isinstance(path, str) and path != BUILTIN_MODEL:
        p = Path(path)
        if not p.is_dir():
            problems.append(f"'model.path': '{p}' is not a local folder (vlmtune loads local model folders only; download it first, or use {BUILTIN_MODEL})")
        elif not (p / "config.json").is_file():
            problems.append(f"'model.path': '{p}' has no config.json")
    return problems


def semantic_problems(cfg: Config) -> list[str]:
    """Cross-field checks on a validated config that a schema cannot express."""
    problems = []
    for name, g in cfg.groups.items():
        if isinstance(g.targets, str) and g.targets not in ("all-linear", "attention", "mlp"):
            problems.append(f"'groups.{name}.targets': '{g.targets}' is not all-linear, attention or mlp; give a list for module names, e.g. [{g.targets}]")
        if isinstance(g.targets, list) and not g.targets:
            problems.append(f"'groups.{name}.targets' is an empty list")
    if not any(cfg.group(g).mode != "frozen" for g in GROUPS):
        problems.append("every group is frozen: set at least one of groups.<group>.mode to lora or full")
    if cfg.train.packing_length is not None and not cfg.train.packing:
        problems.append("'train.packing_length' is set but train.packing is false: set train.packing: true or drop packing_length")
    if cfg.train.packing:
        problems.extend(packing_problems(cfg.model.path))
    return problems


def packing_problems(model_path: str) -> list[str]:
    """``train.packing`` needs per-sample M-RoPE positions; the model folder's config.json says its family."""
    from vlmtune.packing import PACKING_MODEL_TYPES

    config = Path(model_path) / "config.json"
    if model_path == BUILTIN_MODEL or not config.is_file():
        return []
    model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    if model_type in PACKING_MODEL_TYPES:
        return []
    return [f"'train.packing': model_type '{model_type}' ({config}) has no per-sample M-RoPE positions; packing "
            f"supports {', '.join(PACKING_MODEL_TYPES)} (Qwen2-VL, Qwen2.5-VL, Qwen3-VL); set train.packing: false"]


def load_config(path: str | Path | None, overrides: list[str] | None = None, echo=print) -> Config:
    """Reads a YAML config, applies overrides and LLaMA-Factory keys, and validates it all at once.

    Args:
        path: the YAML file, or None for the defaults.
        overrides: ``key.path=value`` strings applied after the file.
        echo: where the LLaMA-Factory translation is printed.

    Raises:
        ConfigError: every problem found, each naming its key.
    """
    from vlmtune.compat import LLAMA_FACTORY_KEYS, translate

    source = str(path) if path else "defaults"
    raw = read_yaml(path) if path else {}
    raw = apply_overrides(raw, overrides or [])
    native, lines, problems = translate(raw)
    for line in lines:
        echo(line)
    merged = deep_merge({"groups": DEFAULT_GROUPS}, native)
    problems += raw_problems(merged)
    try:
        cfg = Config.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(problems + format_validation_error(e, sorted(LLAMA_FACTORY_KEYS)), source) from None
    problems += semantic_problems(cfg)
    if not problems and cfg.stages:
        from vlmtune.stages import stage_problems

        problems += stage_problems(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (saved beside every checkpoint)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def reference(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """One line per config key with its type default and description: the `--help` config reference."""
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.append(f"{key}:  {field.description}")
            lines += reference(ann, key + ".")
        elif name == "groups" and model is Config:
            lines.append(f"{key}.<{'|'.join(GROUPS)}>:  {field.description}")
            lines += reference(GroupConfig, f"{key}.<group>.")
        elif name == "stages" and model is Config:
            lines.append(f"{key}[]:  {field.description}")
            lines += reference(StageConfig, f"{key}[].")
        else:
            default = field.get_default(call_default_factory=True)
            lines.append(f"  {key} = {default!r}\n      {field.description}")
    return lines
