"""The EMA window plan: when the window opens, and how much of the final EMA each part of the run
contributes. Checked at startup so a window too short for its decay is refused before any work.

Within a window of N updates the EMA starts as a copy of the weights w_0 at `step_start_ema` and
then e_k = d_k * e_{k-1} + (1 - d_k) * w_k. Unrolled, the final EMA is

    e_N = (prod_{k=1..N} d_k) * w_0 + sum_k (1 - d_k) * prod_{j>k} d_j * w_k

so the pre-window weights keep the share prod d_k (= d^N for a constant decay): 0.9999^50000 is
0.67%, while 0.9999^1000 is 90.5%: the "EMA" would be mostly the weights of the window's start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sd_train.config import EMAArgs
from sd_train.ema.posthoc_math import sigma_rel_to_gamma
from sd_train.errors import ConfigError


def warmup_decay(decay: float, k: int, inv_gamma: float, power: float) -> float:
    """Decay of the k-th update (k >= 1) with diffusers-style warmup: 1 - (1 + k/inv_gamma)^-power,
    capped at `decay` and floored at 0."""
    value = 1.0 - (1.0 + k / inv_gamma) ** -power
    return max(0.0, min(decay, value))


def min_window(decay: float, tolerance: float) -> int:
    """Smallest N with decay^N <= tolerance (constant decay)."""
    if decay <= 0.0:
        return 1
    return max(1, math.ceil(math.log(tolerance) / math.log(decay) - 1e-12))


def min_window_warmup(args: EMAArgs, limit: int) -> int | None:
    """Smallest N whose product of warmup decays is <= tolerance, searching up to `limit`."""
    log_tol = math.log(args.tolerance)
    acc = 0.0
    for k in range(1, limit + 1):
        d = warmup_decay(args.decay, k, args.inv_gamma, args.power)
        if d <= 0.0:
            return k
        acc += math.log(d)
        if acc <= log_tol:
            return k
    return None


@dataclass
class EMAPlan:
    """What the EMA will do in this run, in numbers. `check()` refuses a bad plan."""

    enabled: bool
    decay: float
    max_steps: int
    step_start_ema: int
    update_every: int
    tolerance: float
    warmup: bool
    inv_gamma: float
    power: float

    @property
    def window_steps(self) -> int:
        return self.max_steps - self.step_start_ema

    @property
    def num_updates(self) -> int:
        """Updates in the window: one after each `update_every`-th step after the opening step."""
        return max(0, self.window_steps // self.update_every)

    def decays(self) -> list[float]:
        """Real per-update decays d_1..d_N (only materialised when warmup makes them differ)."""
        return [self.decay_at(k) for k in range(1, self.num_updates + 1)]

    def decay_at(self, k: int) -> float:
        if self.warmup:
            return warmup_decay(self.decay, k, self.inv_gamma, self.power)
        return self.decay

    def pre_window_share(self) -> float:
        """Share of the final EMA held by the weights at the window's start (and thus by
        everything before it)."""
        n = self.num_updates
        if not self.warmup:
            return self.decay**n
        return math.exp(sum(math.log(d) if d > 0 else -math.inf for d in self.decays())) if n else 1.0

    def tail_share(self, fraction: float = 0.1) -> float:
        """Share of the final EMA from the last `fraction` of the window's updates."""
        n = self.num_updates
        m = max(1, math.ceil(fraction * n)) if n else 0
        if not self.warmup:
            return 1.0 - self.decay**m
        prod = 1.0
        for k in range(n - m + 1, n + 1):
            prod *= self.decay_at(k)
        return 1.0 - prod

    def horizon(self) -> float:
        """Effective averaging horizon 1/(1 - decay), in updates."""
        return math.inf if self.decay >= 1 else 1.0 / (1.0 - self.decay)

    def half_life(self) -> float:
        """Updates after which a weight's share has halved: ln(0.5)/ln(decay)."""
        if self.decay <= 0:
            return 0.0
        return math.log(0.5) / math.log(self.decay)

    def smallest_safe_window(self) -> int | None:
        """Smallest window (in steps) whose pre-window share is within tolerance."""
        if self.warmup:
            n = min_window_warmup(self._args(), 10 * max(self.max_steps, 1_000_000))
            return None if n is None else n * self.update_every
        return min_window(self.decay, self.tolerance) * self.update_every

    def _args(self) -> EMAArgs:
        return EMAArgs(
            decay=self.decay, tolerance=self.tolerance, warmup=self.warmup, inv_gamma=self.inv_gamma, power=self.power
        )

    def check(self) -> None:
        """Raise ConfigError if the plan is unsafe: the message gives the numbers and the fix."""
        if not self.enabled:
            return
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"ema.decay={self.decay} must be in [0, 1) (e.g. 0.9999)")
        if not 0.0 < self.tolerance < 1.0:
            raise ConfigError(f"ema.tolerance={self.tolerance} must be in (0, 1) (e.g. 0.01)")
        if self.update_every < 1:
            raise ConfigError(f"ema.update_every={self.update_every} must be >= 1")
        safe = self.smallest_safe_window()
        if self.step_start_ema < 0:
            raise ConfigError(
                f"ema window ({self.window_steps} steps) is longer than the run (max_steps={self.max_steps}): "
                f"ema.step_start_ema={self.step_start_ema} must be >= 0. "
                + (
                    f"decay {self.decay} needs {safe} steps; lower ema.decay or raise max_steps"
                    if safe
                    else "Lower ema.decay"
                )
            )
        if self.window_steps <= 0:
            raise ConfigError(
                f"ema window is empty: ema.step_start_ema={self.step_start_ema} >= max_steps={self.max_steps}. "
                f"Lower ema.step_start_ema, or raise max_steps"
            )
        share = self.pre_window_share()
        if share > self.tolerance:
            if safe is None or safe > self.max_steps:
                fix = (
                    f"decay {self.decay} needs a window of {safe or 'more than 10x max_steps'} steps, "
                    "longer than the run "
                    f"(max_steps={self.max_steps}): lower ema.decay or raise max_steps"
                )
            else:
                fix = (
                    f"smallest safe window is {safe} steps: set ema.step_start_ema <= {self.max_steps - safe}, "
                    "or lower ema.decay"
                )
            raise ConfigError(
                f"ema: {share:.1%} of the final EMA would come from pre-window weights (decay {self.decay}, "
                f"window {self.window_steps} steps), over ema.tolerance={self.tolerance:.2%}; {fix}"
            )

    def figures(self) -> dict[str, float | int | bool]:
        """The plan's numbers, for the startup print and the metrics backends."""
        return {
            "ema/enabled": self.enabled,
            "ema/decay": self.decay,
            "ema/step_start_ema": self.step_start_ema,
            "ema/window_steps": self.window_steps,
            "ema/window_share_of_run": self.window_steps / self.max_steps,
            "ema/pre_window_share": self.pre_window_share(),
            "ema/horizon_steps": self.horizon() * self.update_every,
            "ema/half_life_steps": self.half_life() * self.update_every,
            "ema/last_10pct_share": self.tail_share(0.1),
            "ema/tolerance": self.tolerance,
        }

    def describe(self) -> str:
        if not self.enabled:
            return "EMA plan: disabled (ema.enabled=false)"
        f = self.figures()
        return "\n".join(
            [
                "EMA plan:",
                f"  decay                 {self.decay}" + (" (with warmup)" if self.warmup else ""),
                f"  window                steps {self.step_start_ema}..{self.max_steps}: N = {self.window_steps} "
                f"({f['ema/window_share_of_run']:.1%} of the run), {self.num_updates} updates",
                f"  pre-window share      {f['ema/pre_window_share']:.2%} (tolerance {self.tolerance:.2%})",
                f"  effective horizon     {f['ema/horizon_steps']:.0f} steps (1/(1-decay))",
                f"  half-life             {f['ema/half_life_steps']:.0f} steps",
                f"  last 10% of window    {f['ema/last_10pct_share']:.1%} of the EMA",
                f"  EMA memory            0 bytes until step {self.step_start_ema}, then one copy of each rank's shard",
            ]
        )


def resolve_step_start(args: EMAArgs, max_steps: int) -> int:
    """The opening step from whichever of the three ways the config gives it."""
    if args.step_start_ema is not None:
        return args.step_start_ema
    if args.window_from_tolerance:
        if not 0.0 <= args.decay < 1.0 or not 0.0 < args.tolerance < 1.0:
            return 0  # check() reports the bad decay/tolerance with its own message
        if args.warmup:
            n = min_window_warmup(args, 10 * max(max_steps, 1_000_000))
            n = max_steps if n is None else n
        else:
            n = min_window(args.decay, args.tolerance)
        return max_steps - n * args.update_every
    return max_steps - max(1, round(args.window_fraction * max_steps))


def plan_from_config(args: EMAArgs, max_steps: int) -> EMAPlan:
    if (
        args.enabled
        and not args.window_from_tolerance
        and args.step_start_ema is None
        and not 0 < args.window_fraction <= 1
    ):
        raise ConfigError(f"ema.window_fraction={args.window_fraction} must be in (0, 1]")
    return EMAPlan(
        enabled=args.enabled,
        decay=args.decay,
        max_steps=max_steps,
        step_start_ema=resolve_step_start(args, max_steps),
        update_every=args.update_every,
        tolerance=args.tolerance,
        warmup=args.warmup,
        inv_gamma=args.inv_gamma,
        power=args.power,
    )


@dataclass
class PosthocPlan:
    """The post-hoc EMA profiles of this run: when they start, which steps are snapshotted, and
    what that costs on disk. `check()` refuses a start outside the run."""

    sigma_rels: list[float]
    step_start: int
    snapshot_every: int
    max_steps: int
    dtype: str

    @property
    def enabled(self) -> bool:
        return bool(self.sigma_rels)

    @property
    def gammas(self) -> list[float]:
        return [sigma_rel_to_gamma(s) for s in self.sigma_rels]

    def is_snapshot_step(self, step: int) -> bool:
        return step >= self.step_start and (step % self.snapshot_every == 0 or step == self.max_steps)

    def snapshot_steps(self) -> list[int]:
        steps = [s for s in range(self.step_start, self.max_steps + 1) if s % self.snapshot_every == 0]
        return steps if steps and steps[-1] == self.max_steps else [*steps, self.max_steps]

    def bytes_per_snapshot(self, num_params: int, world_size: int) -> int:
        """K profiles x P parameters x dtype bytes / W: what one rank writes per snapshot. Also where
        the profiles are replicated (DDP, ZeRO-2): DCP writes one copy of a replicated tensor and
        spreads those writes over the ranks."""
        return len(self.sigma_rels) * num_params * SNAPSHOT_BYTES[self.dtype] // world_size

    def check(self) -> None:
        if not self.enabled:
            return
        if not 0 <= self.step_start < self.max_steps:
            raise ConfigError(
                f"ema.posthoc.step_start={self.step_start} must be in [0, max_steps={self.max_steps}): the profiles "
                "need at least one step before the last. Lower ema.posthoc.step_start (or ema.step_start_ema)"
            )

    def figures(self, num_params: int, world_size: int, live_numel: int | None = None) -> dict[str, float | int | list]:
        """The plan's figures; with `live_numel` (the parameter elements this rank's layout holds:
        P / W when sharded, P when replicated) also the fp32 bytes of the live profiles per rank."""
        per_rank = self.bytes_per_snapshot(num_params, world_size)
        n = len(self.snapshot_steps())
        live = {} if live_numel is None else {"ema/posthoc/live_bytes_per_rank": len(self.sigma_rels) * live_numel * 4}
        return {
            **live,
            "ema/posthoc/sigma_rels": list(self.sigma_rels),
            "ema/posthoc/gammas": self.gammas,
            "ema/posthoc/step_start": self.step_start,
            "ema/posthoc/snapshots": n,
            "ema/posthoc/bytes_per_snapshot_per_rank": per_rank,
            "ema/posthoc/bytes_on_disk": per_rank * world_size * n,
        }

    def describe(self, num_params: int, world_size: int, live_numel: int | None = None) -> str:
        f = self.figures(num_params, world_size, live_numel)
        live = f.get("ema/posthoc/live_bytes_per_rank")
        profiles = ", ".join(f"sigma_rel {s} (gamma {g:.2f})" for s, g in zip(self.sigma_rels, self.gammas))
        return "\n".join(
            [
                "Post-hoc EMA plan:",
                f"  profiles              {profiles}",
                f"  start                 step {self.step_start} (t = 1 there)",
                f"  snapshots             {f['ema/posthoc/snapshots']} in {self.dtype} "
                f"(every {self.snapshot_every} steps and the last)",
                f"  bytes per snapshot    {f['ema/posthoc/bytes_per_snapshot_per_rank'] / 2**20:.1f} MiB per rank "
                f"({len(self.sigma_rels)} x {num_params} params / {world_size} ranks); "
                f"{f['ema/posthoc/bytes_on_disk'] / 2**20:.1f} MiB on disk in all",
                *(
                    []
                    if live is None
                    else [
                        f"  live profiles         {live / 2**20:.1f} MiB fp32 per rank ({len(self.sigma_rels)} x "
                        f"{live_numel} elements held by this rank: a shard, or the whole UNet where replicated)"
                    ]
                ),
            ]
        )


SNAPSHOT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


def posthoc_plan_from_config(args: EMAArgs, max_steps: int) -> PosthocPlan:
    ph = args.posthoc
    start = ph.step_start if ph.step_start is not None else resolve_step_start(args, max_steps)
    return PosthocPlan(list(ph.sigma_rels), start, ph.snapshot_every, max_steps, ph.dtype)
