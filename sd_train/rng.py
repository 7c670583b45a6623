"""Per-rank random state: seeding and a state_dict of every generator training draws from
(timesteps, noise, caption dropout and VAE posterior sampling all use the global torch RNG)."""

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
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def load_rng_state_dict(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
