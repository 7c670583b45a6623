"""The memory plan at startup and in `--plan`: the machine's limits, the step estimate (cached, or
computed by a child process when `dist.memory_check=estimate` and none is cached), the plan, and
`checkpoint.async_save=auto` made concrete. Torch-free: the estimate runs in its own interpreter
(`python -m sd_train.memory.estimate`), never in a rank, so no rank ever holds a fake process group.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

from sd_train.config import TrainConfig, dump_config
from sd_train.config.launcher import read_launch_env
from sd_train.memory.build import gpu_memory_bytes, memory_plan, plan_shard_size
from sd_train.memory.plan import MemoryPlan
from sd_train.memory.record import cached_estimate, estimate_key


def run_estimator(cfg: TrainConfig, world_size: int, shard_size: int) -> Optional[str]:
    """Compute and cache the step estimate in a child interpreter; None on success, else why not."""
    print(
        "memory plan: estimating the training step on fake tensors (FSDPMemTracker; once per configuration)...",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="sd-train-plan-") as tmp:
        path = Path(tmp) / "config.yaml"
        dump_config(cfg, path)
        cmd = [sys.executable, "-m", "sd_train.memory.estimate", "--config", str(path)]
        cmd += ["--world-size", str(world_size), "--shard-size", str(shard_size)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        # The child must not see this launch's ranks: it opens a fake one-process group of its own.
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return (proc.stderr or proc.stdout).strip().splitlines()[-1:] and (proc.stderr or proc.stdout).strip()[-600:]
    print(proc.stdout.strip().splitlines()[-1], flush=True)
    return None


def startup_plan(
    cfg: TrainConfig,
    world_size: int,
    environ: Mapping[str, str] = os.environ,
    *,
    estimate_now: Optional[bool] = None,
    device_memory: Optional[int] = None,
    host_memory: Optional[int] = None,
    ranks_per_node: Optional[int] = None,
) -> MemoryPlan:
    """The memory plan of a resolved config for this launch (or the machine the arguments describe).
    `estimate_now`: compute a missing step estimate (default: `dist.memory_check=estimate` on local
    rank 0, so a node computes it once). The GPU's memory comes from nvidia-smi unless given."""
    launch = read_launch_env(environ)
    rpn = ranks_per_node or (launch.local_world_size if launch.world_size == world_size else min(world_size, 8))
    if estimate_now is None:
        estimate_now = cfg.dist.memory_check == "estimate" and launch.local_rank == 0
    shard = plan_shard_size(cfg, world_size, rpn)
    if estimate_now and cached_estimate(estimate_key(cfg, world_size, shard)) is None:
        failure = run_estimator(cfg, world_size, shard)
        if failure:
            print(f"WARNING: memory plan: the step estimate failed; planning model states only:\n{failure}", flush=True)
    if device_memory is None:
        device_memory = gpu_memory_bytes(cfg.dist.backend)
    return memory_plan(cfg, world_size, device_memory, host_memory=host_memory, ranks_per_node=rpn)


def with_async_decided(cfg: TrainConfig, plan: Optional[MemoryPlan]) -> TrainConfig:
    """`checkpoint.async_save=auto` replaced by the plan's choice (sync without a plan)."""
    if cfg.checkpoint.async_save != "auto":
        return cfg
    chosen = plan.async_save if plan is not None else False
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, async_save=chosen))
