"""What changes with several processes: loss weighting, agreement on branches, sharded weights, the base build.

One process runs the same code with every function here reducing to the single-process case.
"""

from __future__ import annotations

import torch


def token_share(batch: dict, accelerator) -> torch.Tensor:
    """Scales this process's mean answer loss so that DDP's gradient average equals the mean over every
    answer token of the global batch (what one process with the whole batch computes)."""
    n = (batch["labels"][:, 1:] != -100).sum().to(torch.float32)
    total = accelerator.reduce(n.clone(), reduction="sum")
    return n * accelerator.num_processes / total.clamp(min=1)


def build_base_alone() -> None:
    """Builds the builtin base in a single-process child (its pretraining is a one-process run whatever launched
    this one, so the cached base is the same however it was first built)."""
    import os
    import subprocess
    import sys

    from vlmtune.builtin import base_dir

    if (base_dir() / "model.safetensors").is_file():
        return
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                        "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    subprocess.run([sys.executable, "-c", "from vlmtune.builtin import ensure_base; ensure_base()"], env=env, check=True)


def sharded_engine(accelerator) -> str | None:
    """'FSDP' or 'DEEPSPEED' when parameters or optimizer states are split across processes, else None."""
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    return kind if kind in ("FSDP", "DEEPSPEED") else None


def gathered_state_dict(accelerator, model) -> dict | None:
    """Under FSDP / DeepSpeed ZeRO-3 the full weights exist only when gathered: every process must call this
    (accelerate's get_state_dict), and the main process writes them. None elsewhere (the model saves itself)."""
    return accelerator.get_state_dict(model) if sharded_engine(accelerator) else None


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
