"""The EMA window math, checked against an explicit sum of per-step weights."""

import math

import pytest
import torch

from sd_train.config import ConfigError, EMAArgs, PosthocArgs
from sd_train.ema.plan import min_window, min_window_warmup, plan_from_config, posthoc_plan_from_config


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
    args = EMAArgs(
        decay=0.99,
        step_start_ema=800,
        tolerance=0.5,
        warmup=warmup,
        update_every=update_every,
        inv_gamma=2.0,
        power=0.75,
    )
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


def test_warmup_window_from_tolerance_is_the_first_n_under_it():
    """With warmup the smallest safe window is found by walking the real decays: counted here with
    the formula written out, in updates of 4 steps."""
    args = EMAArgs(
        decay=0.99, warmup=True, window_from_tolerance=True, tolerance=0.02, update_every=4, inv_gamma=0.01, power=0.75
    )
    decays = reference_decays(args, 100_000)
    product, n = 1.0, 0
    while product > 0.02:
        product *= decays[n]
        n += 1
    assert min_window_warmup(args, 10 * n) == min_window_warmup(args, n) == n and min_window_warmup(args, n - 1) is None
    plan = plan_from_config(args, 1_000_000)
    assert plan.window_steps == 4 * n and plan.smallest_safe_window() == 4 * n
    plan.check()
    # A decay of 0 at the first update (inv_gamma huge: 1 - (1 + k/inv_gamma)^-power rounds to 0)
    # wipes the window's start at once.
    assert min_window_warmup(EMAArgs(decay=0.9, warmup=True, inv_gamma=1e30), 10) == 1


def test_plan_figures_and_description():
    plan = plan_from_config(EMAArgs(decay=0.99, step_start_ema=600, update_every=2, tolerance=0.5), 1000)
    f = plan.figures()
    assert f == {
        "ema/enabled": True,
        "ema/decay": 0.99,
        "ema/step_start_ema": 600,
        "ema/window_steps": 400,
        "ema/window_share_of_run": 0.4,
        "ema/pre_window_share": pytest.approx(0.99**200),
        "ema/horizon_steps": pytest.approx(200.0),
        "ema/half_life_steps": pytest.approx(2 * math.log(0.5) / math.log(0.99)),
        "ema/last_10pct_share": pytest.approx(1 - 0.99**20),
        "ema/tolerance": 0.5,
    }
    text = plan.describe()
    for line in (
        "  decay                 0.99\n",
        "steps 600..1000: N = 400 (40.0% of the run), 200 updates",
        f"pre-window share      {0.99**200:.2%} (tolerance 50.00%)",
        "effective horizon     200 steps (1/(1-decay))",
        f"half-life             {2 * math.log(0.5) / math.log(0.99):.0f} steps",
        f"last 10% of window    {1 - 0.99**20:.1%} of the EMA",
        "0 bytes until step 600",
    ):
        assert line in text, line
    assert "(with warmup)" in plan_from_config(EMAArgs(decay=0.99, step_start_ema=600, warmup=True), 1000).describe()
    assert plan_from_config(EMAArgs(enabled=False), 1000).describe() == "EMA plan: disabled (ema.enabled=false)"
    assert plan_from_config(EMAArgs(decay=0.0), 10).half_life() == 0.0


def test_warmup_tail_share_uses_the_last_decays():
    args = EMAArgs(decay=0.99, step_start_ema=0, warmup=True, tolerance=0.9)
    plan = plan_from_config(args, 50)
    decays = reference_decays(args, 50)
    assert plan.tail_share(0.1) == pytest.approx(1 - math.prod(decays[-5:]), rel=1e-12)
    assert plan.tail_share(0.5) == pytest.approx(1 - math.prod(decays[-25:]), rel=1e-12)


@pytest.mark.parametrize(
    "args,max_steps,match",
    [
        (EMAArgs(decay=0.99, tolerance=0.0), 1000, r"ema.tolerance=0.0 must be in \(0, 1\) \(e.g. 0.01\)"),
        (EMAArgs(decay=0.99, tolerance=1.0), 1000, r"ema.tolerance=1.0 must be in \(0, 1\) \(e.g. 0.01\)"),
        (EMAArgs(decay=0.99, update_every=0), 1000, r"ema.update_every=0 must be >= 1"),
        (
            EMAArgs(decay=0.99, step_start_ema=-5),
            1000,
            r"ema window \(1005 steps\) is longer than the run \(max_steps=1000\): ema.step_start_ema=-5 must be >= 0"
            r"\. decay 0.99 needs 459 steps; lower ema.decay or raise max_steps",
        ),
        (
            EMAArgs(decay=0.99, step_start_ema=1000),
            1000,
            r"ema window is empty: ema.step_start_ema=1000 >= max_steps=1000\. "
            r"Lower ema.step_start_ema, or raise max_steps",
        ),
        (
            EMAArgs(decay=0.999, step_start_ema=900),
            1000,
            r"ema: 90.5% of the final EMA would come from pre-window weights \(decay 0.999, window 100 steps\), over "
            r"ema.tolerance=1.00%; decay 0.999 needs a window of 4603 steps, longer than the run \(max_steps=1000\): "
            r"lower ema.decay or raise max_steps",
        ),
        (EMAArgs(decay=0.99, window_fraction=0.0), 1000, r"ema.window_fraction=0.0 must be in \(0, 1\]"),
        (EMAArgs(decay=0.99, window_fraction=1.5), 1000, r"ema.window_fraction=1.5 must be in \(0, 1\]"),
    ],
)
def test_check_messages_name_the_field_and_the_fix(args, max_steps, match):
    with pytest.raises(ConfigError, match=f"^{match}$"):
        plan_from_config(args, max_steps).check()


def test_window_sources_and_their_edges():
    # window_fraction 1: the window is the whole run; an explicit step wins over both other ways.
    assert plan_from_config(EMAArgs(decay=0.9, window_fraction=1.0), 100).step_start_ema == 0
    assert plan_from_config(EMAArgs(step_start_ema=7, window_from_tolerance=True), 100).step_start_ema == 7
    # A bad decay or tolerance with window_from_tolerance starts at 0 and leaves the message to check().
    for bad in (EMAArgs(decay=1.0, window_from_tolerance=True), EMAArgs(tolerance=0.0, window_from_tolerance=True)):
        assert plan_from_config(bad, 100).step_start_ema == 0
    assert plan_from_config(EMAArgs(tolerance=1.0, window_from_tolerance=True), 100).step_start_ema == 0
    assert plan_from_config(EMAArgs(decay=0.0, window_from_tolerance=True), 100).step_start_ema == 99
    assert min_window(0.0, 0.01) == 1 and min_window(0.5, 0.25) == 2
    plan_from_config(EMAArgs(enabled=False, decay=5.0), 10).check()  # disabled: nothing to refuse


def test_posthoc_plan_snapshots_figures_and_description():
    args = EMAArgs(decay=0.99, step_start_ema=4, posthoc=PosthocArgs([0.05, 0.1], snapshot_every=4, dtype="fp16"))
    plan = posthoc_plan_from_config(args, 14)
    assert plan.snapshot_steps() == [4, 8, 12, 14]
    assert [s for s in range(20) if plan.is_snapshot_step(s)] == [4, 8, 12, 14, 16]
    assert posthoc_plan_from_config(args, 12).snapshot_steps() == [4, 8, 12]
    assert plan.bytes_per_snapshot(num_params=1000, world_size=4) == 2 * 1000 * 2 // 4
    f = plan.figures(num_params=1000, world_size=4, live_numel=250)
    assert f == {
        "ema/posthoc/live_bytes_per_rank": 2 * 250 * 4,
        "ema/posthoc/sigma_rels": [0.05, 0.1],
        "ema/posthoc/gammas": [pytest.approx(16.97, abs=0.005), pytest.approx(6.94, abs=0.005)],
        "ema/posthoc/step_start": 4,
        "ema/posthoc/snapshots": 4,
        "ema/posthoc/bytes_per_snapshot_per_rank": 1000,
        "ema/posthoc/bytes_on_disk": 1000 * 4 * 4,
    }
    assert "ema/posthoc/live_bytes_per_rank" not in plan.figures(num_params=1000, world_size=4)
    mib = 2**20
    big = posthoc_plan_from_config(args, 14)
    text = big.describe(num_params=mib, world_size=2, live_numel=mib // 2)
    for line in (
        "Post-hoc EMA plan:\n",
        "  profiles              sigma_rel 0.05 (gamma 16.97), sigma_rel 0.1 (gamma 6.94)\n",
        "  start                 step 4 (t = 1 there)\n",
        "  snapshots             4 in fp16 (every 4 steps and the last)\n",
        f"  bytes per snapshot    2.0 MiB per rank (2 x {mib} params / 2 ranks); 16.0 MiB on disk in all\n",
        f"  live profiles         4.0 MiB fp32 per rank (2 x {mib // 2} elements held by this rank",
    ):
        assert line in text + "\n", line
    assert "live profiles" not in big.describe(num_params=mib, world_size=2)
    assert posthoc_plan_from_config(EMAArgs(posthoc=PosthocArgs([0.1], step_start=3)), 10).step_start == 3


@pytest.mark.parametrize("start", [-1, 10])
def test_posthoc_start_outside_the_run_is_refused(start):
    plan = posthoc_plan_from_config(EMAArgs(posthoc=PosthocArgs([0.1], step_start=start)), 10)
    with pytest.raises(ConfigError) as e:
        plan.check()
    assert str(e.value) == (
        f"ema.posthoc.step_start={start} must be in [0, max_steps=10): the profiles need at least one step "
        "before the last. Lower ema.posthoc.step_start (or ema.step_start_ema)"
    )
    posthoc_plan_from_config(EMAArgs(posthoc=PosthocArgs([0.1], step_start=9)), 10).check()
    posthoc_plan_from_config(EMAArgs(posthoc=PosthocArgs([], step_start=start)), 10).check()  # no profiles


def test_shares_of_an_empty_or_wiped_window():
    # Fewer window steps than update_every: no update, the window's start is the whole EMA.
    for warmup in (False, True):
        plan = plan_from_config(EMAArgs(decay=0.9, step_start_ema=95, update_every=10, warmup=warmup), 100)
        assert plan.num_updates == 0 and plan.pre_window_share() == 1.0 and plan.tail_share(0.1) == 0.0
    # A first warmup decay of 0 (inv_gamma huge) replaces the start at once: its share is 0.
    wiped = plan_from_config(EMAArgs(decay=0.9, step_start_ema=90, warmup=True, inv_gamma=1e30), 100)
    assert wiped.decays()[0] == 0.0 and wiped.pre_window_share() == 0.0


def test_plan_edges():
    """The boundaries of each rule, on both sides."""
    # decay 0 and a 1-step window are legal (the EMA is then the last weights).
    plan_from_config(EMAArgs(decay=0.0, step_start_ema=99), 100).check()
    plan_from_config(EMAArgs(decay=0.5, step_start_ema=0, tolerance=0.5), 100).check()
    assert plan_from_config(EMAArgs(decay=1.0, step_start_ema=0), 100).horizon() == math.inf
    assert min_window(0.5, 0.9) == 1
    assert plan_from_config(EMAArgs(window_fraction=0.001), 100).step_start_ema == 99  # at least one step
    # A tail of 1% of 50 updates is one update.
    assert plan_from_config(EMAArgs(decay=0.9, step_start_ema=50), 100).tail_share(0.01) == pytest.approx(0.1)
    # The smallest safe window exactly the run: the fix is to start at 0, not "longer than the run".
    with pytest.raises(ConfigError) as e:
        plan_from_config(EMAArgs(decay=0.5, step_start_ema=1, tolerance=0.25), 2).check()
    assert str(e.value).endswith("smallest safe window is 2 steps: set ema.step_start_ema <= 0, or lower ema.decay")
    text = plan_from_config(EMAArgs(decay=0.99, step_start_ema=600, warmup=True, tolerance=0.5), 1000).describe()
    assert text.startswith("EMA plan:\n  decay                 0.99 (with warmup)\n")


def test_posthoc_plan_edges():
    args = EMAArgs(decay=0.99, step_start_ema=4, posthoc=PosthocArgs([0.05, 0.1], snapshot_every=4))
    assert posthoc_plan_from_config(args, 13).snapshot_steps() == [4, 8, 12, 13]
    assert posthoc_plan_from_config(args, 15).snapshot_steps() == [4, 8, 12, 15]
    assert posthoc_plan_from_config(args, 15).bytes_per_snapshot(num_params=1000, world_size=3) == 2 * 1000 * 4 // 3
    # Without a posthoc start, the profiles start where the EMA window does (here from window_fraction).
    assert posthoc_plan_from_config(EMAArgs(posthoc=PosthocArgs([0.1])), 1000).step_start == 965
    posthoc_plan_from_config(EMAArgs(posthoc=PosthocArgs([0.1], step_start=0)), 10).check()
