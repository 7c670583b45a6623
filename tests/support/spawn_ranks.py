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
SIGTERM or SIGINT to this process is passed on to every rank. No torch import here.

When the test session has started warm interpreters (tests/support/launch.py `start_zygotes`), each
rank is forked from one of them instead of starting a fresh `python`: ~4.5 s less CPU per rank
(tests/support/zygote.py says what stays the same and what does not). SD_TRAIN_TEST_NO_ZYGOTES=1
in this launcher's environment starts fresh ones."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import zygote  # tests/support/zygote.py: this script's own folder is first on sys.path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_rank(rank: int, script: str, args: list[str], env: dict):
    """`python script args` with `env`: forked from a warm server (tests/support/zygote.py) when the
    tests started them and this launch does not opt out, else a fresh interpreter."""
    servers = [a for a in os.environ.get(zygote.ENV_VAR, "").split(":") if a and not os.environ.get(zygote.NO_ZYGOTES)]
    if servers:
        proc = zygote.ZygoteProcess.start(servers[rank % len(servers)], [script, *args], env)
        if proc is not None:
            return proc
    return subprocess.Popen([sys.executable, script, *args], env=env)


def main(argv: list[str]) -> int:
    nproc, script, args = int(argv[0]), argv[1], argv[2:]
    base = dict(os.environ)
    base.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc)
    )
    procs = [start_rank(r, script, args, {**base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(nproc)]

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
