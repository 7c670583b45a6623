"""Shared pieces of the benchmarks in bench/: UNet sizes, side-by-side timing, the 2-rank relaunch,
and the output format (a human table, then one JSON line that a script can grep for).

Not a benchmark itself. The bench scripts import it as `benchlib` (Python puts the script's own
folder first on sys.path, also under torchrun).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from sd_train.model.family import SDXL_BASE_UNET

# Marker of the result line a torchrun worker prints, so the parent can find it among the logs.
RESULT_PREFIX = "BENCH_WORKER_RESULT "

# UNet2DConditionModel configs, built locally (no download). Cross-attention only at the two
# higher resolutions and a plain lowest one, like SD's layout shifted by one level.
_SD_LIKE = dict(
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
)
UNET_CONFIGS: dict[str, dict[str, Any]] = {
    # The two-level tiny layout: 1.45M params with a 64-wide text encoder (the demo UNet is 1.69M).
    "tiny": dict(
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        cross_attention_dim=64,
        attention_head_dim=8,
    ),
    # 28.6M params.
    "30m": dict(_SD_LIKE, block_out_channels=(96, 192, 384), cross_attention_dim=256),
    # 203.4M params: the "204M UNet" of the measured CPU timings (EMA update, train step).
    "200m": dict(_SD_LIKE, block_out_channels=(256, 512, 1024), cross_attention_dim=768),
    # Stable Diffusion 2 base, as in its diffusers unet/config.json: 865,910,724 params in 686
    # tensors (SD2_BASE_PARAMS), built locally. Latents are 32x32 at 256 px, 64x64 at 512 px.
    "sd2_base": dict(
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    ),
    # SDXL base 1.0 (sd_train.model.family.SDXL_BASE_UNET): 2,567,463,684 params (SDXL_PARAMS).
    "sdxl": dict(in_channels=4, out_channels=4, **SDXL_BASE_UNET),
}
SD2_BASE_PARAMS = 865_910_724
SDXL_PARAMS = 2_567_463_684


def build_unet(size: str, latent_size: int, seed: int = 0, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A randomly initialised UNet of one of UNET_CONFIGS; the same seed gives the same weights on
    every rank (fully_shard then cuts identical full tensors). On a GPU `device` initialises it
    there (SD2-base takes ~15 s to initialise on a CPU); the weights then come from the device's
    generator, so they differ from the CPU-built ones."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        return UNet2DConditionModel(sample_size=latent_size, **UNET_CONFIGS[size])


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def timed(fn: Callable[[], Any], sync: Callable[[], None] = lambda: None) -> float:
    """Seconds one call of `fn` takes; `sync` runs before the clock starts (e.g. a barrier, so both
    ranks contend for the cores at the same time, as they do in training). On CUDA the device is
    synchronized before the clock starts and before it stops: kernels are queued asynchronously,
    so without it the figure is the launch time, not the work."""
    sync()
    cuda_sync()
    t0 = time.perf_counter()
    fn()
    cuda_sync()
    return time.perf_counter() - t0


def cuda_sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(
    fns: dict[str, Callable[[], Any]], warmup: int, reps: int, sync: Callable[[], None] = lambda: None
) -> dict[str, list[float]]:
    """Time each function `reps` times, round-robin with the order rotated every rep, after `warmup`
    untimed rounds. On a shared machine the load drifts during a run; interleaving spreads that
    drift over all candidates instead of charging it to whichever ran last."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    out: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            out[name].append(timed(fns[name], sync))
    return out


def median_ms(samples: Sequence[float]) -> float:
    return 1000.0 * statistics.median(samples)


def load_average() -> float:
    """1-minute load average: the machine is shared, so every result records how busy it was."""
    return os.getloadavg()[0]


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def emit_json(name: str, values: dict[str, Any]) -> None:
    """The last line of every bench: one JSON object, `bench` first."""
    print(json.dumps({"bench": name, **values}), flush=True)


def emit_worker_result(values: dict[str, Any]) -> None:
    """Rank 0 of a torchrun worker hands its figures to the parent process through stdout."""
    print(RESULT_PREFIX + json.dumps(values), flush=True)


def run_torchrun(script: str, args: Sequence[str], nproc: int = 2, timeout_s: float = 900) -> dict[str, Any]:
    """Run `script args` under torchrun with `nproc` ranks on this machine and return the dict that
    rank 0 passed to `emit_worker_result`. One BLAS thread per rank: with more, ranks fight over
    the cores and the figures measure the contention. The workers' output is echoed (indented)."""
    from sd_train.parallel.process_group import free_port

    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        script, *args,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    result: dict[str, Any] | None = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
    if proc.returncode != 0 or result is None:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"torchrun {script} failed (exit {proc.returncode}); its output is above")
    return result


def sizes_main(parser, args, script: str, worker, report) -> int:
    """The main() of a 2-rank bench over `--sizes`: check the sizes, then either be a torchrun worker
    (`--worker`) or start the workers and `report` what they measured (with the load before)."""
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in UNET_CONFIGS]
    if unknown:
        parser.error(f"--sizes: unknown {unknown}; pick from {sorted(UNET_CONFIGS)}")
    if args.worker:
        worker(sizes, args.batch, args.latent, args.warmup, args.reps)
        return 0
    load_before = load_average()
    flags = ["--sizes", args.sizes, "--batch", str(args.batch), "--latent", str(args.latent)]
    flags += ["--reps", str(args.reps), "--warmup", str(args.warmup)]
    report(run_torchrun(script, ["--worker", *flags]), args, load_before)
    return 0


def tiny_test_assets(root: Path) -> list[str]:
    """The test suite's tiny data set and tiny SD (tests/conftest.py `tiny_assets`), built once
    into `root`, as config overrides."""
    from sd_train.tools.prepare import prepare_emoji
    from sd_train.tools.tiny_sd import build_tiny_sd

    data, model = root / "emoji", root / "tiny-sd"
    if not (root / ".done").is_file():
        prepare_emoji(str(data), resolution=32, num_train_shards=8, val_count=16, seed=0, limit=144)
        build_tiny_sd(str(data), str(model), resolution=32, vae_steps=0, seed=0)
        (root / ".done").touch()
    return [
        f"model.pretrained_path={model}",
        f"data.train_shards={data}/train-{{000000..000007}}.tar",
        f"data.val_shards={data}/val-000000.tar",
    ]
