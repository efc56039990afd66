"""`vlmtune doctor`: the environment, the resolved plan, then checks that each report PASS, WARN or FAIL.

The checks follow the seed's troubleshooting list: feature dimensions match (vision tower -> projector ->
language model, and image tokens = image features), gradients reach every trained group and no frozen one,
LoRA settings are sensible (alpha near 2 x rank), and the configured batch fits the device. Each check is a
function of a built model and a real batch, so training can run the gradient-flow check at its first step.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from vlmtune.archs import GROUPS
from vlmtune.data.collate import expanded_image_token
from vlmtune.groups import GroupMap
from vlmtune.tuning import GroupPlan

Status = Literal["PASS", "WARN", "FAIL"]


@dataclass
class CheckResult:
    """One check's verdict and what it saw; the first line names the problem."""

    name: str
    status: Status
    lines: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status != "FAIL"

    def __str__(self) -> str:
        head = f"{self.status}  {self.name}" + (f": {self.lines[0]}" if self.lines else "")
        return "\n".join([head, *(f"      {line}" for line in self.lines[1:])])


def _unwrap(model: nn.Module) -> nn.Module:
    """The model under a DistributedDataParallel wrapper, whose parameter names gain a ``module.`` prefix."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def _inner(model: nn.Module) -> nn.Module:
    """The transformers model under peft's wrapper (module names as in the plan)."""
    model = _unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------
# Gradient flow
# ---------------------------------------------------------------------------------------------


def group_grad_norms(model: nn.Module, gmap: GroupMap) -> dict[str, float]:
    """L2 norm of the current gradients of each group that has any, in group order (for logging).

    Call after backward and before ``optimizer.zero_grad``; with fp16 loss scaling, after unscaling.
    """
    squares: dict[str, torch.Tensor] = {}
    for name, param in _unwrap(model).named_parameters():
        if param.grad is not None:
            group = gmap.group_of(name)
            sq = param.grad.detach().float().pow(2).sum()
            squares[group] = squares[group] + sq if group in squares else sq
    return {g: math.sqrt(float(squares[g])) for g in GROUPS if g in squares}


def check_gradients(model: nn.Module, gmap: GroupMap, plans: list[GroupPlan]) -> CheckResult:
    """Judges gradients already computed by a backward pass: every trained group's norm is finite and
    non-zero, and no frozen group has any. Does not change the gradients."""
    trained = {p.group for p in plans if p.mode != "frozen" and p.trainable_params > 0}
    frozen_with_grad: dict[str, list[str]] = {}
    tensors: dict[str, int] = {}
    for name, param in _unwrap(model).named_parameters():
        group = gmap.group_of(name)
        if group in trained and param.requires_grad:
            tensors[group] = tensors.get(group, 0) + 1
        elif group not in trained and param.grad is not None:
            frozen_with_grad.setdefault(group, []).append(name)
    norms = group_grad_norms(model, gmap)
    problems, seen = [], []
    for group in GROUPS:
        if group in trained:
            norm = norms.get(group, 0.0)
            if not math.isfinite(norm):
                problems.append(f"gradients of {group} are not finite (norm {norm}) over its {tensors[group]} trainable tensor(s)")
            elif norm == 0.0:
                problems.append(f"gradients do not reach {group}: norm 0 over its {tensors[group]} trainable tensor(s); "
                                "something between the loss and this group cuts the graph (a detach(), torch.no_grad(), "
                                "or an input that never reaches it)")
            else:
                seen.append(f"{group} {norm:.3g}")
        if group in frozen_with_grad:
            names = frozen_with_grad[group]
            problems.append(f"frozen group {group} receives gradients ({len(names)} tensor(s), e.g. {names[0]})")
    if problems:
        return CheckResult("gradient flow", "FAIL", problems + ([f"gradient norms: {', '.join(seen)}"] if seen else []))
    frozen = [g for g in GROUPS if g not in trained]
    return CheckResult("gradient flow", "PASS", [f"gradient norms: {', '.join(seen)}; frozen and gradient-free: {', '.join(frozen) or 'none'}"])


def forward_backward(model: nn.Module, batch: dict) -> tuple[float, int]:
    """One training forward and backward; returns the loss and the bytes of activations the forward saved for
    backward (tensors other than parameters, each storage once), which is what the batch costs in memory."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    return float(loss.detach()), sum(saved.values())


def check_gradient_flow(model: nn.Module, batch: dict, gmap: GroupMap, plans: list[GroupPlan]) -> CheckResult:
    """Runs one forward and backward on ``batch``, judges the gradients (``check_gradients``), then clears
    every gradient (set to None), so the model is as it was."""
    try:
        forward_backward(model, batch)
        return check_gradients(model, gmap, plans)
    finally:
        for p in model.parameters():
            p.grad = None


# ---------------------------------------------------------------------------------------------
# Dimensions
# ---------------------------------------------------------------------------------------------


def group_roots(model: nn.Module, gmap: GroupMap, group: str) -> list[tuple[str, nn.Module]]:
    """The outermost modules of a group (Qwen2-VL's projector: ``model.visual.merger``)."""
    modules = dict(model.named_modules())
    roots = []
    for name, module in modules.items():
        if name and gmap.group_of(name) == group and gmap.group_of(name.rpartition(".")[0]) != group:
            roots.append((name, module))
    return roots


def _expected_width(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    return None


def check_dimensions(model: nn.Module, gmap: GroupMap, batch: dict, image_token_id: int, where: str = "") -> list[CheckResult]:
    """Runs the vision path on one real sample and compares widths and counts at each boundary:
    vision tower output -> projector input, projector output -> language model hidden size, and
    image placeholder tokens -> features produced for the sample's image grid."""
    inner = _inner(model)
    names = ("dimensions: vision tower -> projector", "dimensions: projector -> language model", "dimensions: image tokens")
    roots = group_roots(inner, gmap, "projector")
    if "pixel_values" not in batch or not roots or not hasattr(inner, "get_image_features"):
        why = "the sample has no image" if "pixel_values" not in batch else "no projector / no get_image_features on this model"
        return [CheckResult(n, "WARN", [f"not checked: {why}"]) for n in names]
    proj_name, proj = roots[0]
    calls: list[tuple[str, int | None, int]] = []  # (layer, expected input width, received width), in call order
    seen: dict[str, torch.Size] = {}

    # Hooks return None: a value returned from a hook would replace the module's input or output.
    def record_input(module, args) -> None:
        seen.setdefault("in", args[0].shape)

    def record_output(module, args, out) -> None:
        seen.setdefault("out", out.shape)

    def record_layer(name: str):
        def hook(module, args) -> None:
            calls.append((name, _expected_width(module), args[0].shape[-1]))
        return hook

    hooks = [proj.register_forward_pre_hook(record_input), proj.register_forward_hook(record_output)]
    hooks += [leaf.register_forward_pre_hook(record_layer(n)) for n, leaf in proj.named_modules() if _expected_width(leaf) is not None]
    error, produced = None, None
    try:
        with torch.no_grad():
            produced = feature_rows(inner.get_image_features(**image_inputs(inner, batch)))
    except Exception as e:  # a width mismatch raises inside the projector; the hooks saw where
        error = e
    finally:
        for h in hooks:
            h.remove()
    results = []

    # vision tower -> projector (and every layer inside the projector)
    bad = [(n, exp, got) for n, exp, got in calls if exp != got]
    if "in" not in seen:
        results.append(CheckResult(names[0], "FAIL", [f"the vision tower fails before the projector: {error}"]))
    elif bad:
        first = calls and calls[0][0] == bad[0][0]
        n, exp, got = bad[0]
        head = (f"vision tower output width {got} does not match the projector's input width {exp} ({proj_name}.{n})" if first
                else f"{proj_name}.{n} expects width {exp} but receives {got}")
        results.append(CheckResult(names[0], "FAIL", [head] + ([f"error: {error}"] if error else [])))
    else:
        results.append(CheckResult(names[0], "PASS", [f"vision tower output width {seen['in'][-1]} = projector input width"]))

    # projector -> language model
    hidden = inner.get_input_embeddings().embedding_dim
    if "out" in seen:
        width, source = seen["out"][-1], "output"
    else:
        linears = [(n, m) for n, m in proj.named_modules() if isinstance(m, nn.Linear) and not n.endswith(("lora_A.default", "lora_B.default"))]
        width, source = (linears[-1][1].out_features, f"last layer {linears[-1][0]}") if linears else (None, "")
    if width != hidden:
        results.append(CheckResult(names[1], "FAIL", [f"projector {source} width {width} does not match the language model's hidden size {hidden} ({proj_name})"]))
    else:
        results.append(CheckResult(names[1], "PASS", [f"projector output width {width} = language model hidden size"]))

    # image tokens -> features
    tokens = int((batch["input_ids"] == image_token_id).sum())
    place = f"{where}: " if where else ""
    if "image_grid_thw" in batch:  # Qwen-VL: the count follows from the image grid
        grids = batch["image_grid_thw"].tolist()
        merge = getattr(getattr(inner.config, "vision_config", None), "spatial_merge_size", 1)
        expected = sum(t * h * w for t, h, w in grids) // merge**2
        source, why = f"grid(s) {grids}", f" (patches / spatial_merge_size^2 = {expected})"
        fail_source = f"its image grid(s) {grids}"
    else:  # every projector output row but the width is one feature (images x tokens per image x width)
        expected = math.prod(seen["out"][:-1]) if "out" in seen else None
        source = fail_source = "its image(s)"
        why = ""
    # What get_image_features returns is what replaces the placeholders (after any unpadding or row-end
    # tokens such as LLaVA-NeXT's image_newline); the projector's own output is the fallback.
    features = produced if produced is not None else math.prod(seen["out"][:-1]) if "out" in seen else expected
    if tokens != features:
        results.append(CheckResult(names[2], "FAIL", [
            f"{place}{tokens} image placeholder tokens but the vision path produces {features} features for {fail_source}{why}; "
            "the processor and the model disagree on how many tokens an image takes (compare the processor's "
            "patch and merge sizes with the model's vision config)"]))
    else:
        results.append(CheckResult(names[2], "PASS", [f"{place}{tokens} image tokens = {features} features for {source}"]))
    return results


def feature_rows(out) -> int | None:
    """Image feature vectors in ``get_image_features``' result (a tensor, or ``pooler_output`` of a tensor or a
    list of tensors per image): every row but the width."""
    feats = out if torch.is_tensor(out) else getattr(out, "pooler_output", None)
    if feats is None:
        return None
    parts = feats if isinstance(feats, (list, tuple)) else [feats]
    return sum(p.numel() // p.shape[-1] for p in parts if torch.is_tensor(p))


def image_inputs(model: nn.Module, batch: dict) -> dict:
    """The batch's inputs that ``get_image_features`` takes (pixel values, grids, sizes, masks)."""
    import inspect

    params = inspect.signature(model.get_image_features).parameters
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {k: v for k, v in batch.items()
            if k in params or (open_kwargs and k.startswith(("pixel_", "image_")) and k != "image_token_id")}


# ---------------------------------------------------------------------------------------------
# LoRA settings and memory
# ---------------------------------------------------------------------------------------------

VISION_PATH = ("vision_tower", "projector")


def check_lora_settings(model: nn.Module, plans: list[GroupPlan]) -> CheckResult:
    """Flags alpha/rank far from the seed's 2x (WARN), dropout on the vision path (WARN) and a rank larger
    than a wrapped layer's width (FAIL: such a rank adds parameters but no capacity)."""
    inner = _inner(model)
    warns, fails = [], []
    for p in plans:
        if p.mode != "lora":
            continue
        ratio = p.alpha / p.rank
        if not 1.0 <= ratio <= 4.0:
            warns.append(f"groups.{p.group}: alpha/rank = {ratio:g} (alpha {p.alpha:g}, rank {p.rank}); the seed starts at "
                         f"alpha = 2 x rank ({2 * p.rank}), and scaling far from it changes the effective learning rate")
        if p.dropout > 0 and p.group in VISION_PATH:
            warns.append(f"groups.{p.group}.dropout = {p.dropout:g}: on the vision path every image patch's input is copied and "
                         f"masked at each of the {len(p.modules)} wrapped layer(s), where most of the tokens are, which costs "
                         "time and memory; keep dropout for language_model LoRA, or set 0 here")
        narrow = []
        for name in p.modules:
            module = inner.get_submodule(name)
            width = min(getattr(module, "in_features", p.rank), getattr(module, "out_features", p.rank))
            if p.rank > width:
                narrow.append(f"{name} ({width})")
        if narrow:
            fails.append(f"groups.{p.group}.rank = {p.rank} is larger than the width min(in, out) of {len(narrow)} layer(s): "
                         f"{', '.join(narrow[:4])}{' ...' if len(narrow) > 4 else ''}; the update cannot exceed that rank, "
                         "so use a rank at most the smallest width")
    if fails:
        return CheckResult("LoRA settings", "FAIL", fails + warns)
    if warns:
        return CheckResult("LoRA settings", "WARN", warns)
    lora = [f"{p.group} r{p.rank}/alpha {p.alpha:g}/dropout {p.dropout:g}" for p in plans if p.mode == "lora"]
    return CheckResult("LoRA settings", "PASS", [", ".join(lora) or "no LoRA group"])


def device_memory(device: torch.device) -> int:
    """Bytes of memory on the device (GPU total, or the machine's RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(model: nn.Module, activation_bytes: int, batch: dict, device: torch.device, max_length: int,
                 batch_size: int) -> CheckResult:
    """Weights + gradients + AdamW state (two tensors per trainable one) + activations measured on the batch,
    against the device's memory (FAIL above 90%); a batch of max_length samples is estimated too (WARN)."""
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    total = weights + 3 * grads + activation_bytes
    capacity = device_memory(device)
    rows, tokens = batch["input_ids"].shape
    lines = [f"{_gib(total)} of {_gib(capacity)} on {device}: weights {_gib(weights)} + gradients {_gib(grads)} + AdamW state "
             f"{_gib(2 * grads)} + activations {_gib(activation_bytes)} (batch of {rows} sample(s) padded to {tokens} tokens, "
             "measured from what the forward saves for backward)"]
    if rows < batch_size:
        lines.append(f"the data gave {rows} sample(s) for a configured batch of {batch_size}")
    worst = weights + 3 * grads + activation_bytes * (batch_size * max_length) / max(1, rows * tokens)
    lines.append(f"a batch of {batch_size} sample(s) all at data.max_length={max_length} would need about {_gib(worst)}")
    if total > 0.9 * capacity:
        return CheckResult("memory", "FAIL", lines)
    return CheckResult("memory", "WARN" if worst > 0.9 * capacity else "PASS", lines)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def environment_lines(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Versions, the device and which dtypes it supports."""
    import accelerate
    import peft
    import torchvision
    import transformers

    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}", f"torchvision {torchvision.__version__}",
                f"transformers {transformers.__version__}", f"peft {peft.__version__}", f"accelerate {accelerate.__version__}"]
    lines = [", ".join(versions)]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"device {device}: {props.name}, {_gib(props.total_memory)}, compute capability {props.major}.{props.minor}")
        lines.append(f"dtypes: bfloat16 {'supported' if torch.cuda.is_bf16_supported() else 'not supported'}, float16 supported")
    else:
        lines.append(f"device cpu: {torch.get_num_threads()} thread(s), {_gib(device_memory(device))} RAM, "
                     f"instruction set {torch.backends.cpu.get_cpu_capability()}; no CUDA device")
        lines.append("dtypes: float32 (bfloat16 runs on CPU, slowly without AVX512-BF16/AMX)")
    lines.append(f"training dtype: {str(dtype).removeprefix('torch.')}")
    return lines


def first_items(cfg, processor, n: int) -> tuple[list[dict], list[str]]:
    """Up to ``n`` checked, processed samples from the start of the train split (not augmented), and their places."""
    from vlmtune.data.dataset import VLMDataset, iter_split
    from vlmtune.data.sharegpt import Sample

    samples = []
    for got in iter_split(cfg.data.train, cfg.data, "train"):
        if isinstance(got, Sample):
            samples.append(got)
            if len(samples) == n:
                break
    ds = VLMDataset(samples, processor, cfg.data.model_copy(update={"on_bad_sample": "skip"}), split="eval")
    return [ds[i] for i in range(len(ds))], [it.sample.where for it in ds.items]


def batch_of(items: list[dict], processor, device: torch.device) -> dict:
    """Collated and on the device, as the training loader makes it."""
    from vlmtune.data.collate import collate

    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    video = getattr(processor, "video_token", None)
    batch = collate(items, pad_id, tok.convert_tokens_to_ids(processor.image_token),
                    tok.convert_tokens_to_ids(video) if video else None)
    return {k: v.to(device) for k, v in batch.items()}


def run_checks(model: nn.Module, processor, gmap: GroupMap, plans: list[GroupPlan], items: list[dict], wheres: list[str],
               device: torch.device, max_length: int, batch_size: int) -> list[CheckResult]:
    """Every check on a built, planned model and real processed samples."""
    image_token_id = processor.tokenizer.convert_tokens_to_ids(expanded_image_token(processor))
    with_image = next((i for i, it in enumerate(items) if "pixel_values" in it), 0)
    results = check_dimensions(model, gmap, batch_of(items[with_image:with_image + 1], processor, device),
                               image_token_id, wheres[with_image])
    batch = batch_of(items, processor, device)
    activations = 0
    try:
        _, activations = forward_backward(model, batch)
        results.append(check_gradients(model, gmap, plans))
    except Exception as e:  # a dimension problem usually shows up here too
        results.append(CheckResult("gradient flow", "FAIL", [f"forward/backward on a batch of {len(items)} failed: {e}"]))
    finally:
        for p in model.parameters():
            p.grad = None
    results.append(check_lora_settings(model, plans))
    results.append(check_memory(model, activations, batch, device, max_length, batch_size))
    return results


def doctor(cfg, echo=print) -> int:
    """The command: environment, plan, checks. Returns 1 if any check FAILs, else 0."""
    from vlmtune.groups import assign_groups
    from vlmtune.modeling import arch_for, load_model, resolve_dtype
    from vlmtune.optim import describe, param_groups
    from vlmtune.tuning import apply_plan, build_plan, plan_table

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    echo("environment")
    for line in environment_lines(device, resolve_dtype(cfg.model.dtype, device)):
        echo(f"  {line}")
    model, processor = load_model(cfg.model, device, echo=echo)
    model.to(device)
    gmap = assign_groups([n for n, _ in model.named_parameters()], arch_for(model, cfg.model))
    plans = build_plan(model, gmap, cfg)
    torch.manual_seed(cfg.train.seed)
    model = apply_plan(model, gmap, plans)
    echo(f"\nplan: {type(model).__name__} ({gmap.arch.name}, layout {gmap.layout.name})")
    echo(plan_table(plans))
    for line in describe(param_groups(model, gmap, plans)):
        echo(line)
    items, wheres = first_items(cfg, processor, cfg.train.batch_size)
    if not items:
        echo("\nFAIL  data: no usable sample at the start of data.train (run `vlmtune data check` on it)")
        return 1
    echo("\nchecks")
    results = run_checks(model, processor, gmap, plans, items, wheres, device, cfg.data.max_length, cfg.train.batch_size)
    for r in results:
        echo(str(r))
    failed = [r.name for r in results if r.status == "FAIL"]
    echo(f"\n{len(failed)} check(s) failed: {', '.join(failed)}" if failed else "\nall checks passed")
    return 1 if failed else 0
