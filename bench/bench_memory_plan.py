"""The memory plan's predicted per-rank peaks against measured peak RSS, on CPU, for the tiny UNet
(1.7M), the 28.6M one and the SD2-base-shaped one (865.9M), at 1 and 2 ranks.

    flock /work/heavy.lock nice .venv/bin/python bench/bench_memory_plan.py [--cases tiny,30m,sd2] [--worlds 1,2]

Each run: the plan (sd_train.memory, with its fake-tensor step estimate computed and cached first),
then the run itself, each rank started through bench/hwm_rank.py, which prints the rank's VmHWM
(the kernel's peak RSS of the process) at its end; the loader workers are sampled with psutil. The
predicted peak of rank 0 includes the export it runs alone after training, the other ranks' not.

The tiny and 28.6M runs are configs/test.yaml (12 steps, EMA from step 8, one post-hoc profile,
evaluation every 6 steps, checkpoints every 4, the export). The SD2-shaped run at 1 rank is
configs/sd2_base_256.yaml at micro-batch 2 for 2 steps with SGD and the EMA off: with AdamW's
moments and the EMA one rank holds ~17 GiB, more than this shared machine has free while other jobs
run (a try thrashed at 334 s a step). Its 2-rank runs are bench/rehearse.py's. Needs ~9 GiB free
for the SD2 run: run it under /work/heavy.lock.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from benchlib import emit_json, print_table
from memlib import GIB, REPO, metrics_rows, run_ranks
from sd_folder import build_sd_folder, emoji_data, sd2_assets

from sd_train.config import load_config
from sd_train.memory.startup import startup_plan
from sd_train.preflight import preflight

TEST = str(REPO / "configs" / "test.yaml")
SD2 = str(REPO / "configs" / "sd2_base_256.yaml")


def small_case(root: Path, size: str) -> tuple[str, list[str]]:
    data = emoji_data(str(root / "emoji32"), 32, train=128, val=16, shards=8)
    model = root / f"model-{size}"
    if size == "tiny":
        from sd_train.tools.tiny_sd import build_tiny_sd

        if not (model / "model_index.json").is_file():
            build_tiny_sd(data, str(model), resolution=32, vae_steps=0, seed=0)
    else:
        build_sd_folder(str(model), data, size, text_hidden=256, text_layers=2, vae="tiny", resolution=32)
    return TEST, [
        f"model.pretrained_path={model}",
        f"data.train_shards={data}/train-{{000000..000007}}.tar",
        f"data.val_shards={data}/val-000000.tar",
        "ema.posthoc.sigma_rels=[0.1]",
    ]


def sd2_paths(root: Path) -> list[str]:
    """The overrides pointing the SD2 template at the SD2-shaped folder and its shards (built once)."""
    a = sd2_assets(str(root))
    return [
        f"model.pretrained_path={a['model']}",
        f"data.train_shards={a['train_shards']}",
        f"data.val_shards={a['val_shards']}",
    ]


def sd2_case(root: Path) -> tuple[str, list[str]]:
    return SD2, [
        *sd2_paths(root),
        "max_steps=2",
        "global_batch_size=2",
        "micro_batch_size=2",
        "optim.warmup_steps=1",
        "ema.enabled=false",
        "optim.name=sgd",
        "eval.every_steps=0",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last_k=2",
        "metrics.log_every=1",
        "metrics.wandb=false",
        "data.shuffle_buffer=16",
    ]


def sd2_gpu_case(root: Path) -> tuple[str, list[str]]:
    """The template on one GPU: its optimizer, dtypes and EMA, 6 steps with the window open at 3."""
    return SD2, [
        *sd2_paths(root),
        "data.mode=resampled",
        "data.num_workers=2",
        "max_steps=6",
        "global_batch_size=32",
        "micro_batch_size=32",
        "optim.warmup_steps=1",
        "ema.step_start_ema=3",
        "ema.tolerance=0.9999",
        "eval.every_steps=0",
        "checkpoint.every_steps=6",
        "metrics.log_every=1",
        "metrics.wandb=false",
    ]


def device_figures(plan, out: Path) -> dict:
    """On a GPU run: the plan's device peak against the CUDA allocator's peaks the trainer logged."""
    rows = metrics_rows(out)
    allocated = max((r["memory/peak_allocated_gb"] for r in rows if "memory/peak_allocated_gb" in r), default=0.0)
    reserved = max((r["memory/peak_reserved_gb"] for r in rows if "memory/peak_reserved_gb" in r), default=0.0)
    peak, phase = plan.device_peak()
    return {
        "device_predicted_gib": round(peak / GIB, 3),
        "device_phase": phase.name,
        "device_allocated_gib": round(allocated, 3),
        "device_reserved_gib": round(reserved, 3),
        "device_error_vs_reserved": round(peak / GIB / reserved - 1, 3) if reserved else None,
    }


def measure(name: str, config: str, overrides: list[str], world: int, root: Path) -> dict:
    out = root / "runs" / f"{name}-w{world}"
    shutil.rmtree(out, ignore_errors=True)
    overrides = [*overrides, f"output_dir={out}", "dist.memory_check=cached"]
    cfg = load_config(config, overrides)
    cfg.validate(world)
    env = {"RANK": "0", "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "LOCAL_RANK": "0"}
    cfg = preflight(cfg, world, environ={})
    plan = startup_plan(cfg, world, environ=env, estimate_now=True)
    print(plan.describe(), flush=True)
    measured = run_ranks(world, ["--config", config, *overrides], out.with_suffix(".log"))
    if measured.rc:
        raise SystemExit(f"{name} at world {world} exited {measured.rc}: see {out.with_suffix('.log')}")
    predicted = [plan.host_peak(rank0=(r == 0))[0] for r in range(world)]
    errors = [p / m - 1 for p, m in zip(predicted, measured.rank_peak)]
    device = {} if plan.cpu else device_figures(plan, out)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # SD2's are 14 GB
    return {
        **device,
        "case": name,
        "world": world,
        "predicted_gib": [round(p / GIB, 3) for p in predicted],
        "measured_gib": [round(m / GIB, 3) for m in measured.rank_peak],
        "error": [round(e, 3) for e in errors],
        "phase": [plan.host_peak(rank0=(r == 0))[1].name for r in range(world)],
        "workers_predicted_gib": round(plan.workers.bytes / GIB, 3),
        "worker_rss_gib": round(measured.worker_rss / GIB, 3),
        "worker_uss_gib": round(measured.worker_uss / GIB, 3),
        "seconds": round(measured.seconds),
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="/tmp/sd-train-bench-memory", help="assets, runs and the estimate cache")
    p.add_argument("--cases", default="tiny,30m,sd2")
    p.add_argument("--worlds", default="1,2")
    p.add_argument("--sd2-assets", default="/tmp/sd-train-rehearsal/assets", help="shared with bench/rehearse.py")
    p.add_argument("--gpu", action="store_true", help="the SD2-shaped template on one GPU: the device column")
    ns = p.parse_args(argv)
    if ns.gpu:
        ns.cases, ns.worlds = "sd2_gpu", "1"
    root = Path(ns.root)
    os.environ.setdefault("SD_TRAIN_CACHE", str(root / "cache"))
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    for name in ns.cases.split(","):
        if name in ("sd2", "sd2_gpu"):
            config, overrides = (sd2_gpu_case if ns.gpu else sd2_case)(Path(ns.sd2_assets))
        else:
            config, overrides = small_case(root, name)
        for world in [int(w) for w in ns.worlds.split(",")]:
            if name == "sd2" and world != 1:
                continue  # bench/rehearse.py measures the 2-rank SD2 run
            rows.append(measure(name, config, overrides, world, root))
    print_table(
        ["case", "world", "predicted GiB", "measured GiB", "error", "peak phase", "worker RSS/USS GiB"],
        [
            [r["case"], r["world"], r["predicted_gib"], r["measured_gib"], r["error"], r["phase"][0],
             f"{r['worker_rss_gib']}/{r['worker_uss_gib']}"]
            for r in rows
        ],
    )  # fmt: skip
    if ns.gpu:
        keys = ["device_predicted_gib", "device_allocated_gib", "device_reserved_gib", "device_error_vs_reserved"]
        print_table(["case", "phase", *keys], [[r["case"], r["device_phase"], *(r[k] for k in keys)] for r in rows])
    emit_json("memory_plan", {"rows": rows, "max_abs_error": max(abs(e) for r in rows for e in r["error"])})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
