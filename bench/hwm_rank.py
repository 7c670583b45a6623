"""Run train.py's main in this process, then print this rank's peak RSS (VmHWM of
/proc/self/status: the kernel's high-water mark of resident memory, counted to the page) as one
line the memory benches read. `python bench/hwm_rank.py train.py ARGS...`; bench/memlib.py starts
each rank this way. The top level is guarded: loader workers may start from a forkserver, which
imports the main module."""

from __future__ import annotations

import os
import runpy
import sys

HWM_PREFIX = "BENCH_RANK_HWM "


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    script, sys.argv = sys.argv[1], sys.argv[1:]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        print(f"{HWM_PREFIX}{os.environ.get('RANK', '0')} {vm_hwm()}", flush=True)
        raise SystemExit(e.code) from None
    print(f"{HWM_PREFIX}{os.environ.get('RANK', '0')} {vm_hwm()}", flush=True)
