"""The reference model of DPO, KTO and GRPO's KL term, without a second copy of the model.

The reference is the policy as the stage found it. Only the parameters the stage trains change during it, so the
reference is the model with those parameters at their stage-start values:

* while nothing has been trained yet (every LoRA ``B`` still zero, as peft initialises it, and every fully-trained
  group's copy, peft's ``modules_to_save``, still equal to the module it copies), peft's ``disable_adapter`` gives
  the reference without storing anything: the LoRA layers drop out and the fully-trained groups' original modules
  stand in for their copies;
* otherwise (an earlier stage trained, e.g. SFT then DPO), the stage's trained tensors are kept at their starting
  values: adapter-sized for LoRA groups, the group's size for a fully-trained one.

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


def untrained(model: nn.Module) -> bool:
    """True while the adapters have learnt nothing: every LoRA B matrix zero and every ``modules_to_save`` copy
    equal to the module it copies (so the model with its adapters disabled is the model as it is)."""
    for name, p in model.named_parameters():
        if LORA_B in name and bool(p.detach().any()):
            return False
    for module in model.modules():
        copies = getattr(module, "modules_to_save", None)
        original = getattr(module, "original_module", None)
        if isinstance(copies, nn.ModuleDict) and original is not None:
            for copy in copies.values():
                pairs = zip(original.parameters(), copy.parameters(), strict=True)
                if not all(torch.equal(a.detach(), b.detach()) for a, b in pairs):
                    return False
    return True


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
        disable = hasattr(model, "disable_adapter") and untrained(model)
        params = dict(model.named_parameters())
        keep = [] if disable else trained
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
