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

from sd_train.ema.contracts import EMALayout
from sd_train.ema.plan import EMAPlan
from sd_train.ema.shadow import ShadowPieces


class ShardedEMA(ShadowPieces):
    """Owns the EMA shadow of this rank's parameter pieces and the window's progress. Where each
    rank's piece of a parameter lives is the layout's business (`Strategy.ema_layout()`: DTensor
    shards under FSDP2/DDP, ZeRO-3 partitions, or ZeRO-2's replicas)."""

    what = "EMA"

    def __init__(self, model: torch.nn.Module, plan: EMAPlan, layout: EMALayout):
        super().__init__(model, layout, count=1)
        self.plan = plan
        self.num_updates = 0

    @property
    def shadow(self) -> list[torch.Tensor] | None:
        """The EMA pieces, in `named_params` order (None before the window)."""
        return None if self.pieces is None else self.pieces[0]

    def piece_key(self, index: int, name: str) -> str:  # noqa: ARG002 (one shadow)
        return name

    # ---- the window -------------------------------------------------------------------------

    def update(self, step: int) -> None:
        """Call after every optimizer step that was taken, with the number of steps taken so far.
        Decides itself whether the window is open and whether this step updates."""
        if not self.plan.enabled or step < self.plan.step_start_ema:
            return
        if self.pieces is None:
            # Opening the window: start from the current weights (w_0 of the plan's math).
            self.allocate(copy_weights=True)
            return
        if (step - self.plan.step_start_ema) % self.plan.update_every:
            return
        self.num_updates += 1
        self.lerp([1.0 - self.plan.decay_at(self.num_updates)])

    def allocate(self, copy_weights: bool) -> None:
        """Create the shadow (a copy of the weights, or zeros to be filled by a load)."""
        super().allocate(copy_weights)
        self.num_updates = 0

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
        # Same dtypes: the pieces and the shadow trade values, one tensor at a time, so no copy of
        # the rank's weights is held while the EMA is in (SD2 at 2 ranks: 1.6 GiB per rank less
        # during evaluation); trading back restores both bitwise. Else the raw pieces are copied.
        exchange = all(t.dtype == s.dtype for t, s in zip(locals_, self.shadow))
        with torch.no_grad():
            backup = [] if exchange else [t.clone() for t in locals_]
            _put(locals_, self.shadow, trade=exchange)
        try:
            yield True
        finally:
            self.layout.release()
            with torch.no_grad():
                _put(locals_, self.shadow if exchange else backup, trade=exchange)

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
            self.pieces = None
            self.num_updates = 0

    def tensor_state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow as global tensors: DTensors over the parameters' mesh for sharded params."""
        return {} if self.pieces is None else self.global_tensors(0)

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


def _put(dst: list[torch.Tensor], src: list[torch.Tensor], trade: bool) -> None:
    """Copy `src` into `dst`; with `trade`, `dst`'s values go into `src` too (one temporary tensor)."""
    for d, s in zip(dst, src):
        if trade:
            held = d.clone()
            d.copy_(s)
            s.copy_(held)
        else:
            d.copy_(s)
