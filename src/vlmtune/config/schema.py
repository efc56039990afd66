"""The typed run configuration: every key a run reads, each with a one-line description.

The descriptions are the `vlmtune train --help` config reference. Loading and validating a YAML file is
``vlmtune.config.load``; this module only says what a config is.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from vlmtune.config.batch import BatchSize
from vlmtune.config.data import DataConfig
from vlmtune.config.methods import DPOConfig, GRPOConfig, KTOConfig, Method
from vlmtune.config.strict import StrictModel, partial

GROUPS: tuple[str, ...] = ("vision_tower", "projector", "language_model", "lm_head")
"""The component groups every architecture entry names, in the order plans are printed."""

BUILTIN_MODEL = "builtin:tiny-qwen2-vl"


class GroupConfig(StrictModel):
    """How one component group (vision_tower, projector, language_model, lm_head) is trained."""

    mode: Literal["frozen", "lora", "full"] = Field(
        "frozen",
        description="frozen: no update; lora: peft LoRA on the group's linear layers; full: every weight trained and saved with the adapter. Empty: the default recipe's (projector full, language model lora, the others frozen), or lora where the group is given LoRA settings (rank, alpha, targets ...)",
    )
    rank: int = Field(8, gt=0, description="LoRA rank r (8 or 16 is the usual start for the projector)")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; empty means 2 x rank, the usual starting point")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input path of this group's layers")
    targets: str | list[str] = Field(
        "all-linear",
        description="which linear layers get LoRA: all-linear, attention, mlp, or a list of module names (q_proj, mlp.0, ...) matched as whole dotted suffixes",
    )
    lr: float | None = Field(None, gt=0, description="learning rate of this group; empty means train.learning_rate")
    weight_decay: float | None = Field(
        None, ge=0, description="AdamW weight decay of this group; empty means train.weight_decay"
    )
    quantize: bool | None = Field(
        None,
        description="with model.quantize: whether this group's linear layers are quantized; empty: yes for the vision tower and the language model (unless trained fully in some stage), no for the projector and lm_head",
    )
    dora: bool = Field(
        False,
        description="DoRA (peft use_dora): LoRA's update split into a direction and a trained magnitude per output feature",
    )
    rslora: bool = Field(
        False,
        description="rank-stabilised LoRA (peft use_rslora): scale the update by alpha / sqrt(rank), not alpha / rank",
    )
    init: str = Field(
        "default",
        description="how the LoRA weights start (peft init_lora_weights): default (B = 0), gaussian, pissa (the principal singular vectors; pissa_niter_N: N fast SVD iterations), olora (QR), loftq (from model.quantize's quantization error, nf4 or int8, on a GPU)",
    )
    lr_ratio_b: float | None = Field(
        None,
        gt=0,
        description="LoRA+: this group's LoRA B matrices train at the group's lr x this ratio (the LoRA+ paper suggests 16); empty: A and B at one rate",
    )

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank


# GroupConfig's fields that only a LoRA group uses.
LORA_SETTINGS: tuple[str, ...] = ("rank", "alpha", "dropout", "targets", "dora", "rslora", "init", "lr_ratio_b")


def _group_field(what: str) -> Any:
    return Field(default_factory=GroupConfig, description=what)


class Groups(StrictModel):
    """The four component groups of every architecture, each trained one way (frozen, lora or full)."""

    vision_tower: GroupConfig = _group_field("the vision encoder (ViT) that turns image patches into features")
    projector: GroupConfig = _group_field(
        "maps vision features into the language model's embedding space (Qwen2-VL: merger)"
    )
    language_model: GroupConfig = _group_field("the decoder that reads image and text tokens")
    lm_head: GroupConfig = _group_field("the output projection from hidden states to token logits")

    def items(self) -> list[tuple[str, GroupConfig]]:
        """(name, settings) of every group, in ``GROUPS`` order."""
        return [(name, getattr(self, name)) for name in GROUPS]


class ArchEntry(StrictModel):
    """A user-supplied architecture registry entry: where each component group's modules sit."""

    model_types: list[str] = Field(default_factory=list, description="config.json model_type values this entry covers")
    patterns: dict[Literal["vision_tower", "projector", "language_model", "lm_head"], list[str]] | None = Field(
        None, description="group -> anchored dotted module paths (``*`` is one path component); the longest match wins"
    )
    layouts: list[dict[str, Any]] | None = Field(
        None,
        description="several layouts, each {name, patterns}, for a family whose module names changed between versions",
    )
    description: str = Field("user-supplied entry", description="shown in the plan")


class ModelConfig(StrictModel):
    """Which model to fine-tune and how to load it."""

    path: str = Field(
        BUILTIN_MODEL,
        description=f"a local model folder (config.json + safetensors weights), or {BUILTIN_MODEL} for the builtin tiny pretrained Qwen2-VL",
    )
    arch: str | None = Field(
        None, description="architecture registry entry; empty means chosen from config.json's model_type"
    )
    arch_entry: ArchEntry | None = Field(
        None,
        description="a user-supplied registry entry: {model_types: [...], patterns: {vision_tower: [...], projector: [...], language_model: [...], lm_head: [...]}}",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weight dtype; auto is float32 on CPU and bfloat16 on a GPU that supports it"
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="attention kernel passed to transformers"
    )
    trust_remote_code: bool = Field(
        False, description="allow a model folder's own Python code to run (off unless you trust the folder)"
    )
    quantize: Literal["none", "nf4", "fp4", "int8"] = Field(
        "none",
        description="QLoRA: load the linear layers of the groups that do not train fully as 4-bit (nf4, fp4) or 8-bit (int8) weights through bitsandbytes (transformers' BitsAndBytesConfig); LoRA trains on top of them; the projector, lm_head and fully-trained groups stay in full precision unless groups.<group>.quantize says otherwise",
    )
    double_quant: bool = Field(
        True, description="with nf4/fp4: quantize the quantization constants too (QLoRA's double quantization)"
    )
    quant_compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype the 4-bit layers compute in; auto: model.dtype as resolved for the device"
    )


class TrainConfig(StrictModel):
    """The optimisation loop."""

    method: Method = Field(
        "sft",
        description="the objective: sft, cross-entropy on the answers; dpo, preference pairs (chosen / rejected); "
        "kto, answers labelled desirable or undesirable; grpo, sampled answers scored by train.grpo.rewards",
    )
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="settings of method dpo (the DPO family)")
    kto: KTOConfig = Field(default_factory=KTOConfig, description="settings of method kto")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="settings of method grpo: rollouts and rewards")

    output_dir: str = Field(
        "runs/quickstart", description="where config.yaml, metrics.jsonl, loss.png, checkpoints and final/ are written"
    )
    max_steps: int | None = Field(None, gt=0, description="optimizer steps to run; overrides epochs when set")
    epochs: float = Field(1.0, gt=0, description="passes over the training data (used when max_steps is empty)")
    batch_size: BatchSize = Field(
        8,
        description="samples per device per forward pass; auto: the largest the memory planner predicts to fit "
        "(grad_accum as given), auto:N: N samples per optimizer step, split into the largest micro-batch that fits "
        "(vlmtune doctor --fit shows the plan)",
    )
    grad_accum: int = Field(1, gt=0, description="forward passes accumulated per optimizer step")
    learning_rate: float = Field(2e-4, gt=0, description="learning rate of every group that does not set its own lr")
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW weight decay of groups that do not set their own (biases and norms never decay)"
    )
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="learning-rate schedule after warmup"
    )
    warmup_ratio: float = Field(
        0.0, ge=0, lt=1, description="fraction of steps with linear warmup (ignored when warmup_steps is set)"
    )
    warmup_steps: int | None = Field(None, ge=0, description="number of warmup steps")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="clip the global gradient norm to this; empty disables clipping"
    )
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    seed: int = Field(42, description="seed for weights of new adapters, data order and dropout")
    logging_steps: int = Field(10, gt=0, description="log loss, learning rate and throughput every N steps")
    eval_steps: int | None = Field(
        None, gt=0, description="evaluate every N steps (and always at the start and the end when eval data is set)"
    )
    save_steps: int | None = Field(None, gt=0, description="write a checkpoint every N steps")
    report_to: list[Literal["tensorboard"]] = Field(
        default_factory=list, description="extra trackers through accelerate (tensorboard)"
    )
    progress_bar: bool = Field(True, description="show a progress bar with loss, learning rate and samples/s")
    save_total_limit: int | None = Field(
        None,
        gt=0,
        description="keep only the newest N checkpoint-STEP folders (stage folders and final/ are always kept); empty keeps all",
    )
    resume: Literal["never", "auto"] = Field(
        "never",
        description="auto: continue from the newest complete checkpoint in output_dir (weights, optimizer, scheduler, RNG, data position, stage); `vlmtune train --resume` sets it",
    )
    force_resume: bool = Field(
        False,
        description="resume even though model, groups, data or stages differ from the checkpoint's config (`--force-resume`)",
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="a NaN/inf loss or gradient norm: stop (naming stage, step and the last good checkpoint) or skip that optimizer step and count it",
    )
    max_nonfinite_skips: int = Field(
        10, ge=0, description="with on_nonfinite: skip, stop after this many skipped steps in one run"
    )
    group_by_length: bool = Field(
        False,
        description="batch samples of similar length together (sorted, longest first, within shuffled groups of 50 batches): less padding, same samples per epoch and the same per-sample losses, but batches become more alike (where length follows the task, one task per batch), which can slow or stop learning; the padding fraction is logged either way",
    )
    packing: bool = Field(
        False,
        description="lay each batch's samples end to end in fewer rows (whole samples, rows no longer than the batch's longest sample, positions restarting per sample so none sees another): same samples, loss and gradients with less padding, and no change to which samples share a batch; M-RoPE models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL); with flash_attention_2 the masked blocks are skipped, with sdpa/eager they are computed and masked",
    )
    packing_length: int | None = Field(
        None,
        gt=0,
        description="with packing, the longest row in tokens (a longer sample gets a row of its own); empty: the batch's longest sample, so no row costs more attention than a padded one; larger fills rows better, which pays with flash_attention_2 (masked blocks skipped) more than with sdpa/eager",
    )
    vision_cache: bool = Field(
        True,
        description="where the vision tower trains in no stage and augmentation is off, compute its output once per image, keep it on disk ($VLMTUNE_CACHE/vision) and train projector + language model only (same loss); false always runs the tower",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute each transformer layer's forward during the backward instead of keeping its activations: much less activation memory for about one more forward of compute (same loss and gradients); for runs that do not fit otherwise",
    )
    label_only_logits: bool = Field(
        True,
        description="compute the lm_head only at positions whose next token is an answer token (same loss, less compute and memory); false computes logits everywhere",
    )
    check_gradient_flow: bool = Field(
        True,
        description="at the first step of every stage, check that every trained group gets finite non-zero gradients and no frozen group gets any (stops with the group's name otherwise)",
    )
    sharding: Literal["none", "fsdp"] = Field(
        "none",
        description="with several processes (torchrun, accelerate launch): none, every process holds the whole model (DDP); fsdp, each holds a shard of every layer's weights, gradients and optimizer states (torch FSDP2, on CPU and GPU alike), gathered layer by layer as it runs; method sft, no packing, no vision cache",
    )


GroupsOverrides = partial(Groups, "GroupsOverrides")
DataOverrides = partial(DataConfig, "DataOverrides")
DPOOverrides = partial(DPOConfig, "DPOOverrides")
KTOOverrides = partial(KTOConfig, "KTOOverrides")
GRPOOverrides = partial(GRPOConfig, "GRPOOverrides")


class StageConfig(StrictModel):
    """One stage of a progressive run; anything it does not set comes from the top level."""

    name: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="stage name; its checkpoint is written to output_dir/<name>/",
    )
    groups: GroupsOverrides = Field(
        default_factory=lambda: GroupsOverrides(),
        description="per-group settings that differ from the top-level groups (mode, lr, dropout, ...); LoRA weights and fully-trained weights carry over between stages",
    )
    steps: int | None = Field(
        None, gt=0, description="optimizer steps in this stage; empty means train.max_steps (or epochs)"
    )
    epochs: float | None = Field(
        None, gt=0, description="passes over this stage's training data (used when steps is empty)"
    )
    learning_rate: float | None = Field(
        None, gt=0, description="rate of groups without their own lr in this stage; empty means train.learning_rate"
    )
    warmup_steps: int | None = Field(
        None, ge=0, description="warmup steps of this stage's schedule; empty means the top-level warmup"
    )
    scheduler: Literal["cosine", "linear", "constant"] | None = Field(
        None, description="schedule of this stage; empty means train.scheduler"
    )
    data: DataOverrides = Field(
        default_factory=lambda: DataOverrides(),
        description="data settings that differ in this stage, e.g. {train: file.jsonl, eval: other.jsonl}",
    )
    method: Method | None = Field(
        None, description="the objective of this stage (sft, dpo, kto, grpo); empty means train.method"
    )
    dpo: DPOOverrides = Field(
        default_factory=lambda: DPOOverrides(), description="train.dpo settings that differ in this stage"
    )
    kto: KTOOverrides = Field(
        default_factory=lambda: KTOOverrides(), description="train.kto settings that differ in this stage"
    )
    grpo: GRPOOverrides = Field(
        default_factory=lambda: GRPOOverrides(), description="train.grpo settings that differ in this stage"
    )


class EvalConfig(StrictModel):
    """What `vlmtune eval` and the evaluation during training measure."""

    samples: int | None = Field(64, gt=0, description="evaluate on the first N eval samples; empty means every sample")
    batch_size: int = Field(16, gt=0, description="sequences per forward pass while scoring and generating")
    max_new_tokens: int = Field(
        32, gt=0, description="longest generated answer (greedy decoding) for exact match, BLEU-4 and ROUGE"
    )
    generate_in_training: bool = Field(
        True,
        description="generate answers (exact match, BLEU-4, ROUGE) in the evaluations during training, not only in `vlmtune eval`",
    )
    alignment: bool = Field(
        True,
        description="measure vision-language alignment: image-ablation gap, caption retrieval, projector-to-answer similarity",
    )
    retrieval_k: int = Field(
        8,
        ge=2,
        description="caption retrieval group size: each image ranks the distinct answers of its group of K samples (chance = 1/candidates)",
    )


class Config(StrictModel):
    """A vlmtune run."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="the model")
    groups: Groups = Field(
        default_factory=Groups, description="per component group: mode, LoRA settings, learning rate"
    )
    data: DataConfig = Field(default_factory=DataConfig, description="the data")
    train: TrainConfig = Field(default_factory=TrainConfig, description="the loop")
    eval: EvalConfig = Field(
        default_factory=EvalConfig, description="evaluation: metrics, generation and alignment settings"
    )
    stages: list[StageConfig] = Field(
        default_factory=list,
        description="progressive training: stages run in order in one command, each writing output_dir/<name>/; empty means one stage",
    )

    def group(self, name: str) -> GroupConfig:
        """The settings of group ``name``; raises ValueError for a name that is not a group."""
        if name not in GROUPS:
            raise ValueError(f"'{name}' is not a component group; groups are {', '.join(GROUPS)}")
        return getattr(self.groups, name)

    def group_lr(self, name: str) -> float:
        return self.group(name).lr or self.train.learning_rate

    def group_weight_decay(self, name: str) -> float:
        wd = self.group(name).weight_decay
        return self.train.weight_decay if wd is None else wd


# The default recipe: the projector trained fully (the recipe study's winner over LoRA and frozen, bench/RECIPES.md),
# language-model attention LoRA r16, vision tower and lm_head frozen. A config's group settings merge over these.
DEFAULT_GROUPS: dict[str, dict[str, Any]] = {
    "vision_tower": {"mode": "frozen"},
    "projector": {"mode": "full", "rank": 16, "targets": "all-linear"},  # rank and targets: when set to lora
    "language_model": {"mode": "lora", "rank": 16, "targets": "attention"},
    "lm_head": {"mode": "frozen"},
}
