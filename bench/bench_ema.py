"""EMA update time and EMA memory: sd_train's ShardedEMA vs diffusers' EMAModel vs the memory floor.

    .venv/bin/python bench/bench_ema.py [--size 200m] [--reps 7] [--warmup 2] [--world 1,2] [--threads 1]

One command gives both world sizes. World 1 runs in this process on the plain (unwrapped) UNet,
the module diffusers' EMAModel is made for, with `--threads` torch threads (default 1: on a loaded
2-core machine two threads spend their time waiting for each other). World 2 is relaunched under
torchrun with one thread per rank, FSDP2 via sd_train's own `init_distributed` + `shard_unet`.
Per EMA update, median of `--reps` after `--warmup`, the candidates interleaved round-robin so
load drift on a shared machine hits them all alike:

- floor: `torch._foreach_copy_` of the same bytes (this rank's parameters, or local shards under
  FSDP2) into preallocated buffers: no update can move fewer bytes;
- ShardedEMA: `sd_train.ema.sharded.ShardedEMA.update` with `step_start_ema=0`, so every call updates;
- diffusers foreach / loop: `diffusers.training_utils.EMAModel.step` with foreach=True / False
  (decay 0.9999, no warmup). World 1 only: EMAModel has no FSDP path (it would lerp DTensors, or
  under ZeRO-3 gather every parameter), so there is no honest per-shard figure for it.

Memory: per-rank EMA bytes before the window opens (ShardedEMA allocates nothing) and inside it
(`ShardedEMA.local_bytes()`), next to diffusers' shadow, which exists from construction on.
Prints a table per world size and one JSON line. `--size 30m` or `tiny` for a quicker look.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable
from typing import Any

import benchlib
import torch

from sd_train.config import EMAArgs
from sd_train.ema.plan import plan_from_config
from sd_train.ema.sharded import ShardedEMA
from sd_train.parallel.fsdp import DTensorLayout

DECAY = 0.9999
LATENT_SIZE = 32  # only sets the UNet's sample_size config; the EMA never runs the model


def every_step_ema(model: torch.nn.Module) -> ShardedEMA:
    """A ShardedEMA whose window opens at step 0 (max_steps large enough for the decay's check)."""
    plan = plan_from_config(EMAArgs(decay=DECAY, step_start_ema=0), max_steps=1_000_000)
    plan.check()
    return ShardedEMA(model, plan, DTensorLayout(model))


class StepCounter:
    """Calls `ema.update(step)` with the next step each time, as the training loop does."""

    def __init__(self, ema: ShardedEMA):
        self.ema = ema
        self.step = 0
        ema.update(0)  # opens the window (copies the weights); later calls update

    def __call__(self) -> None:
        self.step += 1
        self.ema.update(self.step)


def floor_copy(sources: list[torch.Tensor]) -> Callable[[], None]:
    """The memory floor: copy the same bytes an update reads into buffers allocated up front."""
    dst = [torch.empty_like(t) for t in sources]

    def run() -> None:
        torch._foreach_copy_(dst, sources)

    return run


def world1(size: str, warmup: int, reps: int) -> dict[str, Any]:
    from diffusers.training_utils import EMAModel

    unet = benchlib.build_unet(size, LATENT_SIZE)
    params = [p for p in unet.parameters() if p.requires_grad]
    locals_ = [p.detach() for p in params]
    ema = every_step_ema(unet)
    bytes_before = ema.local_bytes()
    counter = StepCounter(ema)
    ema_foreach = EMAModel(unet.parameters(), decay=DECAY, use_ema_warmup=False, foreach=True)
    ema_loop = EMAModel(unet.parameters(), decay=DECAY, use_ema_warmup=False, foreach=False)
    fns = {
        "floor (_foreach_copy_)": floor_copy(locals_),
        "ShardedEMA.update": counter,
        "diffusers EMAModel foreach=True": lambda: ema_foreach.step(params),
        "diffusers EMAModel foreach=False": lambda: ema_loop.step(params),
    }
    with torch.no_grad():
        times = benchlib.interleaved(fns, warmup, reps)
    return {
        "params": benchlib.count_params(unet),
        "param_bytes": benchlib.param_bytes(locals_),
        "threads": torch.get_num_threads(),
        "ms": {name: benchlib.median_ms(t) for name, t in times.items()},
        "ema_bytes_before_window": bytes_before,
        "ema_bytes_inside_window": ema.local_bytes(),
        "diffusers_ema_bytes_from_init": benchlib.param_bytes(ema_foreach.shadow_params),
    }


def world2_worker(size: str, warmup: int, reps: int) -> None:
    """Runs on every rank under torchrun; rank 0 reports every rank's figures."""
    import torch.distributed as dist

    from sd_train.config import DistArgs
    from sd_train.parallel.build import shard_unet
    from sd_train.parallel.process_group import (
        all_gather_object,
        destroy,
        init_distributed,
    )

    info = init_distributed(DistArgs())
    unet = shard_unet(benchlib.build_unet(size, LATENT_SIZE), DistArgs(), info)
    locals_ = [p.to_local().detach() for p in unet.parameters() if p.requires_grad]
    ema = every_step_ema(unet)
    bytes_before = ema.local_bytes()
    fns = {"floor (_foreach_copy_)": floor_copy(locals_), "ShardedEMA.update": StepCounter(ema)}
    with torch.no_grad():
        times = benchlib.interleaved(fns, warmup, reps, sync=dist.barrier)
    mine = {
        "rank": info.rank,
        "threads": torch.get_num_threads(),
        "local_param_bytes": benchlib.param_bytes(locals_),
        "ms": {name: benchlib.median_ms(t) for name, t in times.items()},
        "ema_bytes_before_window": bytes_before,
        "ema_bytes_inside_window": ema.local_bytes(),
    }
    ranks = all_gather_object(mine)
    if info.is_main:
        benchlib.emit_worker_result({"params": benchlib.count_params(unet), "ranks": ranks})
    destroy()


def report(w1: dict[str, Any] | None, w2: dict[str, Any] | None, size: str, load_before: float) -> None:
    out: dict[str, Any] = {
        "size": size,
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": benchlib.load_average(),
    }
    if w1 is not None:
        floor = w1["ms"]["floor (_foreach_copy_)"]
        print(f"\nworld 1: {w1['params']:,} params ({w1['param_bytes'] / 2**20:.0f} MiB fp32), {w1['threads']} threads")
        benchlib.print_table(
            ["per EMA update", "median ms", "x floor"], [[n, ms, ms / floor] for n, ms in w1["ms"].items()]
        )
        out["world1"] = {**w1, "ratio_vs_floor": {n: ms / floor for n, ms in w1["ms"].items()}}
    if w2 is not None:
        print(
            f"\nworld 2 (FSDP2, gloo, 1 thread per rank): {w2['params']:,} params; diffusers EMAModel: no "
            "FSDP path, not run"
        )
        rows = []
        for r in w2["ranks"]:
            floor = r["ms"]["floor (_foreach_copy_)"]
            rows += [[f"rank {r['rank']}: {n}", ms, ms / floor] for n, ms in r["ms"].items()]
        benchlib.print_table(["per EMA update", "median ms", "x floor"], rows)
        out["world2"] = w2
    print("\nEMA bytes per rank (MiB)")
    rows = []
    if w1 is not None:
        rows.append(
            [
                "world 1",
                w1["ema_bytes_before_window"] / 2**20,
                w1["ema_bytes_inside_window"] / 2**20,
                w1["diffusers_ema_bytes_from_init"] / 2**20,
            ]
        )
    if w2 is not None:
        for r in w2["ranks"]:
            rows.append(
                [
                    f"world 2 rank {r['rank']}",
                    r["ema_bytes_before_window"] / 2**20,
                    r["ema_bytes_inside_window"] / 2**20,
                    "n/a (no FSDP path)",
                ]
            )
    benchlib.print_table(
        ["", "ShardedEMA before window", "ShardedEMA inside window", "diffusers EMAModel (from init)"], rows
    )
    print(f"\nload average (1 min): {load_before:.2f} before, {out['load_avg_1m_after']:.2f} after (2 shared cores)")
    benchlib.emit_json("ema", out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--size", choices=sorted(benchlib.UNET_CONFIGS), default="200m", help="UNet config (see bench/benchlib.py)"
    )
    p.add_argument("--reps", type=int, default=7, help="timed updates per candidate")
    p.add_argument("--warmup", type=int, default=2, help="untimed updates per candidate first")
    p.add_argument("--world", default="1,2", help="world sizes to run: 1, 2 or 1,2")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the world-1 part (world 2: one per rank)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set by the torchrun relaunch
    args = p.parse_args(argv)
    if args.worker:
        world2_worker(args.size, args.warmup, args.reps)
        return 0
    worlds = {int(w) for w in args.world.split(",")}
    if not worlds <= {1, 2}:
        p.error("--world takes 1, 2 or 1,2")
    load_before = benchlib.load_average()
    torch.set_num_threads(args.threads)
    w1 = world1(args.size, args.warmup, args.reps) if 1 in worlds else None
    gc.collect()  # free the world-1 model and shadows before the two ranks build theirs
    w2 = None
    if 2 in worlds:
        w2 = benchlib.run_torchrun(
            os.path.abspath(__file__),
            ["--worker", "--size", args.size, "--reps", str(args.reps), "--warmup", str(args.warmup)],
        )
    report(w1, w2, args.size, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
