"""The math of post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", EDM2), in numpy: no torch, so the startup plan and the unit tests need neither.

A power-function EMA profile with exponent gamma starts as a copy of the weights w_0 at its start
step and then, at the t-th step counted from that start (t = 1 at the start itself), does

    e_t = beta_t * e_{t-1} + (1 - beta_t) * w_{t-1},    beta_t = (1 - 1/t)^(gamma + 1)

(beta_1 = 0 is the copy). The product of the betas telescopes, so after n steps past the start the
profile is exactly, with no continuous approximation,

    e = sum_{k=0..n} c_k w_k,    c_k = ((k + 1)^(gamma + 1) - k^(gamma + 1)) / (n + 1)^(gamma + 1)

EDM2 solves the reconstruction with inner products of the continuous power functions; our windows
can be a few dozen steps, where that approximation is off by O(1/n). We use the exact discrete
weights above instead: the snapshots' weight vectors over w_0..w_n are the rows of a matrix A, a
target (a power profile of another gamma, or a classic EMA started at the same step) is a vector b,
and the least-squares coefficients x minimise |A^T x - b|. Its relative residual is the target's
fit error: how much of the target's weighting the snapshots cannot express.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sd_train.config.schema import MAX_SIGMA_REL  # no power profile is wider (a uniform average)


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of a power profile (EDM2 eq. 123): the width of the averaging
    window as a share of the training time so far."""
    g = float(gamma)
    return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of a power profile with this sigma_rel: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0 (eq. 123 solved for gamma)."""
    s = float(sigma_rel)
    if not 0.0 < s < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel={s} must be in (0, {MAX_SIGMA_REL:.4f})")
    inv = s**-2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9 * max(1.0, abs(r.real))))


def power_beta(gamma: float, t: int) -> float:
    """beta_t of the t-th step counted from the profile's start (t = 1 is the start: beta 0)."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def power_weights(gamma: float, n: int, length: int | None = None) -> np.ndarray:
    """Weights c_0..c_n of a power profile n steps after its start, over w_0..w_n (sum 1),
    zero-padded to `length`."""
    k = np.arange(n + 1, dtype=np.float64)
    c = ((k + 1) / (n + 1)) ** (gamma + 1) - (k / (n + 1)) ** (gamma + 1)
    return _pad(c, length)


def classic_weights(decay: float, n: int, length: int | None = None) -> np.ndarray:
    """Weights of a classic EMA that starts as a copy of w_0 and then updates every step with a
    constant decay (what ShardedEMA does with update_every=1 and no warmup): w_0 keeps decay^n,
    w_k (k >= 1) gets (1 - decay) decay^(n - k)."""
    k = np.arange(n + 1, dtype=np.float64)
    c = (1.0 - decay) * decay ** (n - k)
    c[0] = decay**n
    return _pad(c, length)


def _pad(c: np.ndarray, length: int | None) -> np.ndarray:
    if length is None or length == c.size:
        return c
    out = np.zeros(length, dtype=np.float64)
    out[: c.size] = c
    return out


@dataclass
class Fit:
    """Coefficients of one target over the snapshot profiles, and how well they express it."""

    coefficients: np.ndarray
    fit_error: float  # |A^T x - b| / |b|
    max_abs_coefficient: float


def solve(basis: list[tuple[int, float]], target: np.ndarray) -> Fit:
    """Least-squares coefficients of `target` (weights over w_0..w_n) over the snapshot profiles
    `basis`, each (steps after the start, gamma). The coefficients are scaled to sum to 1 (as EDM2
    does), so the reconstruction's weights still sum to 1; the fit error is measured after that."""
    length = target.size
    a = np.stack([power_weights(g, n, length) for n, g in basis])
    # rcond drops directions the snapshots barely span; following them would take huge coefficients
    # of opposite sign, which amplify the snapshots' rounding (fp16/bf16 storage) into the result.
    x, *_ = np.linalg.lstsq(a.T, target, rcond=1e-10)
    x = x / x.sum()
    err = float(np.linalg.norm(a.T @ x - target) / np.linalg.norm(target))
    return Fit(x, err, float(np.abs(x).max()))
