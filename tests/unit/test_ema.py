"""ShardedEMA on one rank, no process group: the window opens late and allocates nothing before,
updates equal an independent lerp bitwise, the swapped-in forward equals a plain module holding the
EMA, and swapping back restores the weights bitwise."""

from __future__ import annotations

import copy

import torch

from sd_train.config import EMAArgs
from sd_train.ema.plan import plan_from_config
from sd_train.ema.sharded import ShardedEMA
from sd_train.parallel.fsdp import DTensorLayout

DECAY, START, STEPS = 0.75, 3, 8


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))


def train(model: torch.nn.Module, ema: ShardedEMA) -> dict[str, torch.Tensor]:
    """SGD steps with the EMA updated after each; returns an EMA kept independently of ShardedEMA."""
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
        elif step > START:
            reference = {n: torch.lerp(reference[n], weights[n], 1 - DECAY) for n in weights}
    return reference


def test_late_window_updates_and_swapped_forward():
    model = build()
    ema = ShardedEMA(
        model, plan_from_config(EMAArgs(decay=DECAY, step_start_ema=START, tolerance=0.5), STEPS), DTensorLayout(model)
    )
    reference = train(model, ema)
    assert ema.num_updates == STEPS - START
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
    closed.load_meta_state_dict({"open": False, "num_updates": 0, "step_start_ema": START})
    assert not closed.is_open and closed.tensor_state_dict() == {}
