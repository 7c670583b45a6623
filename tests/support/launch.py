"""Helpers to start real multi-process jobs from tests: a free port (sd_train's own), a hard timeout, one BLAS
thread per rank (2 ranks on 2 cores), and the log in the failure message."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from sd_train.parallel.process_group import free_port  # noqa: F401 (the tests' one free port, re-exported)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def env(**extra: str) -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", WANDB_MODE=e.get("WANDB_MODE", "disabled"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SD_TRAIN_FAULT"):
        e.pop(k, None)
    e.update(extra)
    for k, v in extra.items():  # an empty value means: unset it
        if v == "":
            e.pop(k)
    return e


def torchrun_cmd(nproc: int, script: str, *args: str) -> list[str]:
    return [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={free_port()}", script, *args]


def ranks_cmd(nproc: int, script: str, *args: str) -> list[str]:
    """`nproc` ranks of `script` with torchrun's variables but without its agent (tests/support/spawn_ranks.py:
    2.5 s less per launch); the user-facing launchers keep their own tests."""
    return [sys.executable, str(REPO / "tests" / "support" / "spawn_ranks.py"), str(nproc), script, *args]


def accelerate_cmd(config: str, script: str, *args: str) -> list[str]:
    return [
        str(BIN / "accelerate"),
        "launch",
        "--config_file",
        config,
        "--main_process_port",
        str(free_port()),
        script,
        *args,
    ]


def run(cmd: list[str], timeout: int = 300, check: bool = True, **env_extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- "
            f"stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def interrupt(
    cmd: list[str],
    after: str,
    again_after: float | None = None,
    timeout: int = 300,
    **env_extra: str,
) -> tuple[subprocess.CompletedProcess, float]:
    """Start `cmd` in a session of its own and, once a stdout line contains `after`, press Ctrl-C as a
    terminal does: SIGINT to the whole process group (the launcher, every rank, the loader workers).
    With `again_after`, press it again that many seconds later. Returns the finished process and the
    seconds from the last press to its exit."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env(**env_extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)  # never a full pipe
    reader.start()
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if after in line:
                os.killpg(proc.pid, signal.SIGINT)
                if again_after is not None:
                    time.sleep(again_after)
                    os.killpg(proc.pid, signal.SIGINT)
                break
        pressed = time.monotonic()  # (the run ended without the line: the caller's checks fail)
        out.extend(proc.stdout)
        proc.wait()
    finally:
        watchdog.cancel()
    reader.join(timeout=10)
    elapsed = time.monotonic() - pressed
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(out), "".join(stderr)), elapsed


# A fake SLURM for the batch scripts: `srun` starts one task per node here (SLURM_NODEID set, TERM
# forwarded as the real srun does), `scontrol` answers `show hostnames` and logs anything else, and
# `accelerate` records its command line per node. Each writes under $FAKE_LOG.
_FAKE_SRUN = r"""#!/bin/bash
while [[ $1 == -* ]]; do echo "$1" >> "$FAKE_LOG/srun_args"; shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
status=0
for p in "${pids[@]}"; do
    while :; do wait "$p" && s=0 || s=$?; kill -0 "$p" 2>/dev/null || break; done
    if ((s > status)); then status=$s; fi
done
exit "$status"
"""
_FAKE_SCONTROL = r"""#!/bin/bash
if [[ $1 == show && $2 == hostnames ]]; then printf '%s\n' $FAKE_HOSTS; else echo "$*" >> "$FAKE_LOG/scontrol"; fi
"""
_FAKE_ACCELERATE = r"""#!/bin/bash
line=$(printf '%q ' "$0" "$@")
printf '%s\n' "${line% }" > "$FAKE_LOG/node$SLURM_NODEID"
if [[ -n ${FAKE_SLEEP:-} ]]; then
    sleep 30 &
    sleeper=$!
    trap 'kill "$sleeper"; echo term > "$FAKE_LOG/term$SLURM_NODEID"; exit 1' TERM
    touch "$FAKE_LOG/ready$SLURM_NODEID"
    wait "$sleeper"
fi
"""


def fake_slurm_bin(root: Path) -> Path:
    """Write fake srun, scontrol and accelerate into root/bin (logs go to root/log); return bin."""
    bin_dir, log_dir = root / "bin", root / "log"
    bin_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("srun", _FAKE_SRUN), ("scontrol", _FAKE_SCONTROL), ("accelerate", _FAKE_ACCELERATE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def slurm_env(path: str, **extra: str) -> dict:
    """A minimal environment as a 2-node, 8-GPU SLURM job sees it; nothing inherited but PATH."""
    e = {
        "PATH": path,
        "SLURM_JOB_ID": "1234",
        "SLURM_JOB_NODELIST": "gpu-[01-02]",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "0",
        "SLURM_GPUS_ON_NODE": "8",
    }
    e.update(extra)
    return e
