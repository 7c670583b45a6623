"""The hardware side of the hot path: backend switches (TF32, cuDNN autotuning, deterministic
mode), which AdamW kernels to use, the peak a device can reach, and the FLOPs of one training image.

Everything here is decided once at startup from `perf` (sd_train.config.PerfArgs). On CPU the
switches are no-ops, so the CPU numerics stay those the tests pin down.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from sd_train.config import PerfArgs

# Dense bf16 tensor-core peak of one device, TFLOP/s (vendor datasheets, without sparsity). The
# first name that is a substring of `torch.cuda.get_device_name()` wins, so the more specific
# names come first.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM and NVL report "H100 80GB HBM3" / "H100 NVL"
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
]


def apply_backend_flags(args: PerfArgs, device: torch.device) -> dict[str, object]:
    """Set TF32, cuDNN benchmark and deterministic mode for this process; returns what was set,
    for the startup plan. On CPU only `deterministic` does anything (it is harmless there)."""
    if args.deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it is read when the first handle is
        # created, so it must be set before the first CUDA matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cudnn.benchmark = args.cudnn_benchmark and not args.deterministic
        torch.backends.cudnn.deterministic = args.deterministic
    mmap_threshold = release_freed_host_memory(args.cpu_mmap_threshold_kb) if device.type == "cpu" else None
    return {
        "tf32": device.type == "cuda" and args.tf32,
        "cudnn_benchmark": device.type == "cuda" and args.cudnn_benchmark and not args.deterministic,
        "deterministic": args.deterministic,
        "cpu_mmap_threshold_kb": mmap_threshold,
    }


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def release_freed_host_memory(threshold_kb: int) -> Optional[int]:
    """Make glibc serve every allocation of `threshold_kb` KiB or more with its own mmap, returned
    to the OS when freed (`perf.cpu_mmap_threshold_kb`; 0 or a libc without mallopt: unchanged).
    Returns the threshold set, or None. Setting it also stops glibc from raising the threshold
    after each large free (its default), which let freed activations and gradients of one step
    stay resident as heap the next step could not always reuse: measured on a 28.6M UNet step (1
    rank, batch 4 at 32x32 latents), a peak RSS 1240 MiB with glibc's default against 1078 MiB with
    1 MiB here, for 1024 MiB of tensors at the peak (FSDPMemTracker) plus the runtime."""
    if threshold_kb <= 0:
        return None
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return None
    return threshold_kb if libc.mallopt(M_MMAP_THRESHOLD, threshold_kb * 1024) == 1 else None


def use_fused_adamw(args: PerfArgs, device: torch.device) -> bool:
    """`auto` picks the fused kernel on CUDA and on CPU. Besides its lower per-step cost, it keeps
    the first step cheap under FSDP2: torch 2.13's DTensor sharding propagation for a foreach op
    over a list of N DTensors is quadratic in N (each of the N outputs re-walks every input spec),
    and AdamW's foreach step issues about seven such ops, so the first step over the 324 tensors of
    the test UNet takes 5-9 s with foreach against 1.3 s fused (later steps hit the cache: 35 ms
    against 12 ms). Fused rounds differently from foreach: `perf.optimizer_impl=foreach` gives the
    numerics of checkpoints made before fused became the CPU default."""
    if args.optimizer_impl == "auto":
        return device.type in ("cuda", "cpu")
    return args.optimizer_impl == "fused"


def peak_tflops(args: PerfArgs, device: torch.device) -> Optional[float]:
    """`perf.peak_tflops`, else the table's figure for this GPU, else None (no MFU)."""
    if args.peak_tflops is not None:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def training_flops_per_image(
    unet: torch.nn.Module, latent_shape: tuple[int, int, int], text_shape: tuple[int, int], device: torch.device
) -> float:
    """Forward+backward FLOPs of one image through `unet` (the plain, unwrapped module), counted by
    `FlopCounterMode` on a batch of one (the count is linear in the batch). Matmuls and convolutions
    only, as MFU conventionally counts; with gradient checkpointing the recompute is included.
    An SDXL UNet (`addition_embed_type: text_time`) also gets its pooled embedding and six time
    ids. Touches neither the weights nor the random state; the gradients it makes are dropped.
    Works on the meta device too (shapes only), which is how the SDXL figures were counted."""
    dtype = next(unet.parameters()).dtype
    x = torch.zeros(1, *latent_shape, device=device, dtype=dtype)
    text = torch.zeros(1, *text_shape, device=device, dtype=dtype)
    t = torch.zeros(1, dtype=torch.long, device=device)
    kwargs = {}
    config = getattr(unet, "config", None)
    if getattr(config, "addition_embed_type", None) == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": torch.zeros(1, pooled, device=device, dtype=dtype)}
        kwargs["added_cond_kwargs"] = added | {"time_ids": torch.zeros(1, 6, dtype=torch.long, device=device)}
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), FlopCounterMode(display=False) as counter:
        unet(x, t, encoder_hidden_states=text, **kwargs).sample.float().square().mean().backward()
    for p in unet.parameters():
        p.grad = None
    return float(counter.get_total_flops())


def bucket_flops_per_image(
    unet: torch.nn.Module, latents: list[tuple[int, int]], text_shape: tuple[int, int], device: torch.device
) -> dict[tuple[int, int], float]:
    """`data.buckets`: `training_flops_per_image` at each bucket's latent (h, w), counted once at
    startup; the keys are the latent sizes a step's input has."""
    channels = unet.config.in_channels  # type: ignore[union-attr]
    return {hw: training_flops_per_image(unet, (channels, *hw), text_shape, device) for hw in latents}


def micro_batch_flops(per_bucket: dict[tuple[int, int], float], latents: torch.Tensor) -> float:
    """`data.buckets`: the forward+backward FLOPs of one micro-batch, its images times its own
    bucket's figure (`bucket_flops_per_image`, keyed by the latent (h, w)). 0 when nothing was
    counted (the square path, or `perf.count_flops=false`). A latent shape outside a counted table
    is a bug (the loader's buckets and the trainer's set disagree): KeyError, not a silent 0."""
    if not per_bucket:
        return 0.0
    return latents.shape[0] * per_bucket[(int(latents.shape[-2]), int(latents.shape[-1]))]


def static_shapes_for_buckets(num_buckets: int) -> None:
    """`perf.compile` with `data.buckets`: one graph per bucket shape, never a dynamic-shape graph.
    By default dynamo recompiles a graph with symbolic sizes once it sees a second shape
    (automatic dynamic shapes), and gives up compiling a code object after 8 variants
    (`recompile_limit`), which a UNet block class shared by 3 instances reaches at 3 buckets.
    Process-wide dynamo settings, set before the first compile."""
    torch._dynamo.config.automatic_dynamic_shapes = False
    # Each unit class's forward holds one entry per instance (up to 3 in SD's UNet) and shape: the
    # buckets, plus the held-out and sample-grid batches at the square resolution.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * (num_buckets + 3))


def compile_module(module: torch.nn.Module, backend: str = "inductor") -> None:
    """Compile `module`'s forward in place: its parameters keep their names (no `_orig_mod.`
    prefix in checkpoints), and hooks registered on it afterwards (FSDP2's all-gather and
    reduce-scatter) run outside the compiled graph, as with torchtitan's per-block compile."""
    module.forward = torch.compile(module.forward, backend=backend)
