"""Sharded, late-start EMA of the UNet weights.

Each rank keeps the EMA of its *own local shard* of each parameter (under FSDP2, `p.to_local()`),
as plain tensors. An update is one `torch._foreach_lerp_` over those shards: no collective, no
gather, at the speed of a memory copy. Nothing is allocated before the window opens at
`step_start_ema`; then the shadow starts as a copy of the current weights.

For checkpoints the shards are re-labelled as DTensors with the parameters' mesh and placements
(and the parameters' global shape and stride, because FSDP2 pads uneven shards), so DCP saves one
piece per rank and can reload them on another world size.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from sd_train.ema_plan import EMAPlan
from sd_train.parallel.fsdp import DTensorLayout


def fp32_shadow(tensors: list[torch.Tensor], copy_weights: bool) -> list[torch.Tensor]:
    """An fp32 shadow of each local tensor: a copy of the weights, or zeros to be filled by a load.
    fp32 even for bf16 params: 1 - decay = 1e-4 is below bf16's resolution."""
    with torch.no_grad():
        return [
            t.to(torch.float32, copy=True) if copy_weights else torch.zeros_like(t, dtype=torch.float32)
            for t in tensors
        ]


class ShardedEMA:
    """Owns the EMA shadow of this rank's parameter shards and the window's progress. Where each
    rank's piece of a parameter lives is the layout's business (`Strategy.ema_layout()`: DTensor
    shards under FSDP2/DDP, ZeRO-3 partitions, or ZeRO-2's replicas)."""

    def __init__(self, model: torch.nn.Module, plan: EMAPlan, layout=None):
        self.plan = plan
        self.layout = layout or DTensorLayout(model)
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.shadow: list[torch.Tensor] | None = None
        self.num_updates = 0
        self._locals: list[torch.Tensor] = []

    # ---- the window -------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.shadow is not None

    def update(self, step: int) -> None:
        """Call after every optimizer step that was taken, with the number of steps taken so far.
        Decides itself whether the window is open and whether this step updates."""
        if not self.plan.enabled or step < self.plan.step_start_ema:
            return
        if self.shadow is None:
            # Opening the window: start from the current weights (w_0 of the plan's math).
            self.allocate(copy_weights=True)
            return
        if (step - self.plan.step_start_ema) % self.plan.update_every:
            return
        self.num_updates += 1
        weight = 1.0 - self.plan.decay_at(self.num_updates)
        locals_ = self._locals if self.layout.cache_views else self.layout.views(self.named_params)
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, locals_, weight)

    def allocate(self, copy_weights: bool) -> None:
        """Create the shadow shards (a copy of the weights, or zeros to be filled by a load)."""
        locals_ = self.layout.views(self.named_params)
        self._locals = locals_ if self.layout.cache_views else []
        self.shadow = fp32_shadow(locals_, copy_weights)
        self.num_updates = 0

    def local_bytes(self) -> int:
        """EMA bytes held by this rank (0 before the window)."""
        return sum(t.numel() * t.element_size() for t in self.shadow) if self.shadow else 0

    # ---- evaluation with EMA weights ----------------------------------------------------------

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[bool]:
        """Temporarily put the EMA into the model's local shards (yields False and does nothing if
        the window is not open). Swapping is local: every rank swaps its own shards. Gathered
        copies of the weights are released on the way in and on the way out (`layout.release`),
        so the forwards inside see the EMA in every layer and the training forwards after it see
        the raw weights again."""
        if self.shadow is None:
            yield False
            return
        self.layout.release()
        # Where the forward reads its weights: the same pieces as the EMA's source, except in
        # DeepSpeed's bf16 mode (EMA of the fp32 master, forward from the bf16 partitions, which
        # the copy rounds into).
        locals_ = self.layout.forward_views(self.named_params)
        with torch.no_grad():
            backup = [t.clone() for t in locals_]
            for t, s in zip(locals_, self.shadow):
                t.copy_(s)
        try:
            yield True
        finally:
            self.layout.release()
            with torch.no_grad():
                for t, b in zip(locals_, backup):
                    t.copy_(b)

    # ---- state -------------------------------------------------------------------------------

    def meta_state_dict(self) -> dict:
        """The small, rank-independent part (goes into the trainer's JSON state)."""
        return {"open": self.is_open, "num_updates": self.num_updates, "step_start_ema": self.plan.step_start_ema}

    def load_meta_state_dict(self, state: dict) -> None:
        """Restore the window's progress. Must run before `tensor_state_dict` is loaded into, so the
        shadow exists (as zeros) to receive the saved shards. Restoring this flag is what keeps a
        resumed run from throwing its loaded EMA away."""
        if state["open"]:
            self.allocate(copy_weights=False)
            self.num_updates = int(state["num_updates"])
        else:
            self.shadow = None
            self.num_updates = 0

    def tensor_state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow as global tensors: DTensors over the parameters' mesh for sharded params."""
        if self.shadow is None:
            return {}
        return {name: self.layout.global_tensor(p, s) for (name, p), s in zip(self.named_params, self.shadow)}

    def local_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's shadow pieces by parameter name, for per-rank files (DeepSpeed)."""
        return {} if self.shadow is None else {n: s for (n, _), s in zip(self.named_params, self.shadow)}

    def load_local_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Fill the shadow (allocated by `load_meta_state_dict`) from `local_state_dict` output."""
        if self.shadow is None:
            return
        with torch.no_grad():
            for (n, _), s in zip(self.named_params, self.shadow):
                if n not in state or state[n].shape != s.shape:
                    raise ValueError(
                        f"EMA piece {n!r}: saved {tuple(state[n].shape) if n in state else 'missing'}, "
                        f"expected {tuple(s.shape)}"
                    )
                s.copy_(state[n])

    def full_tensors(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """Gather the EMA into full tensors on the host, one parameter at a time (a collective when
        sharded: every rank must call it). With `keep=False` this rank takes part in the gathers but
        keeps nothing (export keeps the copies on the main process only). Used only for export, never
        for an update."""
        if self.shadow is None:
            return {}
        out = {}
        for (n, p), s in zip(self.named_params, self.shadow):
            full = self.layout.full(p, s)
            if keep:
                out[n] = full.detach().cpu()
        return out
