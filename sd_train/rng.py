"""Per-rank random state: seeding and a state_dict of every generator training draws from
(timesteps, noise, caption dropout and VAE posterior sampling all use the global torch RNG).

The state is plain numbers, lists and tensors, never a pickled object, so a checkpoint's rank file
loads with `torch.load(weights_only=True)`: reading a checkpoint runs no code from it. Python's
Mersenne Twister state is its list of 625 ints; numpy's is its 624-word key as an int64 tensor."""

from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state_dict() -> dict:
    version, internal, gauss_next = random.getstate()
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "name": str(name),
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def load_rng_state_dict(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    key = npy["key"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], key, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RankRNG:
    """This rank's generators as a checkpoint entry (rank_R.pt). On another world size the saved
    per-rank streams have no counterpart: the rank takes a fresh seed, mixed with the step so that
    it differs from the run's start."""

    def __init__(self, seed: int, rank: int, step: Callable[[], int]):
        self.seed, self.rank, self.step = seed, rank, step

    def state_dict(self) -> dict:
        return rng_state_dict()

    def load_state_dict(self, state: dict) -> None:
        load_rng_state_dict(state)

    def load_state_dict_from_other_world(self, states: list[dict]) -> None:  # noqa: ARG002
        seed_all(self.seed + 7919 * self.step() + self.rank)
