"""Measuring a training run's memory for the memory benches (bench/bench_memory_plan.py,
bench/rehearse.py). Not a benchmark itself.

How: each rank runs through bench/hwm_rank.py, which prints the rank's VmHWM (the kernel's peak
RSS of the process) when it ends; a monitor thread samples the ranks' loader workers (their RSS and
USS, psutil, every 0.5 s) and the ranks' RSS over time. The plan's prediction for the run comes from
sd_train.memory.build.memory_plan with a freshly computed step estimate.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from hwm_rank import HWM_PREFIX

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
GIB = 2**30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Measured:
    """What a launch used: per-rank peak RSS, the loader workers' largest RSS and USS, wall time."""

    rc: int
    rank_peak: list[int]
    worker_rss: int = 0
    worker_uss: int = 0
    workers_seen: int = 0
    seconds: float = 0.0
    rss_series: list[list[tuple[float, int]]] = field(default_factory=list)
    log: str = ""

    def summary(self) -> dict:
        return {
            "rc": self.rc,
            "rank_peak_gib": [round(b / GIB, 3) for b in self.rank_peak],
            "worker_rss_gib": round(self.worker_rss / GIB, 3),
            "worker_uss_gib": round(self.worker_uss / GIB, 3),
            "seconds": round(self.seconds, 1),
        }


def _monitor(procs: list[subprocess.Popen], out: Measured, stop: threading.Event) -> None:
    t0 = time.monotonic()
    out.rss_series = [[] for _ in procs]
    seen: set[int] = set()
    while not stop.is_set():
        for r, p in enumerate(procs):
            try:
                proc = psutil.Process(p.pid)
                if proc.status() == psutil.STATUS_ZOMBIE:  # exited, not yet reaped: its RSS reads 0
                    continue
                out.rss_series[r].append((round(time.monotonic() - t0, 1), proc.memory_info().rss))
                for kid in proc.children(recursive=True):
                    try:
                        info = kid.memory_full_info()
                    except psutil.Error:
                        continue
                    seen.add(kid.pid)
                    out.worker_rss = max(out.worker_rss, info.rss)
                    out.worker_uss = max(out.worker_uss, info.uss)
            except psutil.Error:
                pass
        out.workers_seen = len(seen)
        stop.wait(0.5)


def run_ranks(nproc: int, args: list[str], log_path: Path, env: dict | None = None, timeout: float = 7200) -> Measured:
    """Start `nproc` ranks of train.py (torchrun's variables, as tests/spawn_ranks.py sets them),
    wait for them, and return what they used. Their output goes to `log_path`."""
    base = {**os.environ, **(env or {})}
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc))
    base.update(LOCAL_WORLD_SIZE=str(nproc), OMP_NUM_THREADS=base.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, str(BENCH / "hwm_rank.py"), str(REPO / "train.py"), *args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log_path, "w") as log:
        procs = [
            subprocess.Popen(
                cmd, cwd=REPO, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=log, stderr=subprocess.STDOUT
            )
            for r in range(nproc)
        ]
        out = Measured(rc=0, rank_peak=[0] * nproc)
        stop = threading.Event()
        monitor = threading.Thread(target=_monitor, args=(procs, out, stop), daemon=True)
        monitor.start()
        deadline = started + timeout
        try:
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            stop.set()
            monitor.join()
    out.seconds = time.monotonic() - started
    out.rc = next((p.returncode for p in procs if p.returncode), 0)
    text = log_path.read_text(errors="replace")
    out.log = text
    out.rank_peak = [max((v for _, v in s), default=0) for s in out.rss_series]  # a rank that died: sampled
    for line in text.splitlines():
        if line.startswith(HWM_PREFIX):
            rank, peak = line[len(HWM_PREFIX) :].split()
            out.rank_peak[int(rank)] = int(peak)
    return out


def metrics_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
