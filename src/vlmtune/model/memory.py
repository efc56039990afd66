"""The peak memory of a training step, predicted before anything is loaded: per component group, from the model's
shapes, the stage's plan and the data's longest batch.

Parts (bytes): each group's weights as loaded (bitsandbytes 4-bit: half a byte per weight plus its block constants),
the trainable adapters or copies, their gradients and AdamW's two states, and the activations: what the forward
keeps for the backward, tensor by tensor, per layer and per token (``text_layer``, ``vision_block``, ``merger``,
counted from what torch's autograd saves in transformers' Qwen2-VL layers; ``tests/model/test_memory.py`` holds them
against the saved tensors of real models), plus the largest short-lived tensors (the logits and their
log-softmax, one layer's gradients, a dequantized weight). The host's share (a CPU process's baseline and how much
freed memory its allocator keeps) is measured at run time by ``vlmtune.commands.host``; on a GPU the prediction is
what ``torch.cuda.max_memory_allocated`` counts, so it has no host share.
"""

from __future__ import annotations

from dataclasses import dataclass, field

HEAP_MAX = 32 * 2**20
"""glibc's largest dynamic mmap threshold on 64-bit Linux (DEFAULT_MMAP_THRESHOLD_MAX, mallopt(3)): blocks up to this
size may come from the heap, which keeps freed memory for reuse; larger ones are mapped and unmapped on free."""

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4


@dataclass(frozen=True)
class TextShape:
    """The language model's sizes, from ``config.json``."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


@dataclass(frozen=True)
class VisionShape:
    """The vision tower's sizes (``dim`` wide, ``mlp`` in its MLP) and the projector's merge of patches."""

    dim: int
    depth: int
    heads: int
    mlp: int
    merge: int  # patches merged into one language-model token: spatial_merge_size ** 2


def _first(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def text_shape(config) -> TextShape:
    """The language model's shape from a transformers config (its ``text_config`` where it has one)."""
    t = getattr(config, "text_config", None) or config
    hidden, heads = t.hidden_size, t.num_attention_heads
    return TextShape(
        hidden,
        _first(t, "intermediate_size", default=4 * hidden),
        t.num_hidden_layers,
        heads,
        _first(t, "num_key_value_heads", default=heads),
        _first(t, "head_dim", default=hidden // heads),
        t.vocab_size,
    )


def vision_shape(config) -> VisionShape | None:
    """The vision tower's shape, or None for a config without ``vision_config``."""
    v = getattr(config, "vision_config", None)
    if v is None:
        return None
    dim = _first(v, "embed_dim", "hidden_size")
    mlp = _first(v, "intermediate_size") or int(dim * _first(v, "mlp_ratio", default=4))
    merge = _first(v, "spatial_merge_size", default=1)
    return VisionShape(
        dim, _first(v, "depth", "num_hidden_layers"), _first(v, "num_heads", "num_attention_heads"), mlp, merge**2
    )


# ---------------------------------------------------------------------------------------------
# What a group holds and what of it trains
# ---------------------------------------------------------------------------------------------

ROLES = {  # a linear layer's place in its block, by its leaf name (LLaMA, Qwen, CLIP/SigLIP and merger names)
    "qkv": ("q_proj", "k_proj", "v_proj", "qkv", "qkv_proj", "query", "key", "value", "in_proj"),
    "o": ("o_proj", "proj", "out_proj"),
    "up": ("gate_proj", "up_proj", "gate_up_proj", "fc1", "w1", "w3", "0", "linear_fc1"),
    "down": ("down_proj", "fc2", "w2", "2", "linear_fc2"),
}


def role_of(module: str, kind: str | None = None) -> str:
    """qkv (attention input), o (attention output), up (MLP input) or down (MLP output) for a linear layer's name;
    ``kind`` (attention or mlp, from the registry) decides for a name not in ``ROLES``."""
    leaf = module.rsplit(".", 1)[-1]
    for role, names in ROLES.items():
        if leaf in names:
            return role
    return "qkv" if kind == "attention" else "up"


@dataclass
class GroupFacts:
    """One group of one stage: what it holds, what trains, and which of its linear layers do."""

    group: str
    mode: str  # frozen, lora or full
    params: int
    weight_bytes: int  # as loaded: quantized linear weights packed, with their constants
    trainable: int = 0  # LoRA A/B (and DoRA magnitudes), or the whole group
    trainable_bytes: int = 0
    copy_bytes: int = 0  # full: peft's modules_to_save trains a copy and keeps the original
    trained_roles: frozenset[str] = frozenset()  # roles of linear layers whose input the backward needs
    lora_rank_sum: int = 0  # sum over LoRA layers of the rank: their A outputs are kept, rank values per token
    dropout_in_sum: int = 0  # sum over LoRA layers with dropout of the input width: dropout copies the input
    largest_quantized: int = 0  # elements of its largest quantized weight: dequantized for every matmul
    largest_trainable: int = 0  # elements of its largest trainable tensor (the optimizer's per-tensor temporaries)


# ---------------------------------------------------------------------------------------------
# Activations: (name, width per token, tensors) kept by the forward for the backward
# ---------------------------------------------------------------------------------------------


def text_layer(s: TextShape, f: GroupFacts, padded: bool) -> list[tuple[str, int, int]]:
    """What one decoder layer (Qwen2/LLaMA: RMSNorm, attention through sdpa, gated MLP) keeps per token when the
    backward passes through it. ``padded``: with an attention mask transformers repeats the key/value heads
    before sdpa (``repeat_kv``), without one sdpa takes them as they are (``enable_gqa``)."""
    h, i, kv = s.hidden, s.intermediate, s.kv_heads * s.head_dim
    kv_kept = s.heads * s.head_dim if padded else kv
    roles = f.trained_roles
    out = [
        ("layer input (norm)", h, 2),  # the RMSNorm's input, before attention and before the MLP
        ("norm scale", 1, 2),
        ("rotated query, sdpa output", s.heads * s.head_dim, 2),
        ("key, value", kv_kept, 2),
        ("sdpa log-sum-exp", s.heads, 1),
        ("MLP gate, activation, up", i, 3),  # SiLU keeps its input; gate x up keeps both factors
    ]
    if "qkv" in roles:
        out.append(("normed input of q/k/v", h, 1))
    if "up" in roles:
        out.append(("normed input of gate/up", h, 1))
    if "down" in roles:
        out.append(("input of down", i, 1))
    if f.mode == "full":  # the norms' weights train: each keeps its normalized input
        out.append(("normalized input (norm weights)", h, 2))
    return out


def vision_block(s: VisionShape, f: GroupFacts) -> list[tuple[str, int, int]]:
    """What one Qwen2-VL vision block (LayerNorm, fused qkv, per-image sdpa, quick-GELU MLP) keeps per patch."""
    d, roles = s.dim, f.trained_roles
    out = [
        ("block input (norms)", d, 2),
        ("norm statistics", 2, 2),
        ("qkv output (value is a view)", 3 * d, 1),
        ("rotated query and key, sdpa output", d, 3),
        ("sdpa log-sum-exp", s.heads, 1),
        ("MLP hidden, its sigmoid", s.mlp, 2),
    ]
    if "qkv" in roles:
        out.append(("normed input of qkv", d, 1))
    if "o" in roles:
        out.append(("input of proj", d, 1))
    if "up" in roles:
        out.append(("normed input of fc1", d, 1))
    if "down" in roles:
        out.append(("input of fc2", s.mlp, 1))
    return out


def merger(s: VisionShape, f: GroupFacts, input_grad: bool) -> list[tuple[str, int, int]]:
    """What the projector (LayerNorm, then Linear-GELU-Linear on ``merge`` patches at once) keeps per merged token;
    ``input_grad``: the tower below trains, so the norm's input is kept too."""
    w, roles = s.dim * s.merge, f.trained_roles
    out = [("GELU input", w, 1)]
    if input_grad or f.mode == "full":  # the norm's input and statistics (per patch)
        out += [("norm input", w, 1), ("norm statistics", 2 * s.merge, 1)]
    if "up" in roles or input_grad:
        out.append(("normed input of fc1", w, 1))
    if "down" in roles:
        out.append(("input of fc2", w, 1))
    return out


def lora_terms(f: GroupFacts, layers: int, itemsize: int) -> list[tuple[str, int, int]]:
    """Per layer per token: each LoRA layer's A output (its rank), and with dropout a copy of its input and mask."""
    out = []
    if f.lora_rank_sum:
        out.append(("LoRA A outputs", max(1, f.lora_rank_sum // max(1, layers)), 1))
    if f.dropout_in_sum:
        # the dropped-out copy (itemsize) and its mask (a byte per element), as one width in items
        width = f.dropout_in_sum // max(1, layers)
        out.append(("LoRA dropout copies and masks", width + -(-width // itemsize), 1))
    return out


@dataclass(frozen=True)
class Batch:
    """The longest batch of a stage: its rows padded to its longest sample, its answer tokens (the logits' rows
    with ``train.label_only_logits``) and its images' patches."""

    rows: int
    length: int  # tokens per row, image tokens included
    answers: int
    patches: int  # vision-tower input patches at each step (none for cached images)
    padded: bool = True  # rows of different lengths: an attention mask is passed
    vision_tokens: int = 0  # image and video tokens: the projector's output rows

    @property
    def tokens(self) -> int:
        return self.rows * self.length


@dataclass(frozen=True)
class Settings:
    """What of the config changes the activations."""

    device: str  # cpu or cuda
    itemsize: int  # bytes per weight and activation in the training dtype
    grad_accum: int = 1
    checkpointing: bool = False
    label_only_logits: bool = True
    vision_runs: bool = True  # the tower runs at each step (no vision-feature cache)


@dataclass
class Tensor:
    """Activations of one kind: ``count`` tensors of ``each`` bytes, kept for the backward or short-lived."""

    group: str
    name: str
    each: int
    count: int
    kept: bool = True

    @property
    def total(self) -> int:
        return self.each * self.count


@dataclass
class Activations:
    """The kept tensors, and the short-lived ones of which the largest moment counts."""

    kept: list[Tensor] = field(default_factory=list)
    transient: list[Tensor] = field(default_factory=list)

    def add(self, group: str, per_item: list[tuple[str, int, int]], items: int, times: int, itemsize: int) -> None:
        for name, width, count in per_item:
            self.kept.append(Tensor(group, name, items * width * itemsize, count * times))

    def peak_transient(self) -> Tensor | None:
        return max(self.transient, key=lambda t: t.total, default=None)


def activations(
    text: TextShape, vision: VisionShape | None, facts: dict[str, GroupFacts], batch: Batch, st: Settings
) -> Activations:
    """The activations of one micro-batch's forward and backward, per group."""
    acts, b, tokens = Activations(), st.itemsize, batch.tokens
    lm, proj, tower, head = (facts[g] for g in ("language_model", "projector", "vision_tower", "lm_head"))
    tower_trains = batch.patches > 0 and tower.trainable > 0
    below_lm = tower_trains or proj.trainable > 0  # the backward continues into the image features
    lm_backward = below_lm or lm.trainable > 0
    if lm_backward:
        layer = text_layer(text, lm, batch.padded) + lora_terms(lm, text.layers, b)
        if st.checkpointing:  # each layer keeps its input; one layer's activations exist again in its backward
            acts.add("language_model", [("checkpointed layer inputs", text.hidden, 1)], tokens, text.layers, b)
            acts.add("language_model", layer, tokens, 1, b)
        else:
            acts.add("language_model", layer, tokens, text.layers, b)
        final = [("final norm input", text.hidden, 1), ("rotary cos, sin", text.head_dim, 2)]
        final += [("final normalized input", text.hidden, 1)] if lm.mode == "full" else []
        acts.add("language_model", final, tokens, 1, b)
        grads = 2 * text.intermediate + 2 * text.hidden  # one MLP's gradients at once in the backward
        acts.transient.append(Tensor("language_model", "one layer's gradients", tokens * grads * b, 1, False))
    if vision is not None and (batch.patches or batch.vision_tokens):
        merged = batch.vision_tokens or batch.patches // vision.merge
        if below_lm:
            acts.add("projector", merger(vision, proj, tower_trains) + lora_terms(proj, 1, b), merged, 1, b)
        if tower_trains:
            block = vision_block(vision, tower) + lora_terms(tower, vision.depth, b)
            depth = 1 if st.checkpointing else vision.depth
            if st.checkpointing:
                acts.add("vision_tower", [("checkpointed block inputs", vision.dim, 1)], batch.patches, vision.depth, b)
            acts.add("vision_tower", block, batch.patches, depth, b)
        if batch.patches:  # a block's largest tensors while it runs (no grad kept when it is frozen)
            width = 3 * vision.dim + 2 * vision.mlp
            acts.transient.append(Tensor("vision_tower", "one block's forward", batch.patches * width * b, 1, False))
    logit_rows = batch.answers if st.label_only_logits else tokens
    if logit_rows:  # logits (training dtype), upcast to float32, log-softmax kept; two float32 gradients after
        cells, upcast = logit_rows * text.vocab, FP32 if b < FP32 else 0
        acts.kept.append(Tensor("lm_head", "log-softmax of the logits", cells * FP32, 1))
        acts.transient.append(Tensor("lm_head", "logits, upcast, gradients", cells * (b + upcast + FP32), 1, False))
        if head.trainable:
            acts.add("lm_head", [("hidden states at the answers", text.hidden, 1)], logit_rows, 1, b)
    for f in facts.values():
        if f.largest_quantized:  # bitsandbytes dequantizes the weight for every forward and backward matmul
            acts.transient.append(Tensor(f.group, "a dequantized weight", f.largest_quantized * b, 2, False))
    if batch.padded and batch.rows:  # the 4-D boolean mask, and the float copy sdpa makes of it in every layer
        acts.kept.append(Tensor("language_model", "attention mask", batch.rows * batch.length**2, 1))
        if lm_backward:
            layers = 1 if st.checkpointing else text.layers
            acts.kept.append(Tensor("language_model", "sdpa's float mask", batch.rows * batch.length**2 * b, layers))
    return acts


# ---------------------------------------------------------------------------------------------
# A model's groups: weights as loaded, what trains
# ---------------------------------------------------------------------------------------------


def quantized_bytes(numel: int, rows: int, quantize: str, double_quant: bool) -> int:
    """Bytes of one linear weight as bitsandbytes holds it: 4-bit packs two weights a byte with one absmax per
    block of 64 (float32, or with double quantization a byte plus a float32 per 256 blocks, a 256-entry code and an
    offset) and its 16-entry code; int8 keeps a byte per weight and a float32 scale per output row."""
    if quantize == "int8":
        return numel + 4 * rows
    blocks = -(-numel // 64)
    constants = blocks + 4 * -(-blocks // 256) + 4 * 256 + 4 if double_quant else 4 * blocks
    return -(-numel // 2) + constants + 4 * 16


def group_facts(
    model,
    gmap,
    plans: list,
    itemsize: int,
    quantized: set[str] = frozenset(),
    quantize: str = "none",
    double_quant: bool = True,
    wrapped: bool = True,
) -> dict[str, GroupFacts]:
    """Every group's facts from a model with or without weights (the meta device serves) and one stage's plans
    (``model.tuning.GroupPlan``); ``quantized``: the linear layers ``model.quantize`` loads quantized; ``wrapped``:
    some stage uses LoRA, so peft wraps the model and a full group trains a copy (``modules_to_save``), which
    counts in the training dtype beside the original; unwrapped, a full group trains its own weights.

    LoRA adapters count in float32 below a 4-byte dtype (peft's ``autocast_adapter_dtype``)."""
    from torch import nn

    from vlmtune.model.groups import module_kind

    modules = dict(model.named_modules())
    lora_itemsize = max(itemsize, FP32)
    facts = {p.group: GroupFacts(p.group, p.mode, 0, 0) for p in plans}
    for name, param in model.named_parameters():
        f = facts[gmap.group_of(name)]
        owner = name.rsplit(".", 1)[0]
        f.params += param.numel()
        if owner in quantized and name.endswith(".weight"):
            f.weight_bytes += quantized_bytes(param.numel(), param.shape[0], quantize, double_quant)
            f.largest_quantized = max(f.largest_quantized, param.numel())
        else:
            f.weight_bytes += param.numel() * itemsize
    for p in plans:
        f = facts[p.group]
        if p.mode == "full":
            f.trainable = f.params
            f.trainable_bytes = f.params * itemsize
            f.copy_bytes = f.trainable_bytes if wrapped else 0
            f.largest_trainable = max(
                (q.numel() for n, q in model.named_parameters() if gmap.group_of(n) == p.group), default=0
            )
            linears = [n for n, m in modules.items() if isinstance(m, nn.Linear) and gmap.group_of(n) == p.group]
            f.trained_roles = frozenset(role_of(n, module_kind(n, gmap.arch)) for n in linears)
        elif p.mode == "lora":
            for n in p.modules:
                m = modules[n]
                f.trainable += p.rank * (m.in_features + m.out_features) + (
                    m.out_features if getattr(p, "dora", False) else 0
                )
                f.lora_rank_sum += p.rank
                f.dropout_in_sum += m.in_features if p.dropout > 0 else 0
                f.largest_trainable = max(f.largest_trainable, p.rank * max(m.in_features, m.out_features))
            f.trainable_bytes = f.trainable * lora_itemsize
            f.trained_roles = frozenset(role_of(n, module_kind(n, gmap.arch)) for n in p.modules)
    return facts
