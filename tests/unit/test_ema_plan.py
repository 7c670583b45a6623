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


@pytest.mark.parametrize("warmup", [False, True])
def test_shares_match_explicit_sum(warmup):
    plan = plan_from_config(EMAArgs(decay=0.99, step_start_ema=800, tolerance=0.5, warmup=warmup), 1000)
    weights = explicit_weights(plan.decays())
    assert math.isclose(sum(weights), 1.0, rel_tol=1e-12)
    assert math.isclose(plan.pre_window_share(), weights[0], rel_tol=1e-9)
    m = math.ceil(0.1 * plan.num_updates)
    assert math.isclose(plan.tail_share(0.1), sum(weights[-m:]), rel_tol=1e-9)


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
