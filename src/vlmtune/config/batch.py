"""``train.batch_size``: a number of samples, or ``auto`` / ``auto:N`` for the memory planner to choose.

``auto``: the largest micro-batch the planner predicts to fit the device (``vlmtune.commands.fitting``), with
``train.grad_accum`` as given, so the samples per optimizer step follow the device. ``auto:N``: N samples per
optimizer step and process whatever the device: the largest micro-batch dividing N that fits, and grad_accum =
N / micro-batch (``train.grad_accum`` is then left at 1). Resolved before training starts; the run's saved
config.yaml holds the numbers chosen.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

AUTO = re.compile(r"^auto(?::(\d+))?$")


def check_batch_size(value: int | str) -> int | str:
    """A positive int (also spelled as a string), ``auto`` or ``auto:N`` with N > 0."""
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            value = int(text)
        elif (m := AUTO.match(text)) and (m.group(1) is None or int(m.group(1)) > 0):
            return text
        else:
            raise ValueError(
                f"{value!r} is not a batch size: give a number of samples, auto (the largest that fits), or auto:N "
                "(N samples per optimizer step, split into micro-batches that fit)"
            )
    if value <= 0:
        raise ValueError("a batch size is a number of samples greater than 0")
    return value


def auto_target(value: int | str) -> tuple[bool, int | None]:
    """(is it auto, the samples per optimizer step auto:N asks for, or None)."""
    if isinstance(value, int):
        return False, None
    n = AUTO.match(value).group(1)
    return True, int(n) if n else None


BatchSize = Annotated[int | str, AfterValidator(check_batch_size)]
