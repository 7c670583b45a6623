"""Test-only fault injection: one environment variable makes a chosen rank fail at a chosen step
and phase, so the fault-tolerance tests can kill, poison or hang a real run.

    SD_TRAIN_FAULT="rank=1,step=6,phase=after_shards"            kill -9 itself there
    SD_TRAIN_FAULT="rank=0,step=4,phase=mid_step,action=nan,count=3"   NaN loss on 3 attempts from step 4
    SD_TRAIN_FAULT="rank=0,step=12,phase=export_write,action=sleep,seconds=20"   a slow write

Phases: mid_step (between backward and optimizer step), after_rank_files (checkpoint: rank file
written, shards not), after_shards (shards written, folder not yet renamed), before_retention,
during_async_save, export_write (main process, the end-of-run export, before its files are written),
grid_write (main process, on the background writer's thread, before a sample grid is written).
Actions: kill (default, SIGKILL), nan, hang (sleep forever), term (SIGTERM), sleep (`seconds`),
wait_signal (wait until this process is asked to stop, by SIGTERM or Ctrl-C: a test sends a real
signal once it reads the fault's line, and the run stops at exactly that step; at most `seconds`,
default 300). Unset, it costs one dict lookup per phase.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable, Optional

from sd_train.console import ANY_RANK

log = logging.getLogger(__name__)


@dataclass
class Fault:
    rank: int
    step: int
    phase: str
    action: str = "kill"
    count: int = 1
    seconds: float = 0.0

    fired: int = 0

    def matches(self, rank: int, step: int, phase: str) -> bool:
        """Fires `count` times, from the first matching step on. Counting firings rather than step
        numbers matters for `nan`: a skipped step is retried under the same step number."""
        return rank == self.rank and phase == self.phase and step >= self.step and self.fired < self.count


def parse_fault(spec: Optional[str]) -> Optional[Fault]:
    if not spec:
        return None
    fields = dict(item.split("=", 1) for item in spec.split(",") if item)
    try:
        return Fault(
            int(fields["rank"]),
            int(fields["step"]),
            fields["phase"],
            fields.get("action", "kill"),
            int(fields.get("count", 1)),
            float(fields.get("seconds", 0)),
        )
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"SD_TRAIN_FAULT={spec!r}: expected rank=R,step=S,phase=P[,action=A][,count=N][,seconds=T] ({e})"
        ) from e


class FaultInjector:
    """Fires the configured fault when (rank, step, phase) match. `trip` returns True for the
    `nan` action so the caller can poison its own loss."""

    def __init__(self, rank: int):
        self.rank = rank
        self.fault = parse_fault(os.environ.get("SD_TRAIN_FAULT"))
        # Whether this process was asked to stop (set by the trainer), for `wait_signal`.
        self.stop_requested: Callable[[], bool] = lambda: False

    def trip(self, phase: str, step: int) -> bool:
        f = self.fault
        if f is None or not f.matches(self.rank, step, phase):
            return False
        f.fired += 1
        if f.action == "nan":
            return True
        log.info(f"[fault injection] rank {self.rank} step {step} phase {phase}: {f.action}", extra=ANY_RANK)
        if f.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif f.action == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        elif f.action == "sleep":
            time.sleep(f.seconds)
        elif f.action == "hang":
            while True:
                time.sleep(3600)
        elif f.action == "wait_signal":
            deadline = time.monotonic() + (f.seconds or 300.0)
            while not self.stop_requested() and time.monotonic() < deadline:
                time.sleep(0.05)
        return False
