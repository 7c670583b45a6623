"""Whole-run cost of the EMA: the same short training loop with no EMA, an EMA over the whole run,
and sd_train's late window (the last 3.5%).

    .venv/bin/python bench/bench_run_ema.py [--size 30m] [--steps 30] [--batch 2] [--latent 8] [--threads 1]

One process, sd_train's own world-1 path (a 1-process group, FSDP2 via `shard_unet`), three
identical UNets (same seed) and the same batches. Each variant owns a `ShardedEMA` with its plan:

- no EMA: `ema.enabled=false`;
- whole run: `ema.step_start_ema=0`;
- late window: `ema.window_fraction=0.035` (of `--steps`);

with the largest decay the late window allows (decay^N <= ema.tolerance), so every plan passes
sd_train's startup check. The loop is forward, loss, backward, AdamW, then `ema.update(step)`, as
in the trainer. The three runs advance in lockstep (step k of each, order rotated every step), so
a load change on the shared machine hits all three alike; each variant's wall time is the sum of
its own steps. The time inside `ema.update` is summed separately: the whole-run difference is
within the noise for small overheads, the summed update time is not.

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import benchlib
import torch
import torch.nn.functional as F

from sd_train.config import DistArgs, EMAArgs
from sd_train.ema.plan import EMAPlan, plan_from_config
from sd_train.ema.sharded import ShardedEMA
from sd_train.parallel.build import shard_unet
from sd_train.parallel.fsdp import DTensorLayout
from sd_train.parallel.process_group import destroy, init_distributed
from sd_train.tools.quality import LATE_WINDOW_FRACTION, largest_safe_decay

TOLERANCE = EMAArgs().tolerance


def plans(steps: int) -> dict[str, EMAPlan]:
    late_probe = plan_from_config(EMAArgs(window_fraction=LATE_WINDOW_FRACTION), steps)
    decay = largest_safe_decay(late_probe.num_updates, TOLERANCE)
    out = {
        "no EMA": plan_from_config(EMAArgs(enabled=False), steps),
        "EMA whole run": plan_from_config(EMAArgs(decay=decay, step_start_ema=0), steps),
        f"EMA late window ({LATE_WINDOW_FRACTION:.1%})": plan_from_config(
            EMAArgs(decay=decay, window_fraction=LATE_WINDOW_FRACTION), steps
        ),
    }
    for plan in out.values():
        plan.check()
    return out


class Run:
    """One training run: its model, optimizer, EMA, and the time it has spent."""

    def __init__(self, model: torch.nn.Module, plan: EMAPlan):
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.ema = ShardedEMA(model, plan, DTensorLayout(model))
        self.plan = plan
        self.total_s = 0.0
        self.ema_s = 0.0
        self.peak_ema_bytes = 0

    def step(self, step: int, batch: tuple[torch.Tensor, ...]) -> None:
        x, t, text, noise = batch
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        F.mse_loss(self.model(x + noise, t, encoder_hidden_states=text).sample, noise).backward()
        self.optimizer.step()
        t1 = time.perf_counter()
        self.ema.update(step)
        t2 = time.perf_counter()
        self.total_s += t2 - t0
        self.ema_s += t2 - t1
        self.peak_ema_bytes = max(self.peak_ema_bytes, self.ema.local_bytes())


def run(size: str, steps: int, batch: int, latent: int) -> dict[str, Any]:
    info = init_distributed(DistArgs())
    cross = benchlib.UNET_CONFIGS[size]["cross_attention_dim"]
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(batch, 4, latent, latent, generator=g), torch.randint(0, 1000, (batch,), generator=g),
         torch.randn(batch, 77, cross, generator=g), torch.randn(batch, 4, latent, latent, generator=g))
        for _ in range(steps)
    ]  # fmt: skip
    runs = {
        name: Run(shard_unet(benchlib.build_unet(size, latent, seed=0), DistArgs(), info), plan)
        for name, plan in plans(steps).items()
    }
    names = list(runs)
    for step in range(1, steps + 1):
        shift = step % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].step(step, batches[step - 1])
    params = benchlib.count_params(next(iter(runs.values())).model)
    destroy()
    return {
        "params": params,
        "runs": {
            name: {
                "total_s": r.total_s,
                "ema_update_s": r.ema_s,
                "peak_ema_bytes": r.peak_ema_bytes,
                "decay": r.plan.decay if r.plan.enabled else None,
                "step_start_ema": r.plan.step_start_ema if r.plan.enabled else None,
                "ema_updates": r.ema.num_updates,
            }
            for name, r in runs.items()
        },
    }


def report(result: dict[str, Any], args: argparse.Namespace, load_before: float) -> None:
    runs = result["runs"]
    base = runs["no EMA"]["total_s"]
    print(
        f"\n{args.size} UNet ({result['params'] / 1e6:.1f}M), {args.steps} steps, batch {args.batch}, "
        f"{args.latent}x{args.latent} latents, "
        f"{torch.get_num_threads()} thread(s), world 1 (FSDP2)"
    )
    rows = []
    for name, r in runs.items():
        window = f"{r['step_start_ema']}..{args.steps}" if r["step_start_ema"] is not None else "-"
        rows.append(
            [
                name,
                window,
                r["ema_updates"],
                r["total_s"],
                100 * (r["total_s"] - base) / base,
                r["ema_update_s"],
                100 * r["ema_update_s"] / base,
                r["peak_ema_bytes"] / 2**20,
            ]
        )
        r["overhead_pct"] = 100 * (r["total_s"] - base) / base
        r["ema_update_pct_of_no_ema_run"] = 100 * r["ema_update_s"] / base
    benchlib.print_table(
        [
            "run",
            "window",
            "updates",
            "wall s",
            "overhead % (wall)",
            "in ema.update s",
            "ema.update % of run",
            "peak EMA MiB",
        ],
        rows,
    )
    load_after = benchlib.load_average()
    print(f"\nload average (1 min): {load_before:.2f} before, {load_after:.2f} after (2 shared cores)")
    benchlib.emit_json(
        "run_ema",
        {
            "size": args.size,
            "steps": args.steps,
            "batch": args.batch,
            "latent": args.latent,
            **result,
            "load_avg_1m_before": load_before,
            "load_avg_1m_after": load_after,
        },
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--size", choices=sorted(benchlib.UNET_CONFIGS), default="30m", help="UNet config (see bench/benchlib.py)"
    )
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of each run")
    p.add_argument("--batch", type=int, default=2, help="samples per step")
    p.add_argument("--latent", type=int, default=8, help="latent height and width")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (2 on a loaded 2-core machine mostly measures contention)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = benchlib.load_average()
    report(run(args.size, args.steps, args.batch, args.latent), args, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
