"""Process group, device mesh and UNet sharding.

We apply FSDP2 (`fully_shard`) ourselves instead of through `Accelerator.prepare`: accelerate
enables FSDP only for GPU setups and silently runs unsharded on CPU, so going through it would make
the CPU tests exercise a different path than the GPU runs. `accelerate launch` and `torchrun` are
used only to start the processes; both set RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT.
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

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(args: DistArgs) -> DistInfo:
    """Join (or, for a plain `python train.py`, create a one-process) process group.

    One process still gets a process group and a 1-device mesh, so that a single CPU run goes
    through the same FSDP2 and DCP code as a 64-GPU job.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and args.backend != "gloo"
    backend = args.backend if args.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=args.timeout_s),
            device_id=device if backend == "nccl" else None,
        )
    mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))
    return DistInfo(rank, world_size, local_rank, device, mesh)


def shard_unet(unet: torch.nn.Module, args: DistArgs, info: DistInfo) -> torch.nn.Module:
    """Wrap the UNet for data parallelism: FSDP2 on each down/mid/up block and then the root, or DDP.

    Sharding per block means one block's full parameters exist at a time during forward/backward;
    the root wrap takes the rest (conv_in/out, time and class embeddings)."""
    if args.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(unet, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if args.strategy == "deepspeed":
        raise ValueError("dist.strategy=deepspeed: the DeepSpeed engine wraps the UNet (sd_train.zero.ZeroEngine), not shard_unet")
    # "auto" reaches here only from code that builds DistArgs itself (tests, benchmarks): config
    # validation resolves it, and outside accelerate's DeepSpeed launcher it means fsdp2.
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=DTYPES[args.param_dtype], reduce_dtype=DTYPES[args.reduce_dtype])
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    for block in blocks:
        if block is not None:
            fully_shard(block, mesh=info.mesh, reshard_after_forward=args.reshard_after_forward, mp_policy=mp)
    # The root's params are needed again right at the start of backward: keep them gathered.
    fully_shard(unet, mesh=info.mesh, reshard_after_forward=False, mp_policy=mp)
    return unet


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The UNet itself (DDP wraps it in `.module`; FSDP2 keeps the module, with a new class)."""
    return getattr(model, "module", model)


def set_grad_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Skip the gradient reduction on all but the last micro-batch of an accumulation."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    elif hasattr(model, "require_backward_grad_sync"):  # DDP
        model.require_backward_grad_sync = enabled


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over ranks, in float64 so sample counts stay exact."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_gather_object(obj: object) -> list[object]:
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
