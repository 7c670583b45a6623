"""Training step time at world size 2: sd_train's FSDP2 path (today's and the new hot path) vs a
plain DDP loop, same UNet and batch, with the time of each phase of the step.

    .venv/bin/python bench/bench_step.py [--sizes tiny,30m] [--batch 4] [--latent 32] [--reps 3] [--warmup 1]

Relaunches itself under torchrun (2 ranks, gloo, one thread per rank). For each UNet size both
ranks build the same weights twice: once sharded by `sd_train.parallel.build.shard_unet` (FSDP2 on
every down/mid/up block and the root), once wrapped in `torch.nn.parallel.DistributedDataParallel`
(what `Accelerator.prepare` gives under MULTI_CPU). A step is what the trainer does: forward,
epsilon MSE loss, backward, global grad-norm clip at 1.0, AdamW. The two models alternate steps on
the same per-rank batches (`--batch` samples of `--latent`^2 latents, 77 random text tokens), a
barrier before each timed step; ms/step is the median over `--reps` after `--warmup`. The losses
of the two paths are compared too: data parallelism must not change the numbers.

Paths: "FSDP2 today" (foreach AdamW, the loss read every step: what the loop did before the hot
path), "FSDP2 new" (the hot path with foreach AdamW, the CPU default when this bench was written, and
no per-step loss read), "FSDP2 new, fused" (`perf.optimizer_impl=fused`, the default on CPU and CUDA),
"FSDP2 new, fused, no reshard" (plus `dist.reshard_after_forward=false`: no second all-gather per
block in backward) and "DDP". Each step is timed by phase (forward, backward, clip, optimizer), on
the host clock, so the table says where the FSDP2 overhead goes.

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import benchlib
import torch
import torch.distributed as dist
import torch.nn.functional as F

from sd_train.config import OptimArgs
from sd_train.optim import build_optimizer

TEXT_TOKENS = 77


def make_batches(size: str, batch: int, latent: int, count: int, rank: int) -> list[tuple[torch.Tensor, ...]]:
    """`count` fixed batches of (latents, timesteps, text states, noise); different on each rank."""
    cross = benchlib.UNET_CONFIGS[size]["cross_attention_dim"]
    g = torch.Generator().manual_seed(1000 + rank)
    return [
        (
            torch.randn(batch, 4, latent, latent, generator=g),
            torch.randint(0, 1000, (batch,), generator=g),
            torch.randn(batch, TEXT_TOKENS, cross, generator=g),
            torch.randn(batch, 4, latent, latent, generator=g),
        )
        for _ in range(count)
    ]


PHASES = ("forward", "backward", "clip", "optimizer")


class Stepper:
    """One model + optimizer walking through the same batches as its rivals."""

    def __init__(self, model: torch.nn.Module, batches: list[tuple[torch.Tensor, ...]], fused: bool, read_loss: bool):
        self.model = model
        self.optimizer = build_optimizer(model, OptimArgs(lr=1e-4, weight_decay=0.01), fused=fused)
        self.batches = batches
        self.read_loss = read_loss
        self.losses: list[torch.Tensor] = []
        self.phase_s: dict[str, list[float]] = {p: [] for p in PHASES}

    def __call__(self) -> None:
        x, t, text, noise = self.batches[len(self.losses) % len(self.batches)]
        clock = [time.perf_counter()]

        def lap(phase: str) -> None:
            clock.append(time.perf_counter())
            self.phase_s[phase].append(clock[-1] - clock[-2])

        self.optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(self.model(x + noise, t, encoder_hidden_states=text).sample, noise)
        lap("forward")
        loss.backward()
        lap("backward")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        # FSDP2 returns the norm as a DTensor; reading it is the trainer's non-finite check.
        float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        lap("clip")
        self.optimizer.step()
        lap("optimizer")
        if self.read_loss:  # today's loop read the loss on the host every step
            float(loss.detach())
        self.losses.append(loss.detach())


def bench_size(size: str, batch: int, latent: int, warmup: int, reps: int, info: Any) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    from sd_train.config import DistArgs
    from sd_train.parallel.build import shard_unet

    batches = make_batches(size, batch, latent, warmup + reps, info.rank)

    def fsdp(**dist_args: Any) -> torch.nn.Module:
        return shard_unet(benchlib.build_unet(size, latent, seed=0), DistArgs(**dist_args), info)

    ddp = DistributedDataParallel(benchlib.build_unet(size, latent, seed=0))
    steppers = {
        "FSDP2 today": Stepper(fsdp(), batches, fused=False, read_loss=True),
        "FSDP2 new": Stepper(fsdp(), batches, fused=False, read_loss=False),
        "FSDP2 new, fused": Stepper(fsdp(), batches, fused=True, read_loss=False),
        "FSDP2 new, fused, no reshard": Stepper(
            fsdp(reshard_after_forward=False), batches, fused=True, read_loss=False
        ),
        "DDP": Stepper(ddp, batches, fused=False, read_loss=True),
    }
    times = benchlib.interleaved(steppers, warmup, reps, sync=dist.barrier)
    reference = steppers["DDP"].losses
    return {
        "params": benchlib.count_params(ddp.module),
        "ms": {name: benchlib.median_ms(t) for name, t in times.items()},
        "phase_ms": {
            name: {p: benchlib.median_ms(v[warmup:]) for p, v in s.phase_s.items()} for name, s in steppers.items()
        },
        "max_loss_diff": {
            name: max(abs(float(x) - float(y)) for x, y in zip(s.losses, reference)) for name, s in steppers.items()
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
        ms = {name: max(r[size]["ms"][name] for r in ranks) for name in ranks[0][size]["ms"]}
        label = f"{size} ({ranks[0][size]['params'] / 1e6:.2f}M)"
        for name, value in ms.items():
            phases = [max(r[size]["phase_ms"][name][p] for r in ranks) for p in PHASES]
            loss_diff = max(r[size]["max_loss_diff"][name] for r in ranks)
            rows.append([label, name, value, value / ms["DDP"], value / ms["FSDP2 today"], *phases, f"{loss_diff:.1e}"])
    benchlib.print_table(
        ["UNet", "path", "ms/step", "/ DDP", "/ today", *(f"{p} ms" for p in PHASES), "max |loss - DDP|"], rows
    )
    load_after = benchlib.load_average()
    print(f"\nload average (1 min): {load_before:.2f} before, {load_after:.2f} after (2 shared cores)")
    benchlib.emit_json(
        "step",
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
