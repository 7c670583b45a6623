"""Post-hoc EMA costs, as ratios measured side by side in one run (one process, FSDP2 world 1):

    .venv/bin/python bench/bench_posthoc.py [--size 30m] [--reps 7] [--warmup 2] [--snapshots 2,4,8]

- tracking: one update of K power-function profiles (`PowerEMAProfiles.update`) against one plain
  `ShardedEMA.update`, interleaved round-robin (K = 2, EDM2's sigma_rels 0.05, 0.10);
- snapshot write (`write_snapshot`, fp32 and bf16) against a checkpoint of the same model
  (`Strategy.save`: model + optimizer + EMA + profiles);
- reconstruction of one target from the first S snapshots, each in a fresh process so its peak
  RSS is its own: time grows with S, peak memory stays flat (one snapshot profile + one
  accumulator in memory).

Prints tables and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import benchlib
import torch

from sd_train.checkpoint import Checkpointer
from sd_train.config import CheckpointArgs, DistArgs, EMAArgs, PosthocArgs
from sd_train.ema.plan import plan_from_config, posthoc_plan_from_config
from sd_train.ema.posthoc import PowerEMAProfiles
from sd_train.ema.posthoc_math import power_weights, sigma_rel_to_gamma, solve
from sd_train.ema.sharded import ShardedEMA
from sd_train.model.parallelize import fsdp_units
from sd_train.parallel.fsdp import FSDPStrategy
from sd_train.parallel.process_group import init_distributed
from sd_train.paths import step_dir
from sd_train.tools.posthoc import Target, find_snapshots, reconstruct

SIGMAS = [0.05, 0.10]
MAX_STEPS = 1_000_000


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def reconstruct_worker(run_dir: str, count: int) -> None:
    """Reconstruct one target from the first `count` snapshots; peak RSS above the RSS before it,
    sampled every 2 ms by a thread (ru_maxrss would report the imports' high-water mark)."""
    snaps = find_snapshots(Path(run_dir))
    snaps.folders, snaps.metas = snaps.folders[:count], snaps.metas[:count]
    n = snaps.metas[-1]["step"] - snaps.step_start
    target = Target("sigma_rel", 0.1, power_weights(sigma_rel_to_gamma(0.1), n))
    target.fit = solve(snaps.basis(), target.weights)
    base = rss_mib()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    reconstruct(snaps, [target])
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    print(json.dumps({"seconds": seconds, "peak_mib": peak[0] - base}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="30m")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--snapshots", default="2,4,8")
    p.add_argument("--reconstruct-worker", nargs=2, metavar=("RUN", "COUNT"))
    ns = p.parse_args()
    if ns.reconstruct_worker:
        return reconstruct_worker(ns.reconstruct_worker[0], int(ns.reconstruct_worker[1]))
    torch.set_num_threads(1)
    info = init_distributed(DistArgs(backend="gloo"))
    strategy = FSDPStrategy(DistArgs(strategy="fsdp2"), info, 0.0, fsdp_units)
    strategy.wrap(benchlib.build_unet(ns.size, 32), lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4))
    for p_ in strategy.model.parameters():  # AdamW state exists, as in a checkpoint of a real run
        p_.grad = torch.zeros_like(p_)
    strategy.optimizer.step()
    args = EMAArgs(decay=0.9999, step_start_ema=0, posthoc=PosthocArgs(SIGMAS, snapshot_every=1))
    ema = ShardedEMA(strategy.module, plan_from_config(args, MAX_STEPS), strategy.ema_layout())
    profiles = PowerEMAProfiles(strategy.module, posthoc_plan_from_config(args, MAX_STEPS), strategy.ema_layout())
    ema.update(0)
    profiles.update(0)
    steps = {"ema": 0, "profiles": 0}

    def step_ema() -> None:
        steps["ema"] += 1
        ema.update(steps["ema"])

    def step_profiles() -> None:
        steps["profiles"] += 1
        profiles.update(steps["profiles"])

    t = benchlib.interleaved({"ShardedEMA": step_ema, "K=2 profiles": step_profiles}, ns.warmup, ns.reps)
    ema_ms, prof_ms = benchlib.median_ms(t["ShardedEMA"]), benchlib.median_ms(t["K=2 profiles"])
    params = benchlib.count_params(strategy.module)
    print(f"UNet {ns.size}: {params / 1e6:.1f}M params, load average {benchlib.load_average():.1f}")
    benchlib.print_table(
        ["update", "ms", "vs ShardedEMA"],
        [["ShardedEMA", ema_ms, 1.0], ["K=2 profiles", prof_ms, prof_ms / ema_ms]],
    )

    root = Path(tempfile.mkdtemp(prefix="bench_posthoc_"))
    try:
        ckpt = Checkpointer(
            CheckpointArgs(every_steps=MAX_STEPS, keep_last_k=0),
            str(root / "run"),
            0,
            1,
            MAX_STEPS,
            strategy,
            {"ema": ema, "posthoc": profiles},
            {},
            {},
            config={},
        )
        counter = {"step": 0}

        def checkpoint() -> None:
            counter["step"] += 1
            ckpt.save(counter["step"], force=True)

        def snapshot(dtype: str):
            def write() -> None:
                profiles.plan.dtype = dtype
                counter["step"] += 1
                profiles.write_snapshot(root / f"snap_{dtype}", counter["step"], 0)

            return write

        w = benchlib.interleaved(
            {"checkpoint": checkpoint, "snapshot fp32": snapshot("fp32"), "snapshot bf16": snapshot("bf16")},
            1,
            max(3, ns.reps // 2),
        )
        ck_ms = benchlib.median_ms(w["checkpoint"])
        benchlib.print_table(
            ["write", "ms", "vs checkpoint"],
            [[k, benchlib.median_ms(v), benchlib.median_ms(v) / ck_ms] for k, v in w.items()],
        )

        # Reconstruction: a run folder with as many fp32 snapshots as the largest count.
        counts = [int(c) for c in ns.snapshots.split(",")]
        run_dir = root / "recon"
        profiles.plan.dtype = "fp32"
        for s in range(1, max(counts) + 1):
            profiles.update(steps["profiles"] + s)
            profiles.write_snapshot(run_dir / "posthoc", steps["profiles"] + s, 0)
        # The snapshot steps count from the profiles' start (step 0 here).
        rows, rec = [], {}
        for c in counts:
            out = subprocess.run(
                [sys.executable, __file__, "--reconstruct-worker", str(run_dir), str(c)],
                capture_output=True,
                text=True,
                check=True,
            )
            rec[c] = json.loads(out.stdout.strip().splitlines()[-1])
        first = rec[counts[0]]
        for c in counts:
            r = rec[c]
            rows.append(
                [c, r["seconds"], r["seconds"] / first["seconds"], r["peak_mib"], r["peak_mib"] / first["peak_mib"]]
            )
        snap_mib = len(SIGMAS) * params * 4 / 2**20
        print(f"one snapshot: {len(SIGMAS)} profiles x {params} params fp32 = {snap_mib:.0f} MiB")
        benchlib.print_table(["snapshots", "s", "time ratio", "peak MiB", "peak ratio"], rows)
        ckpt_bytes = sum(f.stat().st_size for f in step_dir(root / "run" / "checkpoints", 1).rglob("*") if f.is_file())
        benchlib.emit_json(
            "posthoc",
            {
                "size": ns.size,
                "params": params,
                "update_ms": {"ema": ema_ms, "profiles_k2": prof_ms},
                "profiles_vs_ema": prof_ms / ema_ms,
                "write_ms": {k: benchlib.median_ms(v) for k, v in w.items()},
                "checkpoint_bytes": ckpt_bytes,
                "reconstruct": rec,
            },
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
