"""The non-finite skip inside fused AdamW (FSDPStrategy.step with `found_inf`), in one process on
a 1-rank gloo group with FSDP2 DTensor parameters: finite steps bitwise those of the host-decided
path, an injected NaN gradient leaves parameters and optimizer state untouched, and each step still
reads the host once."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor

from sd_train.config import DistArgs, OptimArgs
from sd_train.host_sync import COUNTER
from sd_train.optim import build_optimizer
from sd_train.parallel.fsdp import FSDPStrategy, skips_on_device


def _run(info, on_device: bool, nan_at: int, steps: int = 4) -> tuple[list, list[bool], list, list]:
    """Train a small module `steps` steps, the gradient of step `nan_at` made NaN; returns the
    parameters and optimizer state after each step and whether each step was taken."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    strategy = FSDPStrategy(DistArgs(strategy="fsdp2"), info, 1.0, lambda m: [m[0]])
    strategy.wrap(module, lambda m: build_optimizer(m, OptimArgs(lr=0.1, weight_decay=0.01), fused=True))
    assert strategy.skip_on_device and isinstance(next(strategy.model.parameters()), DTensor)
    strategy.skip_on_device = on_device
    params, states, taken, syncs = [], [], [], []
    for i in range(steps):
        strategy.optimizer.zero_grad(set_to_none=True)
        loss = strategy.model(torch.randn(4, 6)).square().mean()
        strategy.backward(loss * float("nan") if i == nan_at else loss, True)
        before = COUNTER.count
        finite, _, _ = strategy.step()
        syncs.append(COUNTER.count - before)
        taken.append(finite)
        params.append([p.detach().to_local().clone() for p in strategy.model.parameters()])
        states.append(
            [
                {k: v.to_local().clone() if isinstance(v, DTensor) else v.clone() for k, v in s.items()}
                for s in strategy.optimizer.state.values()
            ]
        )
    return params, taken, states, syncs


def _equal(a: list, b: list) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _states_equal(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


@pytest.mark.parametrize("nan_at", [0, 2])
def test_nan_step_skipped_in_the_kernel_like_the_host_decided_skip(info, nan_at: int) -> None:
    params, taken, states, syncs = _run(info, on_device=True, nan_at=nan_at)
    ref_params, ref_taken, ref_states, _ = _run(info, on_device=False, nan_at=nan_at)
    assert taken == ref_taken == [i != nan_at for i in range(4)]
    assert syncs == [1, 1, 1, 1]  # the read that tells the loop whether the step counted
    for i in range(4):  # bitwise the host-decided path, step by step
        assert _equal(params[i], ref_params[i])
        if ref_states[i]:
            assert _states_equal(states[i], ref_states[i])
        else:  # a NaN first step: the kernel ran, so the state exists, at step 0 with zero moments
            assert all(not t.any() for s in states[i] for t in s.values())
    if nan_at > 0:  # the skipped step left parameters, moments and step counts as they were
        assert _equal(params[nan_at], params[nan_at - 1]) and _states_equal(states[nan_at], states[nan_at - 1])
        assert float(states[nan_at][0]["step"]) == nan_at


def test_only_fused_adam_skips_on_device() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert skips_on_device(torch.optim.AdamW(params, fused=True))
    assert not skips_on_device(torch.optim.AdamW(params, foreach=True))
    assert not skips_on_device(torch.optim.SGD(params, lr=0.1))
