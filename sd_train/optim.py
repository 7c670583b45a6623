"""Optimizer and learning-rate schedule (linear warmup, then constant / cosine / linear decay)."""

from __future__ import annotations

import math

import torch

from sd_train.config import OptimArgs


def build_optimizer(model: torch.nn.Module, args: OptimArgs, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW (or SGD) over the trainable parameters. `fused` (sd_train.perf.use_fused_adamw):
    one kernel for the whole update instead of foreach's one launch per op over all tensors;
    measured over 688 DTensors on 2 ranks, 22-25 ms of CPU per step against 35-42 ms."""
    params = [p for p in model.parameters() if p.requires_grad]
    if args.name == "sgd":
        return torch.optim.SGD(params, lr=args.lr, weight_decay=args.weight_decay)
    kernels = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(
        params, lr=args.lr, betas=tuple(args.betas), eps=args.eps, weight_decay=args.weight_decay, **kernels
    )


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
