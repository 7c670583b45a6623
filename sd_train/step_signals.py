"""The votes the ranks agree on once per step: stop (SIGTERM, Ctrl-C) and save (the clock cadence).

SIGTERM (preemption, scancel, a job's time limit) and the first Ctrl-C (SIGINT) only set a flag: no
rank may leave a collective half-done, and Python runs a handler between two bytecodes of the main
thread, wherever the loop is. Once per step every rank adds its flags to one small tensor, with rank
0's vote that `checkpoint.every_minutes` have passed; the tensor is summed over the ranks on the
device (no host read of its own) and read with the grad norm in the step's one host read (the
Strategy reads it and knows nothing of what it holds). Any rank's signal stops every rank at the
same step: they save a complete checkpoint together and exit, 0 after SIGTERM (the job is requeued
or stopped on purpose), 130 after Ctrl-C (the shell's code for an interrupted command).

A second Ctrl-C aborts at once, without saving. The launchers (torchrun, `accelerate launch`)
forward the terminal's Ctrl-C to workers that already got it from the terminal, so one press
arrives twice within milliseconds: a SIGINT within FORWARD_WINDOW_S of the first is the same press.
A SIGINT that the shell ignores (a background job, `nohup`) stays ignored.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch

from sd_train.parallel.process_group import all_reduce_sum, reduce_tensor_

# A forwarded copy of the same Ctrl-C arrives within milliseconds; a person pressing twice takes longer.
FORWARD_WINDOW_S = 1.0
INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


class StopRequests:
    """This process's stop signals: SIGTERM from construction on, SIGINT once `arm_interrupt` ran
    (before the loop a Ctrl-C is a plain KeyboardInterrupt: nothing to save yet)."""

    def __init__(
        self,
        is_main: bool,
        abort: Callable[[int], None] = os._exit,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.is_main = is_main
        self.terminated = False
        self.interrupted = False
        self._first_interrupt: float | None = None
        self._abort = abort
        self._clock = clock
        signal.signal(signal.SIGTERM, self._on_term)

    def arm_interrupt(self) -> None:
        """Ctrl-C from now on stops at the end of the step, saved (unless the shell ignores SIGINT)."""
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, self._on_interrupt)

    def requested(self) -> bool:
        """Whether this process got SIGTERM or Ctrl-C (its own signal, not yet the ranks' agreement)."""
        return self.terminated or self.interrupted

    def _on_term(self, signum, frame) -> None:  # noqa: ARG002
        self.terminated = True

    def _on_interrupt(self, signum, frame) -> None:  # noqa: ARG002
        now = self._clock()
        if self._first_interrupt is None:
            self._first_interrupt = now
            self.interrupted = True
            # os.write, not print: a handler may run while print is writing the same stream.
            self._say("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again aborts without saving)")
        elif now - self._first_interrupt >= FORWARD_WINDOW_S:
            self._say("second Ctrl-C: aborting without saving")
            self._abort(INTERRUPTED_EXIT)

    def _say(self, line: str) -> None:
        if self.is_main:
            os.write(2, f"\n{line}\n".encode())


@dataclass(frozen=True)
class StepVotes:
    """What the ranks agreed on at one step."""

    terminated: bool  # some rank got SIGTERM
    interrupted: bool  # some rank got Ctrl-C
    clock_due: bool  # rank 0's clock says a checkpoint is due

    @property
    def stop(self) -> bool:
        return self.terminated or self.interrupted


class StepSignals:
    """Owns the per-step votes: builds and reduces their tensor, and reads the agreed values."""

    def __init__(self, requests: StopRequests, clock_vote: Callable[[], float], device: torch.device) -> None:
        self.requests = requests
        self.clock_vote = clock_vote
        self.device = device

    def _local(self) -> list[float]:
        r = self.requests
        return [1.0 if r.terminated else 0.0, 1.0 if r.interrupted else 0.0]

    def reduced(self) -> torch.Tensor:
        """This rank's votes summed over the ranks, queued on the device and not read: the
        Strategy reads them with the grad norm. Filled on the device, with no host-to-device copy
        that could wait for the queue."""
        terminated, interrupted = self._local()
        votes = torch.zeros(3, device=self.device)
        votes[0].fill_(terminated)
        votes[1].fill_(interrupted)
        votes[2].fill_(self.clock_vote())
        return reduce_tensor_(votes)

    @staticmethod
    def agreed(values: Sequence[float]) -> StepVotes:
        """The host values of `reduced()` (summed counts: any rank's vote counts)."""
        terminated, interrupted, clock = values
        return StepVotes(terminated > 0, interrupted > 0, clock > 0)

    def agree_now(self) -> StepVotes:
        """The stop votes once more, as a collective of its own: for steps that log, evaluate or
        save, which read the host anyway, so that a signal that arrived while a checkpoint was
        written stops the run at that step. (No clock vote: the save of this step is done.)"""
        terminated, interrupted = all_reduce_sum(self._local(), self.device)
        return StepVotes(terminated > 0, interrupted > 0, False)
