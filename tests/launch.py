"""Helpers to start real multi-process jobs from tests: a free port, a hard timeout, one BLAS
thread per rank (2 ranks on 2 cores), and the log in the failure message."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", WANDB_MODE=e.get("WANDB_MODE", "disabled"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SD_TRAIN_FAULT"):
        e.pop(k, None)
    e.update(extra)
    return e


def torchrun_cmd(nproc: int, script: str, *args: str) -> list[str]:
    return [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={free_port()}", script, *args]


def accelerate_cmd(config: str, script: str, *args: str) -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--config_file", config, "--main_process_port", str(free_port()), script, *args]


def run(cmd: list[str], timeout: int = 300, check: bool = True, **env_extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc
