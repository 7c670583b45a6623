"""What the Langevin noise (`optim.langevin`, sd_train.langevin) costs per step, against the
optimizer step and against one `normal_` of the same number of elements.

    .venv/bin/python bench/bench_langevin.py [--sizes tiny,30m] [--world 1] [--reps 10] [--threads 1]

One process. For each UNet size: random gradients, then timed round-robin (benchlib.interleaved):
- `adamw`: the fused AdamW step over the parameters (the CPU default, sd_train.perf);
- `noise`: `ChunkedNoise.add_` over this rank's pieces, as `--world` ranks would hold them (each
  parameter cut into ceil(numel / world) flat pieces, the piece of rank 0 kept; world 1: the whole
  parameters), i.e. the seeding, `normal_` per chunk and the add;
- `randn`: one `normal_` into a buffer of the pieces' total elements (the floor: the random numbers
  alone, no seeding, no add);
- `add`: one foreach add of preallocated noise into the pieces (the memory pass alone).
The goal (issue: at most one pass over the local shard, <= 1.2x a same-bytes randn): noise / randn.

It also prints, from the parameter shapes alone (meta tensors, nothing allocated), how many elements
a rank generates per element it holds for SD2-base at world 8 and 64: chunks cut by a piece's edges
are generated whole, so small pieces cost more than their size.
"""

from __future__ import annotations

import argparse
import math
import sys

import benchlib
import torch

from sd_train.langevin import CHUNK, ChunkedNoise, NoisePiece


def pieces_of(params: dict[str, torch.Tensor], world: int) -> list[NoisePiece]:
    """Rank 0's flat piece of every parameter at `world` ranks (ZeRO-3's partitioning)."""
    out = []
    for name, p in params.items():
        per = math.ceil(p.numel() / world)
        out.append(NoisePiece(name, p.numel(), 0, p.detach().view(-1)[:per]))
    return out


def generated_per_held(shapes: list[torch.Size], world: int, chunk: int = CHUNK) -> float:
    """Elements generated per element held, summed over every rank, for flat pieces at `world`."""
    held = generated = 0
    for shape in shapes:
        numel = math.prod(shape)
        per = math.ceil(numel / world)
        for r in range(world):
            lo, hi = r * per, min(numel, (r + 1) * per)
            if hi <= lo:
                continue
            held += hi - lo
            for k in range(lo // chunk, (hi - 1) // chunk + 1):
                generated += min(chunk, numel - k * chunk)
    return generated / held


def measure(size: str, world: int, warmup: int, reps: int) -> dict:
    unet = benchlib.build_unet(size, latent_size=16)
    params = {n: p for n, p in unet.named_parameters()}
    for p in params.values():
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(list(params.values()), lr=1e-4, fused=True)
    pieces = pieces_of(params, world)
    local = sum(pc.local.numel() for pc in pieces)
    noise = ChunkedNoise(seed=0)
    buf = torch.empty(local)
    added = [torch.randn(pc.local.numel()) for pc in pieces]
    step = iter(range(1, 10**9))
    fns = {
        "adamw": opt.step,
        "noise": lambda: noise.add_(pieces, next(step), 1e-4),
        "randn": lambda: buf.normal_(),
        "add": lambda: torch._foreach_add_([pc.local for pc in pieces], added, alpha=1e-4),
    }
    times = {k: benchlib.median_ms(v) for k, v in benchlib.interleaved(fns, warmup, reps).items()}
    return {
        "size": size,
        "params": benchlib.count_params(unet),
        "tensors": len(params),
        "world": world,
        "local_elements": local,
        **{f"{k}_ms": v for k, v in times.items()},
        "noise_vs_randn": times["noise"] / times["randn"],
        "noise_vs_adamw": times["noise"] / times["adamw"],
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,30m")
    p.add_argument("--world", type=int, default=1, help="measure rank 0's pieces at this world size")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    load = benchlib.load_average()
    rows = [measure(s, ns.world, ns.warmup, ns.reps) for s in ns.sizes.split(",")]
    cols = ["size", "params", "tensors", "world", "adamw_ms", "noise_ms", "randn_ms", "add_ms", "noise_vs_randn"]
    benchlib.print_table(cols, [[r[c] for c in cols] for r in rows])
    with torch.device("meta"):
        sd2 = benchlib.build_unet("sd2_base", latent_size=32, device="meta")
    shapes = [p.shape for p in sd2.parameters()]
    overhead = {f"sd2_base_world{w}": generated_per_held(shapes, w) for w in (1, 8, 64)}
    print(f"SD2-base, elements generated per element held (chunk {CHUNK}): " + ", ".join(
        f"world {k.rsplit('world', 1)[1]} {v:.3f}" for k, v in overhead.items()
    ))  # fmt: skip
    print(f"load average before: {load:.1f}")
    benchlib.emit_json("langevin", {"chunk": CHUNK, "threads": ns.threads, "load": load, "rows": rows, **overhead})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
