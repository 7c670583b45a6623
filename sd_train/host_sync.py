"""The one door through which the training loop reads device values on the host.

Every `float(tensor)`, `.item()` or `.tolist()` of a CUDA tensor blocks the host until the GPU has
caught up, and the next kernels cannot be queued meanwhile: the GPU idles for the launch latency of
whatever follows. The loop is allowed one such read per optimizer step on steps that neither log,
evaluate nor save (the grad norm, which decides the non-finite skip). Routing every read through
`read_floats` makes that budget checkable on CPU, where nothing blocks: a test counts the calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class SyncCounter:
    """How many host reads of device values the loop has made (all ranks count their own)."""

    def __init__(self) -> None:
        self.count = 0


COUNTER = SyncCounter()


def read_floats(tensors: Sequence[torch.Tensor]) -> list[float]:
    """The values of a few scalar (or 1-element) tensors, in one device-to-host transfer: one
    host sync however many there are."""
    COUNTER.count += 1
    if len(tensors) == 1:
        return torch.as_tensor(tensors[0]).reshape(-1).tolist()
    return torch.cat([torch.as_tensor(t).reshape(-1).to(torch.float64) for t in tensors]).tolist()


def read_float(tensor: torch.Tensor) -> float:
    (value,) = read_floats([tensor])
    return value
