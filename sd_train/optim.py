"""Optimizer, gradient clipping and learning-rate schedule (linear warmup, then constant / cosine /
linear decay).

Under FSDP2 the parameters, gradients and AdamW moments are DTensors. Every AdamW kernel and the
clipping multiply are elementwise, so they run on the local shards directly (`ShardLocalAdamW`,
`clip_grad_norm_`): the same kernels on the same tensors DTensor dispatch would hand them, bitwise
(tests/e2e/dist/hsdp.py compares both over FSDP and HSDP meshes), without DTensor's sharding
propagation. torch 2.13 computes that propagation once per op and process, in time quadratic in
the list length: 1.3 s for the first fused AdamW step over the test UNet's 324 DTensors, and more
for the clipping's foreach norm and multiply, paid by every launch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from torch.optim.adam import adam as _adam_update  # what torch's Adam(W).step calls

from sd_train.config import OptimArgs


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a DTensor (the tensor itself when it is not one), sharing its storage.
    The attribute, not to_local(): to_local is an autograd Function call per tensor per step."""
    return t._local_tensor if isinstance(t, DTensor) else t


class ShardLocalAdamW(torch.optim.AdamW):
    """torch's AdamW (the same state, param groups and state_dict, so DCP checkpoints it as
    before) whose update runs on each DTensor's local shard. Plain tensors (DDP, DeepSpeed's
    partitions) pass through unchanged."""

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise NotImplementedError("ShardLocalAdamW.step takes no closure")
        for group in self.param_groups:
            lists: tuple[list[torch.Tensor], ...] = ([], [], [], [], [], [])
            # torch's own lazy state init (moments as DTensors like their params, step counters).
            has_complex = self._init_group(group, *lists)
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = (
                [local_shard(t) for t in ts] for ts in lists
            )
            beta1, beta2 = group["betas"]
            _adam_update(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                max_exp_avg_sqs,
                state_steps,
                amsgrad=group["amsgrad"],
                has_complex=has_complex,
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
                foreach=group["foreach"],
                capturable=group["capturable"],
                differentiable=group["differentiable"],
                fused=group["fused"],
                grad_scale=getattr(self, "grad_scale", None),
                found_inf=getattr(self, "found_inf", None),
                decoupled_weight_decay=group["decoupled_weight_decay"],
            )
        return None


def build_optimizer(model: torch.nn.Module, args: OptimArgs, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW (or SGD) over the trainable parameters. `fused` (sd_train.perf.use_fused_adamw):
    one kernel for the whole update instead of foreach's one launch per op over all tensors;
    measured over 688 DTensors on 2 ranks, 22-25 ms of CPU per step against 35-42 ms."""
    params = [p for p in model.parameters() if p.requires_grad]
    if args.name == "sgd":
        return torch.optim.SGD(params, lr=args.lr, weight_decay=args.weight_decay)
    kernels = {"fused": True} if fused else {"foreach": True}
    return ShardLocalAdamW(
        params, lr=args.lr, betas=tuple(args.betas), eps=args.eps, weight_decay=args.weight_decay, **kernels
    )


def _shard_groups(grads: list[torch.Tensor]):
    """The process groups a DTensor gradient's norm is reduced over (its Shard mesh dims), or None
    when the local path does not apply: a plain tensor, or DTensors on different meshes or
    placements (then torch's clip_grad_norm_ on DTensors does it)."""
    if not grads or not all(isinstance(g, DTensor) for g in grads):
        return None
    mesh, placements = grads[0].device_mesh, grads[0].placements
    if any(g.device_mesh != mesh or g.placements != placements for g in grads):
        return None
    if not all(isinstance(pl, Shard) or pl.is_replicate() for pl in placements):
        return None
    return [mesh.get_group(d) for d, pl in enumerate(placements) if isinstance(pl, Shard)]


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (2-norm, foreach) with the same result bitwise, returned as
    a plain tensor (the global norm). For DTensor gradients on one mesh it works on the local
    shards and reduces each gradient's norm as DTensor does (x^2, all-reduce sum over each sharded
    mesh dim, x^(1/2)) before the norm of norms: one all-reduce of one value per gradient, no
    sharding propagation. Anything else goes to torch's."""
    params = list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    groups = _shard_groups(grads)
    if groups is None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm
    local = [local_shard(g) for g in grads]
    # Each gradient's norm is reduced before they are stacked (DTensor's stack replicates its
    # partial inputs first): all of them in one all-reduce per sharded mesh dim.
    norms = torch.stack(torch._foreach_norm(local, 2.0))
    for group in groups:  # DTensor's _NormPartial reduction: x^2, sum, x^(1/2)
        norms = norms**2.0
        dist.all_reduce(norms, group=group)
        norms = norms ** (1.0 / 2.0)
    total = torch.linalg.vector_norm(norms, 2.0)
    clip_coef = float(max_norm) / (total + 1e-6)
    torch._foreach_mul_(local, torch.clamp(clip_coef, max=1.0))
    return total


def lr_factor(step: int, args: OptimArgs, max_steps: int) -> float:
    """Multiplier of the peak LR after `step` scheduler steps."""
    if args.warmup_steps and step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    if args.schedule == "constant":
        return 1.0
    progress = (step - args.warmup_steps) / max(1, max_steps - args.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if args.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def build_lr_schedule(
    optimizer: torch.optim.Optimizer, args: OptimArgs, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args, max_steps))
