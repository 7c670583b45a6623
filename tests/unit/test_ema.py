"""ShardedEMA on one rank, no process group: the window opens late and allocates nothing before,
updates equal an independent lerp bitwise, the swapped-in forward equals a plain module holding the
EMA, and swapping back restores the weights bitwise."""

from __future__ import annotations

import copy

import pytest
import torch

from sd_train.config import EMAArgs
from sd_train.ema.plan import plan_from_config
from sd_train.ema.sharded import ShardedEMA
from sd_train.parallel.fsdp import DTensorLayout

DECAY, START, STEPS = 0.75, 3, 8


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))


def train(model: torch.nn.Module, ema: ShardedEMA, every: int = 1) -> dict[str, torch.Tensor]:
    """SGD steps with the EMA updated after each; returns an EMA kept independently of ShardedEMA,
    which lerps every `every`-th step after the opening step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    reference: dict[str, torch.Tensor] = {}
    for step in range(1, STEPS + 1):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(step))
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update(step)
        if step < START:
            assert not ema.is_open and ema.local_bytes() == 0, "nothing is allocated before the window"
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        if step == START:
            reference = weights
        elif step > START and (step - START) % every == 0:
            reference = {n: torch.lerp(reference[n], weights[n], 1 - DECAY) for n in weights}
    return reference


@pytest.mark.parametrize("every", [1, 2])
def test_late_window_updates_and_swapped_forward(every):
    model = build()
    args = EMAArgs(decay=DECAY, step_start_ema=START, tolerance=0.5, update_every=every)
    ema = ShardedEMA(model, plan_from_config(args, STEPS), DTensorLayout(model))
    reference = train(model, ema, every)
    assert ema.num_updates == (STEPS - START) // every
    shadow = ema.full_tensors()
    assert all(torch.equal(shadow[n], reference[n]) for n in reference)
    assert ema.local_bytes() == sum(t.numel() * 4 for t in reference.values())

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(99))
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain = copy.deepcopy(model)
    plain.load_state_dict(reference)
    with torch.no_grad(), ema.swapped_in() as swapped:
        assert swapped
        assert torch.equal(model(x), plain(x)), "the swapped-in forward is the EMA's"
    assert all(torch.equal(p, raw[n]) for n, p in model.named_parameters()), "swap-out restores the weights"
    assert not torch.equal(plain(x), model(x)), "raw and EMA differ, or the check above shows nothing"


def test_state_round_trip_and_closed_window():
    model = build()
    plan = plan_from_config(EMAArgs(decay=DECAY, step_start_ema=START, tolerance=0.5), STEPS)
    ema = ShardedEMA(model, plan, DTensorLayout(model))
    with ema.swapped_in() as swapped:
        assert not swapped, "before the window there is nothing to swap in"
    train(model, ema)
    other_model = build()
    other = ShardedEMA(other_model, plan, DTensorLayout(other_model))
    other.load_meta_state_dict(ema.meta_state_dict())
    other.load_local_state_dict(ema.local_state_dict())
    assert other.num_updates == ema.num_updates
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))
    closed_model = build()
    closed = ShardedEMA(closed_model, plan, DTensorLayout(closed_model))
    assert closed.meta_state_dict() == {"open": False, "num_updates": 0, "step_start_ema": START}
    closed.load_meta_state_dict(ema.meta_state_dict())
    assert closed.num_updates == STEPS - START and all(torch.equal(t, torch.zeros_like(t)) for t in closed.shadow)
    closed.load_meta_state_dict({"open": False, "num_updates": 0, "step_start_ema": START})
    assert not closed.is_open and closed.num_updates == 0 and closed.tensor_state_dict() == {}


@pytest.mark.parametrize("warmup", [False, True])
def test_the_plan_reports_the_share_the_ema_really_keeps(warmup):
    """With `update_every` > 1 the share of the window's start that the startup check reports is the
    share ShardedEMA really leaves: the weight is 1 when the window opens and 0 after it, so the EMA
    ends at exactly that share."""
    start, steps, every = 103, 400, 10  # 103: (step - start) and (step + start) differ mod 10
    args = EMAArgs(decay=0.99, step_start_ema=start, update_every=every, tolerance=0.9, warmup=warmup)
    plan = plan_from_config(args, steps)
    model = torch.nn.Linear(1, 1, bias=False)
    ema = ShardedEMA(model, plan, DTensorLayout(model))
    for step in range(1, steps + 1):
        with torch.no_grad():
            model.weight.fill_(1.0 if step <= start else 0.0)
        ema.update(step)
    assert ema.num_updates == plan.num_updates == (steps - start) // every
    kept = ema.full_tensors()["weight"].item()
    assert kept == pytest.approx(plan.pre_window_share(), rel=1e-5)
    if not warmup:
        assert kept == pytest.approx(0.99**29, rel=1e-5)


def test_the_shadow_of_bf16_weights_is_fp32():
    """1 - decay = 1e-4 is below bf16's resolution: the shadow is fp32 whatever the weights are, as
    a copy of them when the window opens and as zeros awaiting a load."""
    model = build().to(torch.bfloat16)
    plan = plan_from_config(EMAArgs(decay=DECAY, step_start_ema=1, tolerance=0.5), STEPS)
    ema = ShardedEMA(model, plan, DTensorLayout(model))
    ema.update(1)
    assert all(s.dtype == torch.float32 and torch.equal(s, p.float()) for s, p in zip(ema.shadow, model.parameters()))
    loaded = ShardedEMA(model, plan, DTensorLayout(model))
    loaded.load_meta_state_dict(ema.meta_state_dict())
    assert all(s.dtype == torch.float32 and not s.any() for s in loaded.shadow)
