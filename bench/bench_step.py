"""Training step time at world size 2: sd_train's FSDP2 path vs a plain DDP loop, same UNet and batch.

    .venv/bin/python bench/bench_step.py [--sizes tiny,30m] [--batch 4] [--latent 32] [--reps 3] [--warmup 1]

Relaunches itself under torchrun (2 ranks, gloo, one thread per rank). For each UNet size both
ranks build the same weights twice: once sharded by `sd_train.parallel.build.shard_unet` (FSDP2 on
every down/mid/up block and the root), once wrapped in `torch.nn.parallel.DistributedDataParallel`
(what `Accelerator.prepare` gives under MULTI_CPU). A step is what the trainer does: forward,
epsilon MSE loss, backward, global grad-norm clip at 1.0, AdamW. The two models alternate steps on
the same per-rank batches (`--batch` samples of `--latent`^2 latents, 77 random text tokens), a
barrier before each timed step; ms/step is the median over `--reps` after `--warmup`. The losses
of the two paths are compared too: data parallelism must not change the numbers.

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


class Stepper:
    """One model + optimizer walking through the same batches as its rival."""

    def __init__(self, model: torch.nn.Module, batches: list[tuple[torch.Tensor, ...]]):
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.batches = batches
        self.losses: list[float] = []

    def __call__(self) -> None:
        x, t, text, noise = self.batches[len(self.losses) % len(self.batches)]
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(self.model(x + noise, t, encoder_hidden_states=text).sample, noise)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        # FSDP2 returns the norm as a DTensor; reading it is the trainer's non-finite check.
        float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        self.losses.append(float(loss.detach()))


def bench_size(size: str, batch: int, latent: int, warmup: int, reps: int, info: Any) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    from sd_train.config import DistArgs
    from sd_train.parallel.build import shard_unet

    batches = make_batches(size, batch, latent, warmup + reps, info.rank)
    fsdp = shard_unet(benchlib.build_unet(size, latent, seed=0), DistArgs(), info)
    ddp = DistributedDataParallel(benchlib.build_unet(size, latent, seed=0))
    steppers = {"FSDP2 (sd_train shard_unet)": Stepper(fsdp, batches), "DDP (torch)": Stepper(ddp, batches)}
    times = benchlib.interleaved(steppers, warmup, reps, sync=dist.barrier)
    losses = {name: s.losses for name, s in steppers.items()}
    a, b = losses.values()
    return {
        "params": benchlib.count_params(ddp.module),
        "ms": {name: benchlib.median_ms(t) for name, t in times.items()},
        "max_loss_diff": max(abs(x - y) for x, y in zip(a, b)),
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
        fsdp, ddp = ms.values()
        loss_diff = max(r[size]["max_loss_diff"] for r in ranks)
        rows.append([f"{size} ({ranks[0][size]['params'] / 1e6:.2f}M)", fsdp, ddp, fsdp / ddp, f"{loss_diff:.1e}"])
    benchlib.print_table(["UNet", "FSDP2 ms/step", "DDP ms/step", "FSDP2 / DDP", "max |loss diff|"], rows)
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
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in benchlib.UNET_CONFIGS]
    if unknown:
        p.error(f"--sizes: unknown {unknown}; pick from {sorted(benchlib.UNET_CONFIGS)}")
    if args.worker:
        worker(sizes, args.batch, args.latent, args.warmup, args.reps)
        return 0
    load_before = benchlib.load_average()
    flags = [
        "--sizes",
        args.sizes,
        "--batch",
        str(args.batch),
        "--latent",
        str(args.latent),
        "--reps",
        str(args.reps),
        "--warmup",
        str(args.warmup),
    ]
    report(benchlib.run_torchrun(os.path.abspath(__file__), ["--worker", *flags]), args, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
