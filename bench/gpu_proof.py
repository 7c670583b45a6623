"""The GPU proof: one process that shows what the hot path does on this machine, in one command.

    python bench/gpu_proof.py --out runs/gpu_proof              # one H100/H200: under 8 minutes
    python bench/gpu_proof.py --out runs/gpu_proof --compile    # adds per-block torch.compile rows
    python bench/gpu_proof.py --tiny --out /tmp/gpu_proof       # the same sections, tiny UNet, CPU, < 1 min

Built from sd_train's own pieces, not copies: `init_distributed`, `FSDPStrategy` (FSDP2 on each
block and the root), `build_optimizer`, `DiffusionObjective`, `ShardedEMA` and `Checkpointer`.
Each section has its own deadline and prints as it finishes; a section that fails or runs out of
time says so and the others still run. At the end: a table, and one JSON line, also written to
`<out>/gpu_proof.json`.

Sections: environment (versions, GPU, SDPA backends, TF32 flags, peak); model (SD2-base built from
its config, parameter count and SDPA attention asserted); throughput at 256 px (32x32 latents) on
precomputed-shaped inputs, today's path against the new one at micro-batch 32 and 64 (img/s, ms
per step, MFU, GPU-busy share, peak memory, host syncs per step); EMA update against a same-bytes
`_foreach_copy_` floor; checkpoint sync and async save (GB/s, time the loop is blocked, bitwise
reload); correctness (CUDA against CPU, bf16 against fp32, the EMA-eval forward against a plain
module, an injected NaN).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import benchlib
import torch
from diffusers import UNet2DConditionModel

from sd_train import host_sync
from sd_train.checkpoint import Checkpointer
from sd_train.config import CheckpointArgs, DistArgs, EMAArgs, ObjectiveArgs, OptimArgs, PerfArgs
from sd_train.ema.plan import plan_from_config
from sd_train.ema.sharded import ShardedEMA
from sd_train.model.conditioning import Conditioning
from sd_train.model.parallelize import fsdp_units
from sd_train.objective import DiffusionObjective
from sd_train.optim import build_optimizer
from sd_train.parallel.fsdp import FSDPStrategy
from sd_train.parallel.process_group import DistInfo, init_distributed
from sd_train.perf import apply_backend_flags, peak_tflops, training_flops_per_image, use_fused_adamw

TEXT_TOKENS = 77
SECTIONS = ["environment", "model", "throughput", "ema", "checkpoint", "correctness"]
# Seconds per section on a GPU (the sum stays under 8 minutes with the model build) and in --tiny.
DEADLINES = {"environment": 20, "model": 60, "throughput": 240, "ema": 30, "checkpoint": 90, "correctness": 60}
# --tiny takes ~20 s of CPU in all; its deadlines leave room for a machine shared with other jobs.
TINY_DEADLINES = {"environment": 10, "model": 20, "throughput": 90, "ema": 20, "checkpoint": 40, "correctness": 60}


class Setup:
    """What every section shares: the process group, the model size and the shapes."""

    def __init__(self, args: argparse.Namespace):
        self.tiny = args.tiny
        self.info: DistInfo = init_distributed(DistArgs(backend="gloo" if args.tiny else "auto"))
        self.device = self.info.device if not args.tiny else torch.device("cpu")
        self.size = "tiny" if args.tiny else "sd2_base"
        self.latent = 8 if args.tiny else 32  # 256 px through the SD VAE
        self.micro_batches = [2, 4] if args.tiny else [32, 64]
        self.steps, self.warmup = (3, 1) if args.tiny else (10, 3)
        self.compile = args.compile
        self.out = Path(args.out)
        self.perf = PerfArgs()
        self.flags = apply_backend_flags(self.perf, self.device)
        self.peak = peak_tflops(self.perf, self.device)
        self.cross = benchlib.UNET_CONFIGS[self.size]["cross_attention_dim"]

    def unet(self, seed: int = 0) -> UNet2DConditionModel:
        return benchlib.build_unet(self.size, self.latent, seed, self.device)

    def objective(self) -> DiffusionObjective:
        acp = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)  # SD's scaled_linear
        empty = torch.zeros(1, TEXT_TOKENS, self.cross, device=self.device)
        return DiffusionObjective(ObjectiveArgs(), acp, Conditioning(empty))

    def batch(self, b: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Precomputed-shaped inputs: latents and text embeddings, made on the host and copied as a
        loader's pinned batch would be."""
        g = torch.Generator().manual_seed(seed)
        latents = torch.randn(b, 4, self.latent, self.latent, generator=g)
        embeds = torch.randn(b, TEXT_TOKENS, self.cross, generator=g)
        if self.device.type == "cuda":
            latents, embeds = latents.pin_memory(), embeds.pin_memory()
        return (
            latents.to(self.device, non_blocking=True).to(dtype),
            embeds.to(self.device, non_blocking=True).to(dtype),
        )

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def memory(self) -> dict[str, float]:
        if self.device.type != "cuda":
            return {"peak_allocated_gb": None, "peak_reserved_gb": None}
        return {
            "peak_allocated_gb": torch.cuda.max_memory_allocated(self.device) / 2**30,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(self.device) / 2**30,
        }


# ---- sections ---------------------------------------------------------------------------------------


def environment(s: Setup) -> dict[str, Any]:
    cuda = s.device.type == "cuda"
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "device": torch.cuda.get_device_name(s.device) if cuda else "cpu",
        "sdpa_backends": {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
        },
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "peak_tflops": s.peak,
    }


def model(s: Setup) -> dict[str, Any]:
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=s.latent, **benchlib.UNET_CONFIGS[s.size])
    params = benchlib.count_params(unet)
    if s.size == "sd2_base":
        assert params == benchlib.SD2_BASE_PARAMS, f"SD2-base has {benchlib.SD2_BASE_PARAMS:,} params, built {params:,}"
    processors = {type(p).__name__ for p in unet.attn_processors.values()}
    assert processors == {"AttnProcessor2_0"}, f"attention does not go through SDPA: {processors}"
    flops = training_flops_per_image(s.unet(), (4, s.latent, s.latent), (TEXT_TOKENS, s.cross), s.device)
    s.flops_per_image = flops
    return {"unet": s.size, "params": params, "tensors": len(list(unet.parameters())), "attention": sorted(processors),
            "train_gflop_per_image": flops / 1e9}  # fmt: skip


class Path_:
    """One training configuration of the throughput table."""

    def __init__(self, name: str, fused: bool, bf16_params: bool, autocast: bool, loss_read: bool, compile: bool):
        self.name, self.fused, self.bf16_params, self.autocast = name, fused, bf16_params, autocast
        self.loss_read, self.compile = loss_read, compile


def _paths(s: Setup) -> list[Path_]:
    paths = [
        # Today: foreach AdamW, autocast over fp32 params, the loss read per micro-batch and the
        # preemption flag read in a step of its own.
        Path_("today", fused=False, bf16_params=False, autocast=True, loss_read=True, compile=False),
        # New: fused AdamW on CUDA, bf16 FSDP params without autocast, one read per step.
        Path_(
            "new",
            fused=use_fused_adamw(s.perf, s.device),
            bf16_params=True,
            autocast=False,
            loss_read=False,
            compile=False,
        ),  # fmt: skip
    ]
    if s.compile:
        paths.append(Path_("new+compile", paths[1].fused, True, False, False, compile=True))
    return paths


def _build(s: Setup, path: Path_, seed: int = 0) -> tuple[FSDPStrategy, ShardedEMA]:
    dist_args = DistArgs(param_dtype="bf16" if path.bf16_params else "fp32", backend="gloo" if s.tiny else "auto")
    strategy = FSDPStrategy(dist_args, s.info, 1.0, fsdp_units, PerfArgs(compile=path.compile))
    strategy.wrap(s.unet(seed), lambda m: build_optimizer(m, OptimArgs(), fused=path.fused))
    plan = plan_from_config(EMAArgs(step_start_ema=1, decay=0.999), 10**6)
    return strategy, ShardedEMA(strategy.module, plan, strategy.ema_layout())


def _train_step(s: Setup, strategy, ema, objective, path: Path_, batch, step: int, accum: int = 1) -> tuple:
    strategy.optimizer.zero_grad(set_to_none=True)
    latents, embeds = batch
    total = torch.zeros((), dtype=torch.float64, device=s.device)
    autocast = torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=path.autocast)
    for micro in range(accum):
        strategy.set_grad_sync(micro == accum - 1)
        with autocast:
            loss = objective.loss(strategy.model, latents, Conditioning(embeds)) / accum
        strategy.backward(loss, micro == accum - 1)
        if path.loss_read:
            host_sync.read_float(loss)
        total += loss.detach().double()
    flag = torch.zeros(1, device=s.device)
    if path.loss_read:  # today's preemption check: its own all-reduce and read every step
        host_sync.read_floats([flag])
        taken, norm, _ = strategy.step()
    else:
        taken, norm, _ = strategy.step([flag])
    if taken:
        ema.update(step)
    return taken, norm, total


def _count_syncs(s: Setup, fn: Callable[[], Any]) -> int:
    """Host syncs of one call: CUDA's own count (`set_sync_debug_mode` warns on each) on a GPU,
    sd_train's host-read counter on CPU (where nothing blocks)."""
    if s.device.type != "cuda":
        before = host_sync.COUNTER.count
        fn()
        return host_sync.COUNTER.count - before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _busy_share(s: Setup, fn: Callable[[], Any]) -> float | None:
    """Share of wall time the GPU spends in kernels over one call (torch.profiler)."""
    if s.device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    s.sync()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        s.sync()
    wall_us = (time.perf_counter() - t0) * 1e6
    return sum(e.self_device_time_total for e in prof.key_averages()) / wall_us


def throughput(s: Setup) -> dict[str, Any]:
    objective = s.objective()
    rows = []
    for path in _paths(s):
        for mb in s.micro_batches:
            try:
                rows.append(_throughput_row(s, objective, path, mb))
            except torch.OutOfMemoryError as e:  # one row too big for this device; the others still run
                rows.append({"path": path.name, "micro_batch": mb, "error": f"out of memory: {str(e)[:200]}"})
            if s.device.type == "cuda":
                torch.cuda.empty_cache()
    return {"rows": rows, "latent": s.latent}


def _throughput_row(s: Setup, objective: DiffusionObjective, path: Path_, mb: int) -> dict[str, Any]:
    """One row of the throughput table: warm up, time `s.steps` steps, then one more step each
    under the profiler (GPU-busy share) and the sync counter."""
    strategy, ema = _build(s, path)
    dtype = torch.bfloat16 if path.bf16_params else torch.float32
    batch = s.batch(mb, dtype=dtype)
    step = [0]

    def one(strategy=strategy, ema=ema, batch=batch, path=path, step=step) -> None:
        step[0] += 1
        _train_step(s, strategy, ema, objective, path, batch, step[0])

    for _ in range(s.warmup):
        one()
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    times = [benchlib.timed(one) for _ in range(s.steps)]
    ms = benchlib.median_ms(times)
    img_s = mb * s.info.world_size / (ms / 1000)
    per_gpu = img_s / s.info.world_size
    mfu = per_gpu * s.flops_per_image / (s.peak * 1e12) if s.peak else None
    return {"path": path.name, "micro_batch": mb, "ms_per_step": ms, "img_per_s_per_gpu": per_gpu,
            "mfu": mfu, "gpu_busy_share": _busy_share(s, one), **s.memory(),
            "host_syncs_per_step": _count_syncs(s, one)}  # fmt: skip


def ema_section(s: Setup) -> dict[str, Any]:
    strategy, ema = _build(s, _paths(s)[1])
    ema.update(1)  # opens the window (copies the weights)
    views = strategy.ema_layout().views(ema.named_params)
    floor_dst = [v.detach().clone().float() for v in views]

    def floor() -> None:
        torch._foreach_copy_(floor_dst, [v.float() for v in views])

    step = [1]

    def update() -> None:
        step[0] += 1
        ema.update(step[0])

    times = benchlib.interleaved({"floor": floor, "ema": update}, warmup=2, reps=10 if s.tiny else 20)
    floor_ms, ema_ms = benchlib.median_ms(times["floor"]), benchlib.median_ms(times["ema"])
    return {"ema_update_ms": ema_ms, "foreach_copy_floor_ms": floor_ms, "ratio": ema_ms / floor_ms,
            "shadow_bytes": ema.local_bytes()}  # fmt: skip


class _State:
    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def _local_tensors(strategy, ema) -> list[torch.Tensor]:
    params = [p.to_local() if hasattr(p, "to_local") else p for p in strategy.module.parameters()]
    moments = [v for st in strategy.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    moments = [m.to_local() if hasattr(m, "to_local") else m for m in moments]
    return [t.detach().cpu() for t in [*params, *moments, *(ema.shadow or [])]]


def checkpoint(s: Setup) -> dict[str, Any]:
    path = _paths(s)[0]  # fp32 params: the bytes a training checkpoint holds
    strategy, ema = _build(s, path)
    objective = s.objective()
    _train_step(s, strategy, ema, objective, path, s.batch(s.micro_batches[0]), 1)
    _train_step(s, strategy, ema, objective, path, s.batch(s.micro_batches[0]), 2)
    out = {}
    for mode in ("sync", "async"):
        root = s.out / f"ckpt_{mode}"
        shutil.rmtree(root, ignore_errors=True)
        args = CheckpointArgs(every_steps=10**6, keep_last_k=0, async_save=mode == "async")
        ckpt = Checkpointer(args, str(root), s.info.rank, s.info.world_size, 10**6, strategy, {"ema": ema},
                            {"train": _State()}, {"other": _State()}, config={"proof": True})  # fmt: skip
        s.sync()
        t0 = time.perf_counter()
        ckpt.save(2, force=True)
        ckpt.wait_staged()  # an async save's copy to CPU, waited for before the next optimizer step
        blocked = time.perf_counter() - t0
        ckpt.wait()
        total = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        out[mode] = {"total_s": total, "blocked_s": blocked, "gb": size / 1e9, "gb_per_s": size / 1e9 / total}
        if mode == "async":  # SD2-base with AdamW and EMA is 13.9 GB: keep one copy on disk, not two
            shutil.rmtree(root, ignore_errors=True)
    # Bitwise reload: a fresh model, optimizer and EMA from the sync checkpoint.
    strategy2, ema2 = _build(s, path, seed=1)
    _train_step(s, strategy2, ema2, objective, path, s.batch(s.micro_batches[0]), 1)  # optimizer state to load into
    ckpt2 = Checkpointer(CheckpointArgs(), str(s.out / "ckpt_sync"), s.info.rank, s.info.world_size, 10**6,
                         strategy2, {"ema": ema2}, {"train": _State()}, {"other": _State()}, config={})  # fmt: skip
    ckpt2.load()
    a, b = _local_tensors(strategy, ema), _local_tensors(strategy2, ema2)
    out["bitwise_reload"] = len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    return out


def _sgd_losses(s: Setup, device: torch.device, dtype: torch.dtype, steps: int = 5) -> tuple[list[float], dict]:
    """Plain (unsharded) small UNet, SGD, fixed timesteps and noise: the same numbers on any device."""
    torch.manual_seed(0)
    unet = benchlib.build_unet("tiny", 8, seed=0).to(device, dtype)
    opt = torch.optim.SGD(unet.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, TEXT_TOKENS, 64, generator=g)
    t = torch.tensor([100, 700])
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        pred = unet((x + noise).to(device, dtype), t.to(device), encoder_hidden_states=text.to(device, dtype)).sample
        loss = (pred.float() - noise.to(device)).square().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, {n: p.detach().float().cpu() for n, p in unet.named_parameters()}


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def correctness(s: Setup) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    cpu_losses, cpu_params = _sgd_losses(s, torch.device("cpu"), torch.float32)
    if s.device.type == "cuda":
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        cuda_losses, cuda_params = _sgd_losses(s, s.device, torch.float32)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        checks["cuda_vs_cpu_max_dloss"] = max(abs(a - b) for a, b in zip(cpu_losses, cuda_losses))
        checks["cuda_vs_cpu_max_dparam"] = _max_diff(cpu_params, cuda_params)
    else:
        checks["cuda_vs_cpu_max_dloss"] = "no CUDA device"
    bf16_losses, bf16_params = _sgd_losses(s, s.device, torch.bfloat16)
    fp32_losses, fp32_params = _sgd_losses(s, s.device, torch.float32)
    checks["bf16_vs_fp32_max_dloss"] = max(abs(a - b) for a, b in zip(bf16_losses, fp32_losses))
    checks["bf16_vs_fp32_max_dparam"] = _max_diff(bf16_params, fp32_params)

    # The EMA-eval forward (EMA swapped into the sharded model) against a plain module holding it.
    path = _paths(s)[0]
    strategy, ema = _build(s, path)
    objective = s.objective()
    batch = s.batch(s.micro_batches[0])
    for step in (1, 2, 3):
        _train_step(s, strategy, ema, objective, path, batch, step)
    plain = s.unet()
    plain.load_state_dict(ema.full_tensors())
    x, text = batch
    t = torch.full((x.shape[0],), 500, device=s.device)
    with torch.no_grad(), ema.swapped_in():
        swapped = strategy.model(x, t, encoder_hidden_states=text).sample
    with torch.no_grad():
        reference = plain(x, t, encoder_hidden_states=text).sample
    checks["ema_eval_max_abs_diff"] = float((swapped - reference).abs().max())

    # An injected NaN: the step is skipped on every rank, weights and EMA untouched.
    before = _local_tensors(strategy, ema)
    strategy.optimizer.zero_grad(set_to_none=True)
    loss = objective.loss(strategy.model, batch[0], Conditioning(batch[1])) * float("nan")
    strategy.backward(loss, True)
    taken, _, _ = strategy.step()
    if taken:
        ema.update(4)
    after = _local_tensors(strategy, ema)
    n_params = len(list(strategy.module.parameters()))
    shadow = len(ema.shadow)
    checks["nan_step_skipped"] = not taken
    checks["nan_weights_untouched"] = all(torch.equal(a, b) for a, b in zip(before[:n_params], after[:n_params]))
    checks["nan_ema_untouched"] = all(torch.equal(a, b) for a, b in zip(before[-shadow:], after[-shadow:]))
    return {"checks": checks}


RUNNERS: dict[str, Callable[[Setup], dict[str, Any]]] = {
    "environment": environment,
    "model": model,
    "throughput": throughput,
    "ema": ema_section,
    "checkpoint": checkpoint,
    "correctness": correctness,
}


@contextlib.contextmanager
def deadline(seconds: int):
    """Raise TimeoutError in the main thread after `seconds` (SIGALRM). Yields a list that holds
    True once it fired: torch may wrap the TimeoutError raised inside one of its ops."""
    fired = [False]

    def fire(signum, frame):  # noqa: ARG001
        fired[0] = True
        raise TimeoutError(f"section ran past its {seconds} s deadline")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield fired
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_section(name: str, s: Setup, seconds: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    fired = [False]
    try:
        with deadline(seconds) as fired:
            result = {"status": "ok", **RUNNERS[name](s)}
    except Exception as e:  # a failed section is a result, and the next one still runs
        status = "timeout" if fired[0] else "error"
        result = {"status": status, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    result["seconds"] = time.perf_counter() - t0
    print(f"[{name}] {result['status']} in {result['seconds']:.1f} s: {json.dumps(result, default=str)}", flush=True)
    return result


ROW_KEYS = ("ms_per_step", "img_per_s_per_gpu", "mfu", "gpu_busy_share", "peak_allocated_gb", "host_syncs_per_step")


def print_summary(sections: dict[str, dict[str, Any]]) -> None:
    rows = sections.get("throughput", {}).get("rows", [])
    if rows:
        print()
        benchlib.print_table(
            ["path", "micro-batch", "ms/step", "img/s/GPU", "MFU", "GPU busy", "peak alloc GB", "syncs/step", "error"],
            [[r["path"], r["micro_batch"], *(_cell(r.get(k)) for k in ROW_KEYS), r.get("error", "")] for r in rows],
        )
    print()
    benchlib.print_table(
        ["section", "status", "seconds"], [[n, r["status"], r["seconds"]] for n, r in sections.items()]
    )


def _cell(value: Any) -> Any:
    return "-" if value is None else value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_proof.json and the checkpoint files")
    p.add_argument("--tiny", action="store_true", help="tiny UNet on CPU: every section in under a minute")
    p.add_argument("--compile", action="store_true", help="add per-block torch.compile rows to the throughput")
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    s = Setup(args)
    deadlines = TINY_DEADLINES if args.tiny else DEADLINES
    s.flops_per_image = 0.0
    sections = {name: run_section(name, s, deadlines[name]) for name in SECTIONS}
    print_summary(sections)
    result = {"bench": "gpu_proof", "tiny": args.tiny, "device": str(s.device), "sections": sections}
    line = json.dumps(result, default=str)
    (Path(args.out) / "gpu_proof.json").write_text(line + "\n")
    for name in ("ckpt_sync", "ckpt_async"):
        shutil.rmtree(Path(args.out) / name, ignore_errors=True)
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
