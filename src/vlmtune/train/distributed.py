"""What changes with several processes: loss weighting, agreement on branches, sharded weights, the base build.

One process runs the same code with every function here reducing to the single-process case.
"""

from __future__ import annotations

import torch

from vlmtune.train.loss import answer_tokens
from vlmtune.train.resume import STATE_DIR
from vlmtune.train.sharding import full, full_state_dict, is_sharded, load_optimizer


def token_share(batch: dict, accelerator) -> torch.Tensor:
    """Scales this process's mean answer loss so that DDP's gradient average equals the mean over every
    answer token of the global batch (what one process with the whole batch computes)."""
    n = answer_tokens(batch["labels"]).to(torch.float32)
    total = accelerator.reduce(n.clone(), reduction="sum")
    return n * accelerator.num_processes / total.clamp(min=1)


def sharded_engine(accelerator) -> str | None:
    """'FSDP' or 'DEEPSPEED' when parameters or optimizer states are split across processes, else None."""
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    return kind if kind in ("FSDP", "DEEPSPEED") else None


def gathered_state_dict(accelerator, model) -> dict | None:
    """Under FSDP / DeepSpeed ZeRO-3 (or ``train.sharding: fsdp``) the full weights exist only when gathered: every
    process must call this, and the main process writes them. None elsewhere (the model saves itself)."""
    if is_sharded(model):
        return full_state_dict(model)
    return accelerator.get_state_dict(model) if sharded_engine(accelerator) else None


def clip_gradients(accelerator, params: list, max_norm: float) -> torch.Tensor:
    """Clips the global gradient norm (torch's clip_grad_norm_, which also sums sharded DTensor gradients over the
    processes) and returns the norm before clipping as a plain tensor."""
    return full(accelerator.clip_grad_norm_(params, max_norm))


def all_finite(value: torch.Tensor, accelerator) -> bool:
    """True when the value is finite on every process (so all processes take the same branch)."""
    ok = torch.isfinite(value).all().float().reshape(1)
    if accelerator.num_processes > 1:
        ok = accelerator.reduce(ok.to(accelerator.device), reduction="sum") / accelerator.num_processes
    return bool(ok.item() == 1.0)


def any_process(flag: bool, accelerator) -> bool:
    """True when the flag is set on any process (so all processes take the same branch)."""
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        value = accelerator.reduce(value, reduction="sum")
    return bool(value.item() > 0)


def make_accelerator(grad_accum: int, report_to: list[str], project_dir: str):
    """accelerate's Accelerator for a training run, on every process.

    ``find_unused_parameters``: a process whose batch has no image never runs the vision path; without it DDP waits
    forever for those gradients (other tools hang exactly there). ``cpu=True`` where there is no GPU: accelerate only
    forms a multi-process (gloo) group on CPU when told so.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    return Accelerator(
        gradient_accumulation_steps=grad_accum,
        log_with=report_to or None,
        project_dir=project_dir,
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def prepare(accelerator, model, optimizer, loader, state=None) -> tuple:
    """accelerate's prepare of a stage's model, optimizer and loader, and the optimizer states of a resumed stage
    (``state``: a TrainerState). A sharded model stays as it is (its own hooks reduce-scatter its gradients; DDP
    would wrap it again) and reads back this process's shard of the optimizer states."""
    sharded = is_sharded(model)
    model, optimizer, loader = (
        (model, *accelerator.prepare(optimizer, loader)) if sharded else accelerator.prepare(model, optimizer, loader)
    )
    if state is not None and sharded:
        load_optimizer(state.folder / STATE_DIR, model, getattr(optimizer, "optimizer", optimizer))
    elif state is not None:
        optimizer.load_state_dict(state.optimizer)
    return model, optimizer, loader
