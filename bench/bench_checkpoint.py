"""Checkpoint save time at world size 2: per-rank DCP shards vs a rank-0 full state dict, and async DCP;
and what the checksum manifests cost the save and the load.

    .venv/bin/python bench/bench_checkpoint.py [--size 200m] [--reps 1] [--warmup 1] [--dir /tmp]

Relaunches itself under torchrun (2 ranks, gloo, one thread per rank). Each rank builds the same
UNet, shards it with sd_train's `shard_unet` (FSDP2), and takes one AdamW step so the optimizer
state exists (model + 2 Adam moments = 3x the parameter bytes). Then, interleaved round-robin:

- sharded DCP: `sd_train.checkpoint.Checkpointer.save` (each rank writes its own shard file, rank 0
  the `.metadata`, then the atomic rename), as the trainer calls it;
- rank-0 full: `get_model_state_dict` / `get_optimizer_state_dict` with full_state_dict=True and
  cpu_offload=True (every parameter gathered to rank 0), then `torch.save` on rank 0, fsynced
  because DCP's FileSystemWriter fsyncs its files too;
- async DCP: `Checkpointer.save` with `checkpoint.async_save=true`: the time the loop is blocked
  (`save` itself plus `wait_staged`, the wait for the background copy to CPU that the loop makes
  before its next optimizer step; after the warmup save the copy goes into buffers kept from the
  previous save), and the total until `wait()` returns with the checkpoint complete on disk
  (measured with nothing else running; in training the copy and the write overlap the next steps
  and compete for the cores).

- sharded DCP without checksums: the same save with the checksum manifests switched off (the
  manifest writer and the load's verification replaced by no-ops), for their cost;
- load, with and without checksums: `Checkpointer._load_one` of one kept checkpoint (what a resume
  does per folder: the small files, the verification of this rank's share, the DCP load). The files
  are in the page cache, just written: a cold read pays the disk once in the verification, and DCP
  then reads from the cache. Besides, the hashing alone: each rank's `complete_manifest` of its
  files and `verify` of its share, timed by themselves.

Every timing ends with a barrier, so it is the time until the checkpoint is done on all ranks
(a rank that finishes early meets the others at the next collective anyway). The EMA window is
closed, so neither variant carries EMA tensors. Files go to a temporary folder under `--dir`,
deleted after each save and at the end. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import benchlib
import torch
import torch.distributed as dist

DCP = "sharded DCP (Checkpointer.save)"
NOSUM = "sharded DCP, no checksum manifests"
FULL = "rank-0 full state dict + torch.save"
ASYNC = "async DCP (Checkpointer, async_save)"
LOAD = "load (Checkpointer._load_one)"
LOAD_NOSUM = "load, no checksum verification"
KEYS = {DCP: "dcp", NOSUM: "dcp", FULL: "full", ASYNC: "async"}  # folder-size keys recorded by rank 0
LATENT_SIZE = 16  # the one training step only has to create the optimizer state: keep it cheap


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def one_adamw_step(unet: torch.nn.Module, size: str) -> torch.optim.Optimizer:
    """A real forward/backward/AdamW step on one random sample (same on every rank)."""
    cross = benchlib.UNET_CONFIGS[size]["cross_attention_dim"]
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, LATENT_SIZE, LATENT_SIZE, generator=g)
    text = torch.randn(1, 77, cross, generator=g)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    pred = unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample
    torch.nn.functional.mse_loss(pred, torch.randn(pred.shape, generator=g)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def full_state_save(unet: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path, rank: int) -> None:
    """The rank-0 pattern of diffusers' scripts and accelerate's FULL_STATE_DICT, on FSDP2."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {
        "model": get_model_state_dict(unet, options=options),
        "optim": get_optimizer_state_dict(unet, optimizer, options=options),
    }
    if rank == 0:
        with open(path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())


def without_checksums(fn: Callable[[], Any]) -> Any:
    """Run `fn` with the checkpointer's manifest writer and verification as no-ops."""
    import sd_train.checkpoint as module

    saved = module.complete_manifest, module.verify
    module.complete_manifest, module.verify = (lambda folder, rank: None), (lambda *args: None)
    try:
        return fn()
    finally:
        module.complete_manifest, module.verify = saved


def worker(size: str, warmup: int, reps: int, root: Path) -> None:
    from sd_train.checkpoint import Checkpointer
    from sd_train.checksums import complete_manifest, manifest_path, verify
    from sd_train.config import CheckpointArgs, DistArgs, EMAArgs
    from sd_train.ema.plan import plan_from_config
    from sd_train.ema.sharded import ShardedEMA
    from sd_train.model.parallelize import fsdp_units
    from sd_train.parallel.fsdp import DTensorLayout, FSDPStrategy
    from sd_train.parallel.process_group import all_gather_object, destroy, init_distributed
    from sd_train.paths import step_dir

    class RankNumber:
        """The smallest rank state: which rank wrote the file."""

        def state_dict(self) -> dict:
            return {"rank": info.rank}

        def load_state_dict(self, state: dict) -> None:
            pass

    info = init_distributed(DistArgs())
    strategy = FSDPStrategy(DistArgs(strategy="fsdp2"), info, 0.0, fsdp_units)
    strategy.wrap(benchlib.build_unet(size, LATENT_SIZE), lambda m: one_adamw_step(m, size))
    unet, optimizer = strategy.model, strategy.optimizer
    ema = ShardedEMA(unet, plan_from_config(EMAArgs(enabled=False), max_steps=1), DTensorLayout(unet))
    max_steps = 1_000_000

    def checkpointer(folder: str, **args) -> Checkpointer:
        return Checkpointer(
            CheckpointArgs(every_steps=max_steps, keep_last_k=0, **args), str(root / folder), info.rank,
            info.world_size, max_steps, strategy, {"ema": ema}, global_states={},
            rank_states={"rank": RankNumber()}, config={},
        )  # fmt: skip

    sync_ckpt, async_ckpt = checkpointer("dcp"), checkpointer("async", async_save=True)
    step = 0
    sizes: dict[str, int] = {}

    def measure(name: str, folder: Path, save: Callable[[], float | None]) -> dict[str, float]:
        """Run one save between barriers; returns its seconds (and the async blocking part)."""
        dist.barrier()
        t0 = time.perf_counter()
        blocking = save()
        dist.barrier()
        out = {"total": time.perf_counter() - t0}
        if blocking is not None:
            out["blocking"] = blocking
        if info.rank == 0:
            sizes[name] = folder_bytes(folder)
            shutil.rmtree(folder)
        dist.barrier()
        return out

    def dcp_sync() -> dict[str, float]:
        nonlocal step
        step += 1

        def save() -> None:
            sync_ckpt.save(step, force=True)

        return measure("dcp", step_dir(sync_ckpt.root, step), save)

    def dcp_async() -> dict[str, float]:
        nonlocal step
        step += 1

        def save() -> float:
            t0 = time.perf_counter()
            async_ckpt.save(step, force=True)
            async_ckpt.wait_staged()  # what the loop waits for before its next optimizer step
            blocking = time.perf_counter() - t0
            async_ckpt.wait()
            return blocking

        return measure("async", step_dir(async_ckpt.root, step), save)

    def full() -> dict[str, float]:
        folder = root / "full"
        folder.mkdir(exist_ok=True)
        return measure("full", folder, lambda: full_state_save(unet, optimizer, folder / "state.pt", info.rank))

    def loaded(folder: Path, checked: bool) -> dict[str, float]:
        dist.barrier()
        t0 = time.perf_counter()
        if checked:
            sync_ckpt._load_one(folder)
        else:
            without_checksums(lambda: sync_ckpt._load_one(folder))
        dist.barrier()
        return {"total": time.perf_counter() - t0}

    keep = step_dir(root / "kept" / "checkpoints", 1)
    kept = checkpointer("kept")
    kept.save(1, force=True)
    candidates = {
        DCP: dcp_sync,
        NOSUM: lambda: without_checksums(dcp_sync),
        FULL: full,
        ASYNC: dcp_async,
        LOAD: lambda: loaded(keep, True),
        LOAD_NOSUM: lambda: loaded(keep, False),
    }
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            samples[name].append(candidates[name]())
    # The hashing by itself: this rank's manifest written again from scratch, and its share verified.
    hashing = {"manifest": [], "verify": []}
    for _ in range(max(1, reps)):
        dist.barrier()
        manifest_path(keep, info.rank).unlink()
        t0 = time.perf_counter()
        complete_manifest(keep, info.rank)
        hashing["manifest"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert verify(keep, info.world_size, info.rank, info.world_size) is None
        hashing["verify"].append(time.perf_counter() - t0)
    mine = {
        "rank": info.rank,
        "s": {name: {k: sorted(s[k] for s in runs)[len(runs) // 2] for k in runs[0]} for name, runs in samples.items()},
        "bytes_written": {name: sizes.get(KEYS.get(name, ""), 0) for name in names},
        "hashing_s": {k: sorted(v)[len(v) // 2] for k, v in hashing.items()},
        "hashed_bytes": sum(
            e["bytes"] for e in json.loads(manifest_path(keep, info.rank).read_text())["files"].values()
        ),
    }
    ranks = all_gather_object(mine)
    if info.is_main:
        benchlib.emit_worker_result({"params": benchlib.count_params(unet), "ranks": ranks})
    async_ckpt.close()
    destroy()


def report(result: dict[str, Any], size: str, reps: int, load_before: float) -> None:
    ranks = result["ranks"]
    print(
        f"\nworld 2 (FSDP2, gloo, 1 thread per rank): {result['params']:,}-param UNet + AdamW state; "
        f"median of {reps} saves"
    )
    baseline = max(r["s"][DCP]["total"] for r in ranks)
    rows = []
    for name in ranks[0]["s"]:
        per_rank = [r["s"][name]["total"] for r in ranks]
        blocked = max(r["s"][name].get("blocking", r["s"][name]["total"]) for r in ranks)
        rows.append([name, max(per_rank), max(per_rank) / baseline, blocked, ranks[0]["bytes_written"][name] / 2**20])
    benchlib.print_table(["save", "seconds (slowest rank)", "x sharded DCP", "caller blocked s", "MiB written"], rows)
    saves = {name: max(r["s"][name]["total"] for r in ranks) for name in (DCP, NOSUM, LOAD, LOAD_NOSUM)}
    manifest = max(r["hashing_s"]["manifest"] for r in ranks)
    verified = max(r["hashing_s"]["verify"] for r in ranks)
    hashed = max(r["hashed_bytes"] for r in ranks)
    print(
        f"\nchecksums (xxh3_64): save {saves[DCP]:.3f} s with, {saves[NOSUM]:.3f} s without "
        f"({(saves[DCP] / saves[NOSUM] - 1) * 100:+.1f}%); load {saves[LOAD]:.3f} s with, {saves[LOAD_NOSUM]:.3f} s "
        f"without ({(saves[LOAD] / saves[LOAD_NOSUM] - 1) * 100:+.1f}%)"
    )
    print(
        f"hashing alone, slowest rank ({hashed / 2**20:.0f} MiB of its files): manifest {manifest:.3f} s = "
        f"{manifest / saves[DCP] * 100:.1f}% of the save; verify {verified:.3f} s = "
        f"{verified / saves[LOAD] * 100:.1f}% of the load ({hashed / max(manifest, 1e-9) / 1e9:.2f} GB/s)"
    )
    load_after = benchlib.load_average()
    print(f"\nload average (1 min): {load_before:.2f} before, {load_after:.2f} after (2 shared cores)")
    benchlib.emit_json(
        "checkpoint",
        {"size": size, "reps": reps, **result, "load_avg_1m_before": load_before, "load_avg_1m_after": load_after},
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--size", choices=sorted(benchlib.UNET_CONFIGS), default="200m", help="UNet config (see bench/benchlib.py)"
    )
    p.add_argument(
        "--reps",
        type=int,
        default=1,
        help="timed saves per variant (each round of three saves of the 200m model takes about a minute)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed saves per variant first")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary checkpoint folder goes")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # the torchrun relaunch: its folder
    args = p.parse_args(argv)
    if args.worker:
        worker(args.size, args.warmup, args.reps, Path(args.worker))
        return 0
    load_before = benchlib.load_average()
    root = tempfile.mkdtemp(prefix="bench_checkpoint_", dir=args.dir)
    try:
        result = benchlib.run_torchrun(
            os.path.abspath(__file__),
            ["--worker", root, "--size", args.size, "--reps", str(args.reps), "--warmup", str(args.warmup)],
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(result, args.size, args.reps, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
