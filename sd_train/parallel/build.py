"""Choose the Strategy of a resolved config, and record what it really did (topology.json)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from sd_train.config import DistArgs, PerfArgs, TrainConfig
from sd_train.model.family import DEFAULT_FSDP_UNITS, unet_family
from sd_train.model.parallelize import block_layers, fsdp_units
from sd_train.parallel.deepspeed import DeepSpeedStrategy
from sd_train.parallel.fsdp import FSDPStrategy
from sd_train.parallel.process_group import DistInfo, all_gather_object
from sd_train.parallel.strategy import Strategy


def build_strategy(cfg: TrainConfig, info: DistInfo, accum: int) -> Strategy:
    """`dist.strategy` is resolved by preflight: fsdp2, ddp or deepspeed, never auto."""
    if cfg.dist.strategy == "deepspeed":
        return DeepSpeedStrategy(cfg, info, accum)
    return FSDPStrategy(cfg.dist, info, cfg.optim.max_grad_norm, fsdp_units, cfg.perf, block_layers)


def shard_unet(
    unet: torch.nn.Module, args: DistArgs, info: DistInfo, perf: Optional[PerfArgs] = None
) -> torch.nn.Module:
    """The UNet wrapped exactly as a training run wraps it (FSDP2 per block, then the root; or
    DDP; compiled per block with `perf.compile`), for benchmarks and tests that build their own
    optimizer. `dist.fsdp_units=auto` (which preflight resolves for a run) takes the UNet's family default."""
    if args.fsdp_units == "auto":
        args = dataclasses.replace(args, fsdp_units=DEFAULT_FSDP_UNITS[unet_family(dict(unet.config))])
    return FSDPStrategy(args, info, 0.0, fsdp_units, perf, block_layers).wrap_model(unet)


def write_topology(path: Path, strategy: Strategy, info: DistInfo, run: dict) -> None:
    """Gather every rank's layout (world size, placements, local bytes) and write it from the main
    process: accelerate can silently run unsharded, so a run states what it did. Collective."""
    ranks = all_gather_object({"rank": info.rank, **strategy.topology()})
    if info.is_main:
        topo = {
            "world_size": info.world_size,
            "backend": dist.get_backend(),
            "strategy": run["strategy"],
            "zero_stage": run["zero_stage"],
            "device": str(info.device),
            "grad_accum_steps": run["grad_accum_steps"],
            # ("dp",) for FSDP/DDP/DeepSpeed over every rank; ("replicate", "shard") for HSDP.
            "mesh": dict(zip(info.mesh.mesh_dim_names, info.mesh.mesh.shape)),
            "ranks": ranks,
        }
        Path(path).write_text(json.dumps(topo, indent=1))
