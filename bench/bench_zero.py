"""DeepSpeed ZeRO-3 / ZeRO-2 vs sd_train's FSDP2 at world size 2: step time, EMA update time and
EMA bytes per rank, same UNet and batches.

    .venv/bin/python bench/bench_zero.py [--sizes tiny,30m] [--batch 4] [--latent 32] [--reps 3] [--warmup 1]

Relaunches itself under torchrun (2 ranks, gloo, one thread per rank). For each UNet size both ranks
build the same weights three times: sharded by `sd_train.parallel.build.shard_unet` (FSDP2), and wrapped
by `deepspeed.initialize` with the config `sd_train.parallel.deepspeed.deepspeed_config` derives (stage 3, then
stage 2; the engine `Accelerator.prepare` builds in training, made directly here because accelerate
holds one DeepSpeed engine per process). A step is forward, epsilon MSE, backward, clip at 1.0,
AdamW; the three alternate steps on the same per-rank batches, a barrier before each timed step,
median over `--reps`. Then each gets a `ShardedEMA` with its layout (FSDP2 local shards, ZeRO-3
`ds_tensor` pieces re-read every update, ZeRO-2 replicated params), timed over `--reps` updates.

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import benchlib
import torch
import torch.distributed as dist
import torch.nn.functional as F
from bench_step import make_batches


class Stepper:
    def __init__(self, model: torch.nn.Module, batches, engine=None):
        self.model = model
        self.engine = engine
        self.optimizer = None if engine is not None else torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.batches = batches
        self.losses: list[float] = []

    def __call__(self) -> None:
        x, t, text, noise = self.batches[len(self.losses) % len(self.batches)]
        if self.engine is not None:
            loss = F.mse_loss(self.engine(x + noise, t, encoder_hidden_states=text).sample, noise)
            self.engine.backward(loss)
            self.engine.step()  # clips (gradient_clipping: 1.0) and steps
        else:
            self.optimizer.zero_grad(set_to_none=True)
            loss = F.mse_loss(self.model(x + noise, t, encoder_hidden_states=text).sample, noise)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            self.optimizer.step()
        self.losses.append(float(loss.detach()))


def zero_engine(size: str, latent: int, stage: int, batch: int, info):
    import deepspeed

    from sd_train.config import TrainConfig
    from sd_train.parallel.deepspeed import _prepare_environment, deepspeed_config

    _prepare_environment(info)
    cfg = TrainConfig()
    cfg.dist.strategy, cfg.dist.zero_stage = "deepspeed", stage
    cfg.micro_batch_size, cfg.global_batch_size = batch, batch * info.world_size
    unet = benchlib.build_unet(size, latent, seed=0)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=unet, optimizer=optimizer, config=deepspeed_config(cfg, info.world_size, 1))
    return engine


def ema_for(module: torch.nn.Module, layout) -> Any:
    from sd_train.config import EMAArgs
    from sd_train.ema.plan import plan_from_config
    from sd_train.ema.sharded import ShardedEMA

    ema = ShardedEMA(
        module, plan_from_config(EMAArgs(decay=0.9999, step_start_ema=0, tolerance=1.0), max_steps=10), layout
    )
    ema.update(0)  # opens the window: allocates the shadow
    return ema


def bench_size(size: str, batch: int, latent: int, warmup: int, reps: int, info: Any) -> dict[str, Any]:
    from sd_train.config import DistArgs
    from sd_train.parallel.build import shard_unet
    from sd_train.parallel.deepspeed import ReplicatedLayout, Zero3Layout

    batches = make_batches(size, batch, latent, warmup + reps, info.rank)
    fsdp = shard_unet(benchlib.build_unet(size, latent, seed=0), DistArgs(strategy="fsdp2"), info)
    z3 = zero_engine(size, latent, 3, batch, info)
    z2 = zero_engine(size, latent, 2, batch, info)
    steppers = {
        "FSDP2": Stepper(fsdp, batches),
        "ZeRO-3": Stepper(z3.module, batches, z3),
        "ZeRO-2": Stepper(z2.module, batches, z2),
    }
    times = benchlib.interleaved(steppers, warmup, reps, sync=dist.barrier)
    emas = {
        "FSDP2": ema_for(fsdp, None),
        "ZeRO-3": ema_for(z3.module, Zero3Layout()),
        "ZeRO-2": ema_for(z2.module, ReplicatedLayout()),
    }
    counter = {"n": 0}

    def updater(ema):
        def go():
            counter["n"] += 1
            ema.update(counter["n"])

        return go

    ema_times = benchlib.interleaved({k: updater(e) for k, e in emas.items()}, warmup=2, reps=max(reps, 10))
    losses = {name: s.losses for name, s in steppers.items()}
    return {
        "params": benchlib.count_params(z2.module),
        "ms": {name: benchlib.median_ms(t) for name, t in times.items()},
        "ema_ms": {name: benchlib.median_ms(t) for name, t in ema_times.items()},
        "ema_bytes": {name: e.local_bytes() for name, e in emas.items()},
        "max_loss_diff_vs_fsdp2": {
            n: max(abs(x - y) for x, y in zip(losses["FSDP2"], losses[n])) for n in ("ZeRO-3", "ZeRO-2")
        },
    }


def worker(sizes: list[str], batch: int, latent: int, warmup: int, reps: int) -> None:
    from sd_train.config import DistArgs
    from sd_train.parallel.process_group import (
        all_gather_object,
        destroy,
        init_distributed,
    )

    info = init_distributed(DistArgs())
    mine = {size: bench_size(size, batch, latent, warmup, reps, info) for size in sizes}
    ranks = all_gather_object(mine)
    if info.is_main:
        benchlib.emit_worker_result({"ranks": ranks})
    destroy()


def report(result: dict[str, Any], args: argparse.Namespace, load_before: float) -> None:
    ranks = result["ranks"]
    print(
        f"\nworld 2 (gloo, 1 thread per rank), batch {args.batch} per rank, {args.latent}x{args.latent} latents; "
        f"median of {args.reps} steps, slowest rank"
    )
    rows = []
    for size in ranks[0]:
        r0 = ranks[0][size]
        ms = {name: max(r[size]["ms"][name] for r in ranks) for name in r0["ms"]}
        ema = {name: max(r[size]["ema_ms"][name] for r in ranks) for name in r0["ema_ms"]}
        for name in ms:
            diff = max(r[size]["max_loss_diff_vs_fsdp2"].get(name, 0.0) for r in ranks)
            rows.append(
                [
                    f"{size} ({r0['params'] / 1e6:.2f}M)",
                    name,
                    ms[name],
                    ms[name] / ms["FSDP2"],
                    ema[name],
                    r0["ema_bytes"][name] / 2**20,
                    f"{diff:.1e}",
                ]
            )
    benchlib.print_table(
        ["UNet", "path", "ms/step", "/ FSDP2", "EMA update ms", "EMA MiB/rank", "max |loss diff| vs FSDP2"], rows
    )
    load_after = benchlib.load_average()
    print(f"\nload average (1 min): {load_before:.2f} before, {load_after:.2f} after (2 shared cores)")
    benchlib.emit_json(
        "zero",
        {
            "batch_per_rank": args.batch,
            "latent": args.latent,
            "reps": args.reps,
            **result,
            "load_avg_1m_before": load_before,
            "load_avg_1m_after": load_after,
        },
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sizes", default="tiny,30m", help=f"comma-separated UNet configs from {sorted(benchlib.UNET_CONFIGS)}"
    )
    p.add_argument("--batch", type=int, default=4, help="samples per rank per step")
    p.add_argument("--latent", type=int, default=32, help="latent height and width")
    p.add_argument("--reps", type=int, default=3, help="timed steps per path")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per path first")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set by the torchrun relaunch
    args = p.parse_args(argv)
    return benchlib.sizes_main(p, args, os.path.abspath(__file__), worker, report)


if __name__ == "__main__":
    sys.exit(main())
