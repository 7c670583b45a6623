"""One-batch-ahead copies of training batches to the device.

On CUDA, `CudaStager.stage` issues the host-to-device copies of batch N+1 on a side stream (from
the pinned memory the DataLoader hands over, so `non_blocking` really is asynchronous) while step N
runs on the default stream; `ready` makes the default stream wait for those copies and tells the
caching allocator (`record_stream`) that the default stream now uses the memory, so it is not
reused under it. TrainLoader holds one staged batch back and records a batch's position only when
it hands the batch out, so the data position in a checkpoint still counts consumed batches.

Elsewhere (`NO_STAGING`) nothing is staged or held back: the loader yields what it did before.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Stager(Protocol):
    """Moves a batch's tensors to the device ahead of use (`stage`), then hands it over (`ready`)."""

    lookahead: int
    """Batches staged before the one handed out: 1 for a real prefetch, 0 for none."""

    def stage(self, batch: dict) -> dict: ...

    def ready(self, batch: dict) -> dict: ...


class NoStaging:
    """The CPU fallback: batches pass through untouched and nothing is held back."""

    lookahead = 0

    def stage(self, batch: dict) -> dict:
        return batch

    def ready(self, batch: dict) -> dict:
        return batch


NO_STAGING = NoStaging()


class CudaStager:
    """Owns the side stream that copies batches to one CUDA device."""

    lookahead = 1

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def stage(self, batch: dict) -> dict:
        # No wait on the default stream first: the copies read pinned host memory that nothing
        # else touches and write fresh device memory, so they may start at once.
        with torch.cuda.stream(self.stream):
            return {
                k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
            }

    def ready(self, batch: dict) -> dict:
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                v.record_stream(current)
        return batch


def stager_for(device: torch.device, enabled: bool = True) -> Any:
    """A CudaStager for a CUDA device when `enabled`, else NO_STAGING."""
    return CudaStager(device) if enabled and device.type == "cuda" else NO_STAGING
