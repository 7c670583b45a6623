"""Count the random numbers torch draws inside a block, whoever draws them: a TorchDispatchMode
sees every `normal_` / `randn` / `uniform_` that reaches an ATen kernel, so a test can check how
much noise a rank generated without trusting the code under test to count it."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_RANDOM_OPS = ("normal", "randn", "rand", "uniform", "bernoulli", "randint")


class RandomCount(TorchDispatchMode):
    """`with RandomCount() as c: ...` then `c.elements`: elements written by random ops."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0].rstrip("_") in _RANDOM_OPS and isinstance(out, torch.Tensor):
            self.elements += out.numel()
        return out
