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
        )
    return LaunchEnv(0, 1, 0, "single")
