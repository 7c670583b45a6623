"""The output_dir lock: a second holder is refused with the first one's host and pid, and the lock
goes with the holding process however it ends, even while a child it forked (a DataLoader worker)
lives on. (A two-launch run: tests/e2e/test_faults.py, the kill chain's last relaunch.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sd_train.run_lock import LOCK_FILE, OutputDirLock

REPO = Path(__file__).resolve().parents[2]
HOLDER = """
import os, sys, time
from sd_train.run_lock import OutputDirLock
assert OutputDirLock(sys.argv[1]).acquire() is None
child = os.fork()  # as rank 0 forks its DataLoader workers after taking the lock
if child == 0:
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


def test_second_holder_refused_naming_the_first_and_the_lock_goes_with_a_killed_holder(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        lock = OutputDirLock(out)
        refused = lock.acquire()
        assert refused is not None and f"host {socket.gethostname()}, pid {holder.pid}" in refused
        assert f"output_dir={out} is in use by another launch" in refused
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # the forked child is still alive
        assert lock.acquire() is None, "the kernel released the lock with the killed holder"
        assert f'"pid": {os.getpid()}' in (out / LOCK_FILE).read_text()
        lock.release()
    finally:
        for pid in (holder.pid, child):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        holder.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # reap-free check that the orphaned child is gone
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
