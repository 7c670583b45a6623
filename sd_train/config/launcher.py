"""Which rank this process is, read from the launcher's environment before any process group.

Three ways in, checked in this order:
- torchrun and `accelerate launch` set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
- `srun python train.py ...` (one task per GPU) sets SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID,
  and the job script exports the rendezvous (MASTER_ADDR, and MASTER_PORT or the default 29500);
- neither: a plain `python train.py` is a 1-process job on a free local port.
A SLURM job of several tasks with no rendezvous is refused: without it every task would start a
1-process run of its own, all writing into the same output_dir.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

from sd_train.errors import ConfigError

SLURM_DEFAULT_PORT = "29500"


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the job, and who said so."""

    rank: int
    world_size: int
    local_rank: int
    source: str  # "torchrun" (also accelerate), "slurm" or "single"
    master_addr: Optional[str] = None
    master_port: Optional[str] = None
    local_world_size: int = 1  # ranks on this node


def _slurm_tasks_per_node(environ: Mapping[str, str], ntasks: int) -> int:
    """SLURM_NTASKS_PER_NODE, else the first count of SLURM_TASKS_PER_NODE ("8(x4)" -> 8)."""
    if environ.get("SLURM_NTASKS_PER_NODE", "").isdigit():
        return int(environ["SLURM_NTASKS_PER_NODE"])
    m = re.match(r"(\d+)", environ.get("SLURM_TASKS_PER_NODE", ""))
    return int(m.group(1)) if m else ntasks


def shard_group_size(configured: Optional[int], launch: LaunchEnv) -> int:
    """`dist.shard_group_size`, its default being one node's ranks."""
    return configured if configured is not None else launch.local_world_size


def read_launch_env(environ: Mapping[str, str] = os.environ) -> LaunchEnv:
    """The launch environment; raises ConfigError for a SLURM job of several tasks with no rendezvous."""
    if "RANK" in environ:
        return LaunchEnv(
            int(environ["RANK"]),
            int(environ.get("WORLD_SIZE", "1")),
            int(environ.get("LOCAL_RANK", "0")),
            "torchrun",
            environ.get("MASTER_ADDR"),
            environ.get("MASTER_PORT"),
            int(environ.get("LOCAL_WORLD_SIZE", environ.get("WORLD_SIZE", "1"))),
        )
    ntasks = int(environ.get("SLURM_NTASKS", "1") or "1")
    if "SLURM_PROCID" in environ and ntasks > 1:
        if not environ.get("MASTER_ADDR"):
            raise ConfigError(
                f"SLURM started {ntasks} tasks (SLURM_NTASKS={ntasks}) but no rendezvous is set, so each task would "
                "train alone into the same output_dir. In the job script, before srun: "
                'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1) MASTER_PORT=29500; '
                "or start one launcher per node with launch/slurm/sd_train.sbatch (accelerate launch)"
            )
        return LaunchEnv(
            int(environ["SLURM_PROCID"]),
            ntasks,
            int(environ.get("SLURM_LOCALID", "0")),
            "slurm",
            environ["MASTER_ADDR"],
            environ.get("MASTER_PORT") or SLURM_DEFAULT_PORT,
            _slurm_tasks_per_node(environ, ntasks),
        )
    return LaunchEnv(0, 1, 0, "single")
