"""The reference model of DPO, KTO and GRPO's KL term, without a second copy of the model.

The reference is the policy as the stage found it. Only the parameters the stage trains change during it, so the
reference is the model with those parameters at their stage-start values:

* while no LoRA weight of the model has been trained yet (every LoRA ``B`` is still zero, as peft initialises it),
  the LoRA layers contribute nothing at the stage's start, and peft's ``disable_adapter`` gives their reference
  without storing anything; only the fully-trained groups' starting weights are kept;
* otherwise (an earlier stage trained LoRA weights, e.g. SFT then DPO), the stage's trained tensors are kept at
  their starting values: adapter-sized for LoRA groups.

The reference forward swaps the kept tensors in (no copy: the parameters' storage is exchanged and put back).
The kept tensors travel in resume state, so a resumed stage compares against the same reference.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

LORA_B = ".lora_B."


def lora_untrained(model: nn.Module) -> bool:
    """True while every LoRA B matrix of the model is zero (no adapter has learnt anything yet)."""
    found = False
    for name, p in model.named_parameters():
        if LORA_B in name:
            found = True
            if bool(p.detach().any()):
                return False
    return found


class Reference:
    """The stage's starting point of the trained parameters, and a context in which the model is that point."""

    def __init__(self, model: nn.Module, trained: list[str], disable_adapter: bool, saved: dict[str, torch.Tensor]):
        self.model = model
        self.disable_adapter = disable_adapter
        self.saved = saved
        self.trained = trained

    @classmethod
    def at_stage_start(cls, model: nn.Module, trained: list[str]) -> Reference:
        """The reference of a stage about to train the parameters named ``trained`` (of the unwrapped model)."""
        disable = lora_untrained(model) and hasattr(model, "disable_adapter")
        params = dict(model.named_parameters())
        keep = [n for n in trained if not (disable and ".lora_" in n)]
        return cls(model, trained, disable, {n: params[n].detach().clone() for n in keep})

    def describe(self) -> str:
        size = sum(t.numel() * t.element_size() for t in self.saved.values())
        how = "the model with its adapters disabled" if self.disable_adapter else "the stage's starting weights"
        kept = f"{len(self.saved)} tensor(s), {size / 2**20:.1f} MiB kept" if self.saved else "nothing kept"
        return f"reference: {how} ({kept})"

    @contextmanager
    def active(self) -> Iterator[None]:
        """Inside, the model computes as the reference (no gradients, no dropout); outside, as the policy again."""
        params = dict(self.model.named_parameters())
        swapped = []
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for name, value in self.saved.items():
                    p = params[name]
                    p.data, self.saved[name] = value, p.data
                    swapped.append(name)
                with self.model.disable_adapter() if self.disable_adapter else nullcontext():
                    yield
        finally:
            for name in swapped:
                p = params[name]
                p.data, self.saved[name] = self.saved[name], p.data
            self.model.train(training)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and metadata for resume state."""
        tensors = {f"reference.{n}": t.detach().cpu().contiguous() for n, t in self.saved.items()}
        return tensors, {"reference": json.dumps({"disable_adapter": self.disable_adapter, "trained": self.trained})}

    @classmethod
    def from_state(cls, model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict) -> Reference:
        info = json.loads(meta["reference"])
        device = next(model.parameters()).device
        saved = {k.removeprefix("reference."): v.to(device) for k, v in tensors.items() if k.startswith("reference.")}
        return cls(model, info["trained"], info["disable_adapter"], saved)
