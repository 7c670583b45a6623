"""A rank for tests/unit/test_zygote.py: `python zygote_probe.py OUT MODE` reports what a script
sees of its process, then behaves as MODE says. The test runs it as a fresh interpreter and forked
from a warm server (tests/support/zygote.py) and compares.

MODE: `report` (imports what a server preloads, writes OUT/report.rank{RANK}.json and exits 0),
`exit:N` (prints a line to stdout and one to stderr, exits N), `raise` (an uncaught exception),
`wait` (writes OUT/ready.rank{RANK} and sleeps: the test signals it), `count_sigint` (writes
OUT/ready.rank{RANK}, then the number of SIGINTs received so far to OUT/sigint.rank{RANK} at each
one; exits 130 after the second)."""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))


def report(out: Path, rank: str) -> None:
    sys.path.insert(0, HERE)
    import random

    import numpy as np
    import torch
    import zygote

    zygote.preload()  # a no-op when forked from a server; what a server's child has, in a fresh one
    catchable = [s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)]
    signals = {int(s): repr(signal.getsignal(s)) for s in catchable}
    main = sys.modules["__main__"]
    facts = {
        "argv": [sys.argv[0], *sys.argv[2:]],  # [1] is this launch's folder
        "path": sys.path[1:],  # [0] is HERE, inserted above
        "cwd": os.getcwd(),
        "name": __name__,
        "main_file": getattr(main, "__file__", None),
        "env": dict(os.environ),
        "ppid": os.getppid(),
        "pgid": os.getpgrp(),
        "sid": os.getsid(0),
        "signals": signals,
        "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
        "threads": len(os.listdir("/proc/self/task")),
        "torch_seed": torch.initial_seed(),
        "torch_rand": torch.rand(3).tolist(),
        "numpy_rand": float(np.random.random()),
        "random": random.random(),
        "hash": hash("zygote"),
        "umask": os.umask(0o022),
        "nice": os.nice(0),
        "stdout_isatty": sys.stdout.isatty(),
        "stdout_encoding": sys.stdout.encoding,
        "flags": repr(sys.flags),
        "gc_enabled": gc.isenabled(),
        "gc_thresholds": gc.get_threshold(),
        "gc_frozen": gc.get_freeze_count(),
    }
    (out / f"report.rank{rank}.json").write_text(json.dumps(facts))


def count_sigint(out: Path, rank: str) -> int:
    count = [0]

    def handler(*_):
        count[0] += 1
        (out / f"sigint.rank{rank}").write_text(str(count[0]))

    signal.signal(signal.SIGINT, handler)
    (out / f"ready.rank{rank}").touch()
    deadline = time.monotonic() + 120
    while count[0] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    return 130


def main() -> int:
    out, mode, rank = Path(sys.argv[1]), sys.argv[2], os.environ.get("RANK", "0")
    if mode == "report":
        report(out, rank)
    elif mode.startswith("exit:"):
        print(f"stdout of rank {rank}", flush=True)
        print(f"stderr of rank {rank}", file=sys.stderr, flush=True)
        return int(mode[5:])
    elif mode == "raise":
        raise RuntimeError(f"probe rank {rank} raised")
    elif mode == "wait":
        (out / f"ready.rank{rank}").touch()
        time.sleep(120)
    elif mode == "count_sigint":
        return count_sigint(out, rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
