"""One launch per output_dir: rank 0 holds a lock on `<output_dir>/.lock` for as long as it runs.

A second launch on the same folder would rewrite config.yaml, ema_plan.json and topology.json,
push its config into the first one's wandb run, delete the other's `.partial` checkpoint folders
and rename its steps to `.broken`. The trainer takes this lock on rank 0 before anything is
written into output_dir, and the other ranks wait for rank 0's answer before they touch it.

Why a POSIX record lock (`fcntl.lockf`) rather than `flock(2)`: a flock lock belongs to the open
file description, which `fork()` shares, so the DataLoader workers that rank 0 forks would hold it
too, and a relaunch right after rank 0 was killed would be refused for as long as they linger. A
POSIX lock belongs to the process: children never hold it, and the kernel releases it when rank 0
exits, kill -9 included. Linux implements flock on NFS with POSIX locks anyway, and lockd serves
these across hosts. One rule follows from POSIX semantics: the process must not open and close
the lock file a second time while it holds the lock (closing any descriptor of the file drops the
process's lock), so only this class touches it.

The file holds the holder's host, pid and start time, for the refusal message. Torch-free.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

LOCK_FILE = ".lock"


class OutputDirLock:
    """Owns the lock of one output_dir for this process."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> Optional[str]:
        """Take the lock without waiting: None once held, else the refusal, naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            return (
                f"output_dir={self.path.parent} is in use by another launch ({holder}, which holds {self.path}): two "
                "launches on one output_dir overwrite each other's checkpoints. Wait for it to end or stop it, or "
                "use another output_dir. (The lock goes with that process, however it ends.)"
            )
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the lock; the file stays, naming the last holder
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        h = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"host {h['host']}, pid {h['pid']}, since {h['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown: it is still starting"
