"""The EMA window math, checked against an explicit sum of per-step weights."""

import math

import pytest
import torch

from sd_train.config import ConfigError, EMAArgs
from sd_train.ema.plan import min_window, plan_from_config


def explicit_weights(decays: list[float]) -> list[float]:
    """Weight of w_0 (the window's start) and of each w_k in the final EMA, by running the
    recursion on one-hot 'weights' (float64): no closed form involved."""
    n = len(decays)
    e = torch.zeros(n + 1, dtype=torch.float64)
    e[0] = 1.0  # e_0 = w_0
    for k, d in enumerate(decays, start=1):
        w = torch.zeros(n + 1, dtype=torch.float64)
        w[k] = 1.0
        e = d * e + (1 - d) * w
    return e.tolist()


def reference_decays(args: EMAArgs, num_updates: int) -> list[float]:
    """The decay of each real update, written from the config alone (diffusers' warmup formula)."""
    if not args.warmup:
        return [args.decay] * num_updates
    return [max(0.0, min(args.decay, 1 - (1 + k / args.inv_gamma) ** -args.power)) for k in range(1, num_updates + 1)]


@pytest.mark.parametrize("update_every", [1, 3, 10])
@pytest.mark.parametrize("warmup", [False, True])
def test_shares_match_explicit_sum(warmup, update_every):
    args = EMAArgs(decay=0.99, step_start_ema=800, tolerance=0.5, warmup=warmup, update_every=update_every)
    plan = plan_from_config(args, 1000)
    # N from the config, not from the plan: one update every `update_every` steps after the opening step.
    n = (1000 - 800) // update_every
    assert plan.num_updates == n
    weights = explicit_weights(reference_decays(args, n))
    assert math.isclose(sum(weights), 1.0, rel_tol=1e-12)
    assert math.isclose(plan.pre_window_share(), weights[0], rel_tol=1e-9)
    m = math.ceil(0.1 * n)
    assert math.isclose(plan.tail_share(0.1), sum(weights[-m:]), rel_tol=1e-9)


def test_update_every_counts_updates_not_steps():
    """decay 0.99 over a 1000-step window updated every 10 steps is 100 updates: the window's start
    keeps 0.99^100 = 36.6% of the EMA (0.99^1000 = 0.004% would be the share of 1000 updates)."""
    args = EMAArgs(decay=0.99, step_start_ema=9_000, update_every=10, tolerance=0.01)
    plan = plan_from_config(args, 10_000)
    assert f"{plan.pre_window_share():.1%}" == "36.6%"
    assert plan.figures()["ema/horizon_steps"] == pytest.approx(1000) and "100 updates" in plan.describe()
    # The smallest safe window: the fewest updates n with 0.99^n <= 1%, counted by hand, times 10 steps.
    n = next(n for n in range(1, 10_000) if 0.99**n <= 0.01)
    with pytest.raises(ConfigError, match=r"36\.6% of the final EMA would come from pre-window weights") as e:
        plan.check()
    assert f"set ema.step_start_ema <= {10_000 - 10 * n}" in str(e.value)
    # The same window updated every step is safe.
    plan_from_config(EMAArgs(decay=0.99, step_start_ema=9_000, tolerance=0.01), 10_000).check()
    # A window of exactly the safe length passes with update_every=10; one step less refuses.
    plan_from_config(EMAArgs(decay=0.99, step_start_ema=10_000 - 10 * n, update_every=10), 10_000).check()
    with pytest.raises(ConfigError):
        plan_from_config(EMAArgs(decay=0.99, step_start_ema=10_000 - 10 * n + 10, update_every=10), 10_000).check()


def test_mosaic_numbers():
    ok = plan_from_config(EMAArgs(decay=0.9999, step_start_ema=1_350_000), 1_400_000)
    assert ok.window_steps == 50_000
    assert f"{ok.pre_window_share():.2%}" == "0.67%"
    ok.check()
    assert "0.67%" in ok.describe()
    assert round(ok.horizon()) == 10_000 and round(ok.half_life()) == 6931


def test_short_window_refused_with_numbers():
    plan = plan_from_config(EMAArgs(decay=0.9999, step_start_ema=49_000), 50_000)
    with pytest.raises(ConfigError, match=r"90\.5% of the final EMA would come from pre-window weights") as e:
        plan.check()
    assert "46050" in str(e.value)  # the smallest safe window


def test_tolerance_mode_gives_smallest_window():
    n = min_window(0.9999, 0.01)
    assert 0.9999**n <= 0.01 < 0.9999 ** (n - 1)
    plan = plan_from_config(EMAArgs(decay=0.9999, window_from_tolerance=True), 1_000_000)
    assert plan.window_steps == n
    plan.check()


def test_default_fraction_window():
    plan = plan_from_config(EMAArgs(decay=0.9, window_fraction=0.035), 10_000)
    assert plan.window_steps == 350 and plan.step_start_ema == 9650


@pytest.mark.parametrize(
    "args,max_steps,match",
    [
        (EMAArgs(decay=1.0), 1000, r"ema.decay=1.0 must be in \[0, 1\)"),
        (EMAArgs(decay=-0.1), 1000, r"ema.decay=-0.1"),
        (EMAArgs(decay=0.99, step_start_ema=1000), 1000, "window is empty"),
        (EMAArgs(decay=0.9999, window_from_tolerance=True), 1000, "longer than the run"),
    ],
)
def test_bad_plans(args, max_steps, match):
    with pytest.raises(ConfigError, match=match):
        plan_from_config(args, max_steps).check()


def test_warmup_uses_real_decays():
    args = EMAArgs(decay=0.9999, step_start_ema=0, warmup=True, tolerance=0.5)
    plan = plan_from_config(args, 100)
    # The warmup decays are far below 0.9999 early on, so the pre-window share is much smaller.
    assert plan.pre_window_share() < 0.9999**100 / 10
    assert plan.decays()[0] == pytest.approx(1 - 2 ** (-2 / 3))
