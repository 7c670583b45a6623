"""A torchrun stand-in for the tests: `python tests/support/spawn_ranks.py N SCRIPT ARGS...` starts N ranks of
SCRIPT on this machine with the variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), their output on its own, and exits with the first
non-zero exit status of a rank, else 0.

Why not torchrun itself: its agent imports torch and sets up an elastic rendezvous before the ranks
start, about 2.5 s of every launch on the 2-core CI box, and most tests start several jobs. What
the tests check happens inside the ranks, so a plain launcher shows the same. The user-facing
launchers keep their own tests: the uninterrupted reference run (tests/conftest.py `straight_run`)
and the FSDP2 launch tests go through torchrun, tests/e2e/test_launch.py through `accelerate
launch` and srun.

Like torchrun, once a rank fails the others are sent SIGTERM (and SIGKILL 15 s later), and a
SIGTERM or SIGINT to this process is passed on to every rank. No torch import here."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str]) -> int:
    nproc, script, args = int(argv[0]), argv[1], argv[2:]
    base = dict(os.environ)
    base.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc)
    )
    procs = [
        subprocess.Popen([sys.executable, script, *args], env={**base, "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in range(nproc)
    ]

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    while any(p.poll() is None for p in procs):
        failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
        if failed and not status:
            status = failed[0]
            forward(signal.SIGTERM, None)
            deadline = time.monotonic() + 15
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                time.sleep(0.05)
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.05)
    codes = [p.wait() for p in procs]
    status = status or next((c for c in codes if c != 0), 0)
    return 1 if status < 0 else status  # a rank killed by a signal: 1, as torchrun exits


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
