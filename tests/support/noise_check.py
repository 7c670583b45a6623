"""Whether a run's first optimizer step carried the Langevin noise (sd_train.langevin), read from
its weights before and after step 1.

AdamW's first step moves each weight by -lr * g / (|g| + eps) after the decoupled decay
w * (1 - lr * wd): at most lr in magnitude (lr where |g| >> eps). So after removing the decay and
the noise the world-1 reference generates for step 1 (the whole tensors, offset 0), every element's
residual is within lr, to fp32 rounding. Noise that never reached the weights the optimizer steps
(DeepSpeed's fp32 master), or that was keyed by a rank's local offset, leaves about half of the
residuals beyond lr (wherever the noise and the step share a sign)."""

from __future__ import annotations

import math

import torch

from sd_train.langevin import ChunkedNoise, NoisePiece

TOLERANCE = 2e-6  # fp32 rounding of weights of magnitude < 1, with margin


def first_step_residual_share(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], lr: float, wd: float, diffusion: float, seed: int
) -> tuple[float, float]:
    """(share of elements whose step-1 residual is within lr once the noise is removed, the same
    share without removing it: the control, which must be low for the first figure to mean
    anything). `before` must be the weights the optimizer started from (DeepSpeed's bf16 mode starts
    its fp32 master from the bf16 weights: pass those)."""
    std = math.sqrt(2.0 * diffusion * lr)
    noise = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in before.items()}
    ChunkedNoise(seed).add_([NoisePiece(n, t.numel(), 0, t) for n, t in noise.items()], 1, 1.0)
    within = control = total = 0
    for name, w0 in before.items():
        step = after[name].float() - w0.float() * (1.0 - lr * wd)
        within += int(((step - std * noise[name]).abs() <= lr + TOLERANCE).sum())
        control += int((step.abs() <= lr + TOLERANCE).sum())
        total += w0.numel()
    return within / total, control / total
