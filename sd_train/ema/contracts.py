"""The two contracts of the EMA package, as typing Protocols.

`EMALayout`: where each rank's piece of each parameter lives, and how to label or gather a shadow
of it. Each strategy has one (`Strategy.ema_layout()`): `DTensorLayout` (FSDP2 shards, DDP
replicas; sd_train/parallel/fsdp.py), `Zero3Layout` and `ReplicatedLayout` (DeepSpeed ZeRO-3
partitions and ZeRO-2 replicas; sd_train/parallel/deepspeed.py).

`Shadow`: what the checkpointer saves and loads for every shadow of the weights, whatever it
averages (`ShardedEMA`, `PowerEMAProfiles`): a small rank-independent state for trainer_state.json
and tensors, global for DCP or local for per-rank files.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

NamedParams = list[tuple[str, torch.Tensor]]


@runtime_checkable
class EMALayout(Protocol):
    """Where a rank's piece of each parameter lives under one strategy."""

    name: str
    """Recorded in post-hoc snapshots (`dtensor`, `zero3`, `replicated`)."""
    cache_views: bool
    """Whether `views` may be looked up once per window: true where the optimizer updates the
    pieces in place; false where the engine may re-point parameters (DeepSpeed)."""

    def views(self, named_params: NamedParams) -> list[torch.Tensor]:
        """This rank's pieces of the parameters, the ones a shadow averages."""
        ...

    def forward_views(self, named_params: NamedParams) -> list[torch.Tensor]:
        """The pieces the forward reads, which an EMA swap overwrites (the same as `views` except
        in DeepSpeed's bf16 mode, where the EMA follows the fp32 master)."""
        ...

    def release(self) -> None:
        """Drop gathered copies of the weights, so the next forward reads the pieces."""
        ...

    def global_tensor(self, p: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
        """`shard` (a piece of `p`'s shadow) labelled as the global tensor it is a piece of, for DCP."""
        ...

    def full(self, p: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
        """The whole shadow tensor of `p` (a collective where sharded)."""
        ...

    def stored_shapes(self, named_params: NamedParams) -> dict[str, list[int]]:
        """The shapes to view `global_tensor`'s stored tensors as, where it flattens them."""
        ...


@runtime_checkable
class Shadow(Protocol):
    """A sharded shadow of the weights, as the checkpointer and the strategies see it."""

    named_params: NamedParams
    """The trainable parameters it follows, in order (their names key every state below)."""

    @property
    def is_open(self) -> bool:
        """Whether the shadow exists yet (nothing is allocated before its start step)."""
        ...

    def meta_state_dict(self) -> dict[str, Any]:
        """The small, rank-independent state, saved in trainer_state.json under the shadow's key."""
        ...

    def load_meta_state_dict(self, state: dict[str, Any]) -> None:
        """Restore that state; allocates the shadow (as zeros) when it was open, so that the tensor
        load that follows has somewhere to write. Raises ValueError on a mismatched config."""
        ...

    def tensor_state_dict(self) -> dict[str, Any]:
        """The shadow as global tensors (DTensors where sharded), for DCP."""
        ...

    def local_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's pieces by key, for per-rank files (DeepSpeed)."""
        ...

    def load_local_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Fill the allocated shadow from `local_state_dict` output; ValueError on a mismatch."""
        ...
