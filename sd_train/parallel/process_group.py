"""The process group, the device mesh and the few collectives the loop needs.

`accelerate launch` and `torchrun` are used only to start the processes; both set RANK /
WORLD_SIZE / MASTER_ADDR / MASTER_PORT. How the UNet is spread over the ranks is a Strategy's job
(sd_train.parallel.strategy).
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from sd_train.config import DistArgs
from sd_train.config.launcher import LaunchEnv, read_launch_env, shard_group_size
from sd_train.host_sync import read_floats


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(args: DistArgs) -> DistInfo:
    """Join (or, for a plain `python train.py`, create a one-process) process group. Ranks come
    from torchrun / accelerate, or from srun's SLURM variables (sd_train.config.launcher).

    One process still gets a process group and a 1-device mesh, so that a single CPU run goes
    through the same FSDP2 and DCP code as a 64-GPU job.
    """
    launch = read_launch_env(os.environ)
    if launch.source != "torchrun":
        # torch.distributed's env:// rendezvous (and accelerate, DeepSpeed) read these variables.
        port = launch.master_port or os.environ.get("MASTER_PORT") or str(free_port())
        os.environ.update(
            RANK=str(launch.rank),
            WORLD_SIZE=str(launch.world_size),
            LOCAL_RANK=str(launch.local_rank),
            MASTER_ADDR=launch.master_addr or "127.0.0.1",
            MASTER_PORT=port,
        )
    rank, world_size, local_rank = launch.rank, launch.world_size, launch.local_rank
    use_cuda = torch.cuda.is_available() and args.backend != "gloo"
    backend = args.backend if args.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if use_cuda:
        # Where each task sees only its own GPU (srun --gpus-per-task, CUDA_VISIBLE_DEVICES per
        # task), the local rank is not a device index.
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    timeout = datetime.timedelta(seconds=args.timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=device if backend == "nccl" else None,
        )
    timeout_for_later_groups(timeout)
    return DistInfo(rank, world_size, local_rank, device, build_mesh(device, world_size, args, launch))


def timeout_for_later_groups(timeout: datetime.timedelta) -> None:
    """Give `timeout` (`dist.timeout_s`) to every process group created from now on that names no
    timeout of its own: the checkpointer's gloo group for async saves, DeviceMesh's groups of each
    HSDP mesh dimension, FSDP2's post-forward groups for an integer `reshard_after_forward`, and
    any a library makes. Without it those got torch's default (30 minutes for gloo, 10 for NCCL),
    and a rank stuck in one of them kept its peers waiting past `dist.timeout_s`. DeviceMesh and
    FSDP2 take no timeout; torch reads the default from these two module constants each time it
    creates a group (`distributed_c10d._get_default_timeout`), so they are the one place to set it.
    tests/unit/test_checkpointer.py reads the timeouts back, so a torch that changes this fails there."""
    c10d = dist.distributed_c10d
    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout


def build_mesh(device: torch.device, world_size: int, args: DistArgs, launch: LaunchEnv) -> DeviceMesh:
    """The data-parallel mesh: 1-D ("dp") when one shard group spans every rank (FSDP), else 2-D
    ("replicate", "shard") for HSDP. Consecutive ranks share a shard group, so with the default
    group of one node the shard dimension stays inside a node."""
    shard = shard_group_size(args.shard_group_size, launch) if args.strategy == "fsdp2" else world_size
    if shard >= world_size:
        return init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))
    return init_device_mesh(device.type, (world_size // shard, shard), mesh_dim_names=("replicate", "shard"))


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over ranks, in float64 so sample counts stay exact (one host read)."""
    return read_floats([reduce_tensor_(torch.tensor(values, dtype=torch.float64, device=device))])


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    return read_floats([reduce_tensor_(t, dist.ReduceOp.MAX)])


def reduce_tensor_(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce `t` in place and return it, with no host read: on NCCL the reduction is queued
    on the device, and whoever needs the value reads it later (sd_train.host_sync)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


def all_gather_object(obj: object) -> list[object]:
    """Every rank's `obj`, by rank; `[obj]` in a process with no group (offline tools)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
