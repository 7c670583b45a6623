"""Whether a run's first optimizer step carried the Langevin noise (sd_train.langevin), read from
its weights before and after step 1.

AdamW's first step moves each weight by exactly -lr * g / (|g| + eps) after the decoupled decay
w * (1 - lr * wd): lr in magnitude wherever |g| >> eps, 0 where g = 0. So after removing the decay
and the noise the world-1 reference generates for step 1 (the whole tensors, offset 0), every
element's residual is +-lr or 0, to fp32 rounding. Noise that never reached the weights the
optimizer steps (DeepSpeed's fp32 master), or that was keyed by a rank's local offset, leaves
residuals of the noise's size instead."""

from __future__ import annotations

import math

import torch

from sd_train.langevin import ChunkedNoise, NoisePiece

TOLERANCE = 2e-6  # fp32 rounding of weights of magnitude < 1, with margin


def first_step_residual_share(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], lr: float, wd: float, diffusion: float, seed: int
) -> tuple[float, float]:
    """(share of elements whose step-1 residual is +-lr or 0 with the noise removed, the same share
    without removing it: the control, which must be low for the first figure to mean anything)."""
    std = math.sqrt(2.0 * diffusion * lr)
    noise = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in before.items()}
    ChunkedNoise(seed).add_([NoisePiece(n, t.numel(), 0, t) for n, t in noise.items()], 1, 1.0)
    hits = control = total = 0
    for name, w0 in before.items():
        step = after[name].float() - w0.float() * (1.0 - lr * wd)
        for residual, counter in ((step - std * noise[name], "hits"), (step, "control")):
            ok = torch.minimum((residual.abs() - lr).abs(), residual.abs()) <= TOLERANCE
            if counter == "hits":
                hits += int(ok.sum())
            else:
                control += int(ok.sum())
        total += w0.numel()
    return hits / total, control / total
