"""``train.sharding: fsdp``: every process keeps a shard of each weight, gradient and optimizer state (FSDP2).

torch's ``fully_shard`` is applied per transformer layer and vision block (the classes the model names in
``_no_split_modules``, as accelerate's transformer wrap policy does), then to the whole model, whose remaining
weights (embeddings, norms, the projector, lm_head) form one more shard group. It is the FSDP2 that accelerate drives
on GPUs; vlmtune applies it itself so that CPU processes (gloo) shard too, where accelerate's FSDP plugin refuses to
start. The optimizer is built afterwards from the component plan, so every group keeps its own learning rate.

Every process must run the same sharded modules in the same order (each all-gathers its weights before its forward
and reduce-scatters its gradients after the backward). A process whose batch has no image while another's has one
runs the vision tower on a blank image and adds its output times zero to the text embeddings: the loss and every
gradient stay exactly as they were (the tower's gradients from that process are exact zeros), and the collectives
match.

The resume state of a sharded run is written with ``torch.distributed.checkpoint``: each process writes its shard of
the optimizer states into ``trainer_state/optimizer/``; the trainable weights are gathered into
``trainer_state/weights.safetensors`` as for an unsharded run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from vlmtune.config.errors import ConfigError
from vlmtune.tracking import echo

OPTIMIZER_SHARDS = "optimizer"  # trainer_state/optimizer/: torch.distributed.checkpoint's files, one per process
LAYOUT_FILE = "sharding.json"  # trainer_state/sharding.json: how many processes wrote the shards


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to the model (its weights are DTensor shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full(value):
    """A tensor as one process holds it whole: a DTensor gathered (every process must call), others unchanged."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def shard_model(model: nn.Module, processor) -> nn.Module:
    """Shards the model in place across the processes of the default group; returns it.

    Raises:
        ConfigError: the model names no layer classes to shard, or its family's vision path is not the one the
            blank-image forward knows (``get_image_features`` beside ``language_model``).
    """
    from torch.distributed.fsdp import fully_shard

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    owner = getattr(inner, "model", None)
    blocks = set(getattr(inner, "_no_split_modules", None) or ())
    if not blocks or not hasattr(owner, "get_image_features") or not hasattr(owner, "language_model"):
        raise ConfigError(
            [
                f"train.sharding is fsdp, which vlmtune does not do for {type(inner).__name__} yet: set train.sharding: none"
            ],
            "the model",
        )
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    VisionPresence(owner, processor).install()
    echo(f"sharding: fsdp over {dist.get_world_size()} processes ({len(layers)} layers and blocks, then the rest)")
    return model


class VisionPresence:
    """Makes every process run the vision tower whenever any process's forward does (see the module's docstring)."""

    def __init__(self, owner: nn.Module, processor):
        self.owner = owner  # the transformers model that has get_image_features and language_model
        self.processor = processor
        self.pending = False  # this forward must run the tower on a blank image
        self.device = next(owner.parameters()).device  # where the collectives run (CPU with gloo, GPU with nccl)

    def install(self) -> None:
        self.owner.register_forward_pre_hook(self.before_forward, with_kwargs=True)
        self.owner.language_model.register_forward_pre_hook(self.before_language_model, with_kwargs=True)

    def before_forward(self, module, args, kwargs):
        local = any(kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos"))
        anywhere = self.any_process(local)  # every process takes part, whatever its own batch holds
        self.pending = anywhere and not local
        return None

    def any_process(self, local: bool) -> bool:
        flag = torch.tensor([1.0 if local else 0.0], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def before_language_model(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if not self.pending or embeds is None:
            return None
        self.pending = False
        features = self.owner.get_image_features(**self.blank_image(), return_dict=True).pooler_output
        touched = sum(f.sum() for f in features).to(embeds.dtype)
        # x + 0 * t is x exactly (t is finite: a blank image), and the gradient reaching t is exactly zero.
        return args, {**kwargs, "inputs_embeds": embeds + touched * 0.0}

    def blank_image(self) -> dict[str, torch.Tensor]:
        from PIL import Image

        size = getattr(self.processor.image_processor, "patch_size", 14) * 4
        encoded = self.processor.image_processor(images=[Image.new("RGB", (size, size))], return_tensors="pt")
        return {
            "pixel_values": encoded["pixel_values"].to(self.device),
            "image_grid_thw": encoded["image_grid_thw"].to(self.device),
        }


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight gathered whole on the main process, on the CPU (empty elsewhere); every process must call."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_optimizer(state_dir: Path, model: nn.Module, optimizer, processes: int) -> None:
    """Each process writes its shard of the optimizer states (every process must call; ``state_dir`` is shared),
    and the main process the number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if optimizer is not None:  # a stage's folder has none: the next stage starts a new optimizer
        state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.save(state, checkpoint_id=str(state_dir / OPTIMIZER_SHARDS))
    if dist.get_rank() == 0:
        state_dir.mkdir(exist_ok=True)
        (state_dir / LAYOUT_FILE).write_text(json.dumps({"processes": processes}) + "\n", encoding="utf-8")


def load_optimizer(state_dir: Path, model: nn.Module, optimizer) -> None:
    """Reads this process's shard of the optimizer states back (every process must call)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(state_dir / OPTIMIZER_SHARDS))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def resume_problem(state_dir: Path, sharded: bool, processes: int) -> str | None:
    """Why a checkpoint's resume state does not fit this run's sharding and process count, or None when it does.

    A sharded checkpoint's optimizer states are split over the processes that wrote them and its data position
    counts batches per process, so it resumes with as many processes and sharding on; an unsharded one holds whole
    optimizer states, which a sharded run does not read.
    """
    layout = state_dir / LAYOUT_FILE
    if not layout.is_file():
        return (
            None
            if not sharded
            else "it was written by a run without train.sharding: fsdp; resume it with sharding none"
        )
    written = json.loads(layout.read_text(encoding="utf-8"))["processes"]
    if not sharded or written != processes:
        now = f"{processes} process(es)" + ("" if sharded else " without sharding")
        return (
            f"it was written by {written} processes with train.sharding: fsdp (each wrote its shard of the optimizer "
            f"states) and this run has {now}; resume it with {written} processes and train.sharding: fsdp"
        )
    return None


def check_resume(folder: Path, sharded: bool, processes: int) -> None:
    """Raises ConfigError when ``resume_problem`` finds one."""
    from vlmtune.train.resume import STATE_DIR

    why = resume_problem(folder / STATE_DIR, sharded, processes)
    if why is not None:
        raise ConfigError([f"{folder} cannot be resumed here: {why}"], "resume")


def sharding(cfg, accelerator) -> bool:
    """Whether this run shards its model: ``train.sharding: fsdp`` and more than one process (one holds it all)."""
    return cfg.train.sharding == "fsdp" and accelerator.num_processes > 1
