"""The model checks behind `vlmtune doctor` and the training recipe: gradients and dimensions.

Each check is a function of a built model and a real batch and returns a CheckResult (PASS, WARN or FAIL, with
what it saw), so training can run the gradient-flow check at its first step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from vlmtune.model.archs import GROUPS
from vlmtune.model.groups import GroupMap
from vlmtune.model.tuning import GroupPlan

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


def unwrap(model: nn.Module) -> nn.Module:
    """The model under a DistributedDataParallel wrapper, whose parameter names gain a ``module.`` prefix."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def inner_model(model: nn.Module) -> nn.Module:
    """The transformers model under peft's wrapper (module names as in the plan)."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------
# Gradient flow
# ---------------------------------------------------------------------------------------------


def group_grad_norms(model: nn.Module, gmap: GroupMap) -> dict[str, float]:
    """L2 norm of the current gradients of each group that has any, in group order (for logging).

    Call after backward and before ``optimizer.zero_grad``; with fp16 loss scaling, after unscaling. With weights
    sharded across processes (FSDP2's DTensor gradients) every process must call: each adds its shard's squares.
    """
    from torch.distributed.tensor import DTensor

    squares: dict[str, torch.Tensor] = {}
    sharded = False
    for name, param in unwrap(model).named_parameters():
        if param.grad is not None:
            group, grad = gmap.group_of(name), param.grad
            if isinstance(grad, DTensor):  # each process holds a disjoint slice (FSDP2 shards dim 0)
                grad, sharded = grad.to_local(), True
            sq = grad.detach().float().pow(2).sum()
            squares[group] = squares[group] + sq if group in squares else sq
    if sharded:
        names = [g for g in GROUPS if g in squares]
        total = torch.stack([squares[g] for g in names])
        torch.distributed.all_reduce(total)
        squares = dict(zip(names, total))
    return {g: math.sqrt(float(squares[g])) for g in GROUPS if g in squares}


def check_gradients(model: nn.Module, gmap: GroupMap, plans: list[GroupPlan]) -> CheckResult:
    """Judges gradients already computed by a backward pass: every trained group's norm is finite and
    non-zero, and no frozen group has any. Does not change the gradients."""
    trained = {p.group for p in plans if p.mode != "frozen" and p.trainable_params > 0}
    frozen_with_grad: dict[str, list[str]] = {}
    tensors: dict[str, int] = {}
    for name, param in unwrap(model).named_parameters():
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
                problems.append(
                    f"gradients of {group} are not finite (norm {norm}) over its {tensors[group]} trainable tensor(s)"
                )
            elif norm == 0.0:
                problems.append(
                    f"gradients do not reach {group}: norm 0 over its {tensors[group]} trainable tensor(s); "
                    "something between the loss and this group cuts the graph (a detach(), torch.no_grad(), "
                    "or an input that never reaches it)"
                )
            else:
                seen.append(f"{group} {norm:.3g}")
        if group in frozen_with_grad:
            names = frozen_with_grad[group]
            problems.append(f"frozen group {group} receives gradients ({len(names)} tensor(s), e.g. {names[0]})")
    if problems:
        return CheckResult("gradient flow", "FAIL", problems + ([f"gradient norms: {', '.join(seen)}"] if seen else []))
    frozen = [g for g in GROUPS if g not in trained]
    return CheckResult(
        "gradient flow",
        "PASS",
        [f"gradient norms: {', '.join(seen)}; frozen and gradient-free: {', '.join(frozen) or 'none'}"],
    )


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


def check_dimensions(
    model: nn.Module, gmap: GroupMap, batch: dict, image_token_id: int, where: str = ""
) -> list[CheckResult]:
    """Runs the vision path on one real sample and compares widths and counts at each boundary:
    vision tower output -> projector input, projector output -> language model hidden size, and
    image placeholder tokens -> features produced for the sample's image grid."""
    inner = inner_model(model)
    names = (
        "dimensions: vision tower -> projector",
        "dimensions: projector -> language model",
        "dimensions: image tokens",
    )
    roots = group_roots(inner, gmap, "projector")
    if "pixel_values" not in batch or not roots or not hasattr(inner, "get_image_features"):
        why = (
            "the sample has no image"
            if "pixel_values" not in batch
            else "no projector / no get_image_features on this model"
        )
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
    hooks += [
        leaf.register_forward_pre_hook(record_layer(n))
        for n, leaf in proj.named_modules()
        if _expected_width(leaf) is not None
    ]
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
        head = (
            f"vision tower output width {got} does not match the projector's input width {exp} ({proj_name}.{n})"
            if first
            else f"{proj_name}.{n} expects width {exp} but receives {got}"
        )
        results.append(CheckResult(names[0], "FAIL", [head] + ([f"error: {error}"] if error else [])))
    else:
        results.append(
            CheckResult(names[0], "PASS", [f"vision tower output width {seen['in'][-1]} = projector input width"])
        )

    # projector -> language model
    hidden = inner.get_input_embeddings().embedding_dim
    if "out" in seen:
        width, source = seen["out"][-1], "output"
    else:
        linears = [
            (n, m)
            for n, m in proj.named_modules()
            if isinstance(m, nn.Linear) and ".lora_A." not in f"{n}." and ".lora_B." not in f"{n}."
        ]
        width, source = (linears[-1][1].out_features, f"last layer {linears[-1][0]}") if linears else (None, "")
    if width != hidden:
        results.append(
            CheckResult(
                names[1],
                "FAIL",
                [
                    f"projector {source} width {width} does not match the language model's hidden size {hidden} ({proj_name})"
                ],
            )
        )
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
        results.append(
            CheckResult(
                names[2],
                "FAIL",
                [
                    f"{place}{tokens} image placeholder tokens but the vision path produces {features} features for {fail_source}{why}; "
                    "the processor and the model disagree on how many tokens an image takes (compare the processor's "
                    "patch and merge sizes with the model's vision config)"
                ],
            )
        )
    else:
        results.append(
            CheckResult(names[2], "PASS", [f"{place}{tokens} image tokens = {features} features for {source}"])
        )
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
    return {
        k: v
        for k, v in batch.items()
        if k in params or (open_kwargs and k.startswith(("pixel_", "image_")) and k != "image_token_id")
    }
