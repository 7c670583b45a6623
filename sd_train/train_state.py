"""The run's progress as the loop and the checkpoints see it: `TrainState` (shared by every rank),
`DataPosition` (each rank's loader position as a checkpoint entry) and `StepResult` (one optimizer
step as the loop reads it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from sd_train.parallel.process_group import all_reduce_max
from sd_train.step_signals import StepVotes


@dataclass
class TrainState:
    """Progress that every rank shares; saved in trainer_state.json."""

    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


class DataPosition:
    """The loader's position as a checkpoint entry (rank_R.pt). On another world size the loader gets
    every saved rank's position and spreads the rest of the interrupted epoch over the new ranks
    (sd_train.data.elastic); where it cannot (resampled mode), the ranks agree on the next epoch."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def load_state_dict_from_other_world(self, states: list[dict]) -> None:
        self.loader.load_saved_world(states)
        # A collective on every rank: all of them took the same branch, from the same saved states.
        epoch = int(all_reduce_max([float(self.loader.reshard_epoch or 0)], self.device)[0])
        if self.loader.reshard_epoch is not None:
            self.loader.start_at_epoch(epoch)


@dataclass
class StepResult:
    """One optimizer step as the loop sees it."""

    loss: torch.Tensor  # this rank's loss, summed over micro-batches, still on the device
    grad_norm: float
    data_wait: float  # seconds the host waited for the loader
    taken: bool  # False: a non-finite step, skipped on every rank
    votes: StepVotes  # what the ranks agreed on at this step
    syncs_before: int  # host reads so far (sd_train.host_sync), for the plain-step budget
    flops: float = 0.0  # this rank's forward+backward FLOPs of the step (data.buckets: its buckets')
