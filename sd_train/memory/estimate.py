"""The training step's memory, estimated with torch's own tools on fake tensors: the UNet is built on
the meta device from the model folder's config, wrapped by the same FSDP2 code as a run (the
model's units, the run's reshard/prefetch/dtype settings) over a fake process group of the shard
group's size, and one optimizer step (its micro-batches, gradient clipping, the run's AdamW) runs
under `torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker` inside `FakeTensorMode`, as
torchtitan's estimation script (estimate/estimation.py under its scripts) does. No memory is
allocated and no kernel runs, so a CPU can plan a 64-GPU run. Then the evaluation's no-grad
forward (FSDPMemTracker again) and the frozen VAE and text encoders (torch's MemTracker). The
result is cached (sd_train.memory.record) for the torch-free startup check.

Measured for real: the RSS of this process once the trainer's modules are imported (the runtime
every rank pays), and on a probe loader with forkserver workers, the server's anonymous memory and
each worker's unique memory (USS).

    python -m sd_train.memory.estimate --config configs/sd2_base_256.yaml --world-size 8 [overrides]

The optimizer is the run's (sd_train.optim.build_optimizer: AdamW on the DTensors' local shards).
torch's own AdamW on DTensors is what made FSDPMemTracker report 4-5x the optimizer state
(measured here: 490-545 MiB of "OptState" for a 28.6M UNet on 2 fake ranks, against the 109 MiB of
its two moments; 108.9 MiB with ShardLocalAdamW).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.device_mesh import init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from sd_train.config import TrainConfig, load_config
from sd_train.memory.record import StepEstimate, estimate_key, latent_factor, step_shape, store_estimate
from sd_train.model.conditioning import Conditioning
from sd_train.model.family import TIME_IDS
from sd_train.model.parallelize import block_layers, fsdp_units
from sd_train.objective import DiffusionObjective
from sd_train.optim import build_optimizer, clip_grad_norm_
from sd_train.parallel.fsdp import FSDPStrategy
from sd_train.parallel.process_group import DistInfo

CPU = torch.device("cpu")
VAE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOKENS = 77  # CLIP's context: every SD caption is padded to it


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# A loader with 2 forkserver workers over an in-memory data set, 40 batches: the server's anonymous
# memory (what the rank's preloaded modules cost it once) and each worker's unique memory (USS).
_WORKER_PROBE = """
import sys, psutil, torch
from torch.utils.data import DataLoader, TensorDataset
from sd_train.data.loader import worker_context
if __name__ == "__main__":
    loader = DataLoader(TensorDataset(torch.randn(512, 4, 32, 32)), batch_size=2, num_workers=2,
                        multiprocessing_context=worker_context("forkserver"))
    it = iter(loader)
    for _ in range(40):
        next(it)
    kids = psutil.Process().children(recursive=True)
    workers = [k for k in kids if k.ppid() != psutil.Process().pid]
    server = [k for k in kids if k.ppid() == psutil.Process().pid and "forkserver" in " ".join(k.cmdline())]
    anon = [int(l.split()[1]) * 1024 for l in open(f"/proc/{server[0].pid}/status") if l.startswith("RssAnon:")]
    sys.stdout.write(f"{anon[0]} {max(w.memory_full_info().uss for w in workers)}")
"""


def worker_memory() -> tuple[int, int]:
    """(the forkserver's anonymous RSS, one loader worker's unique memory), measured on a probe
    loader in a child interpreter; (0, 0) if the probe fails."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", _WORKER_PROBE], capture_output=True, text=True, timeout=600, check=True
        )
        server, worker = (int(v) for v in out.stdout.split())
        return server, worker
    except (OSError, subprocess.SubprocessError, ValueError):
        return 0, 0


def _snapshot(tracker: MemTracker) -> dict[str, int]:
    snap = tracker.get_tracker_snapshot("peak").get(CPU, {})
    return {str(getattr(k, "value", k)): int(v) for k, v in snap.items()}


def _peak_of(fn: Callable[[], object]) -> int:
    """Bytes allocated at the peak of `fn` (only what it allocates: torch's MemTracker)."""
    tracker = MemTracker()
    with tracker:
        fn()
    return _snapshot(tracker).get("Total", 0)


def fake_unet(cfg: TrainConfig) -> torch.nn.Module:
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(cfg.model.pretrained_path, subfolder="unet")
        )
    if cfg.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


def conditioning(config, batch: int) -> Conditioning:
    """Fake conditioning of `batch` samples for a UNet config: the text encoders' hidden states,
    and for SDXL (`addition_embed_type=text_time`) the pooled embedding and the six size/crop ids."""
    embeds = torch.randn(batch, TOKENS, config.cross_attention_dim)
    if config.addition_embed_type != "text_time":
        return Conditioning(embeds)
    pooled = config.projection_class_embeddings_input_dim - TIME_IDS * config.addition_time_embed_dim
    return Conditioning(embeds, torch.randn(batch, pooled), torch.zeros(batch, TIME_IDS, dtype=torch.long))


def unet_step(cfg: TrainConfig, key: dict, mesh) -> tuple[dict[str, int], int, dict]:
    """FSDPMemTracker's peak snapshot of one optimizer step, the no-grad evaluation forward's
    transient, and the UNet's sizes (for folders without safetensors)."""
    fsdp = key["layout"] == "fsdp2"
    args = cfg.dist if fsdp else dataclasses.replace(cfg.dist, param_dtype="fp32", reduce_dtype="fp32", prefetch=0)
    args = dataclasses.replace(args, strategy="fsdp2", shard_group_size=None)
    perf = dataclasses.replace(cfg.perf, compile=False)  # compiled graphs are not estimated (as torchtitan)
    info = DistInfo(0, key["shard_size"], 0, CPU, mesh)
    unet = fake_unet(cfg)
    sizes = {name: p.numel() for name, p in unet.named_parameters()}
    strategy = FSDPStrategy(args, info, cfg.optim.max_grad_norm, fsdp_units, perf, block_layers)
    model = strategy.wrap_model(unet)
    model.to_empty(device=CPU)  # fake storage; the optimizer is built on the materialised params
    model.train()
    optimizer = build_optimizer(model, cfg.optim, fused=key["fused"])
    scheduler = DDPMScheduler.from_pretrained(cfg.model.pretrained_path, subfolder="scheduler")
    f = latent_factor(cfg.model.pretrained_path)
    latent = tuple(side // f for side in step_shape(cfg))  # the largest bucket's, or the square
    objective = DiffusionObjective(cfg.objective, scheduler.alphas_cumprod, conditioning(unet.config, 1))
    mb = cfg.micro_batch_size
    latents, cond = torch.randn(mb, unet.config.in_channels, *latent), conditioning(unet.config, mb)
    # The optimizer's state exists from the first step on: created here, outside the tracker,
    # which counts the existing state when it starts.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=key["autocast_bf16"])
    tracker = FSDPMemTracker(model, optimizer)
    tracker.track_inputs((latents, cond.text_embeds))
    n = key["micro_batches"]
    with tracker:
        optimizer.zero_grad(set_to_none=True)
        for i in range(n):
            model.set_requires_gradient_sync(i == n - 1)
            with autocast:
                loss = objective.loss(model, latents, cond) / n
            loss.backward()
            del loss
            if i < n - 1:
                # The tracker follows one forward and backward per module; the peak so far is kept.
                tracker.reset_mod_stats()
        clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm or float("inf"))
        optimizer.step()
    step = _snapshot(tracker)
    batch = max(key["eval_batches"], default=0)
    transient = 0
    if batch:
        model.eval()
        x, c = torch.randn(batch, unet.config.in_channels, *latent), conditioning(unet.config, batch)
        t = torch.zeros(batch, dtype=torch.long)
        tracker = FSDPMemTracker(model, optimizer)
        with tracker, torch.no_grad():
            model(x, t, **c.unet_kwargs())
        snap = _snapshot(tracker)
        held = sum(snap.get(c, 0) for c in ("Sharded Param", "Sharded Grad", "OptState", "Buffer"))
        transient = snap.get("Total", 0) - held
    described = {"unet_numel": sum(sizes.values()), "units": {}, "largest_tensor": max(sizes.values())}
    return step, transient, {**described, "tensors": sizes}


def frozen_transients(cfg: TrainConfig, key: dict) -> tuple[int, int, int, int]:
    """(VAE decode of the sample grid, online encoding of a micro-batch, VAE params, text encoder
    params), on fake tensors in the frozen parts' dtype."""
    path = cfg.model.pretrained_path
    dtype = torch.bfloat16 if key["frozen_bf16"] else torch.float32
    vae_dtype = VAE_DTYPES.get(key["vae_dtype"], dtype)
    vae = _fake_module(lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(path, subfolder="vae")), vae_dtype)
    encoders = [
        _fake_module(lambda cls=cls, sub=sub: cls(cls.config_class.from_pretrained(path, subfolder=sub)), dtype)
        for cls, sub in ((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2"))
        if (Path(path) / sub).is_dir()
    ]
    latent = cfg.data.resolution // latent_factor(path)
    channels = vae.config.latent_channels
    decode = 0
    if key["prompts"]:
        z = torch.randn(key["prompts"], channels, latent, latent, dtype=vae_dtype)
        with torch.inference_mode():
            decode = _peak_of(lambda: vae.decode(z).sample.float())
    encode = 0
    if not key["precomputed"]:
        mb = cfg.micro_batch_size
        pixels = torch.randn(mb, 3, *step_shape(cfg), dtype=vae_dtype)
        ids = torch.zeros(mb, TOKENS, dtype=torch.long)
        with torch.inference_mode():
            encode = max(
                _peak_of(lambda: vae.encode(pixels).latent_dist.sample()),
                *(_peak_of(lambda e=e: e(ids, output_hidden_states=True)) for e in encoders),
            )
    count = [sum(p.numel() for p in m.parameters()) for m in (vae, *encoders)]
    return decode, encode, count[0], sum(count[1:])


def _fake_module(build: Callable[[], torch.nn.Module], dtype: torch.dtype) -> torch.nn.Module:
    """A frozen part built straight on fake tensors in its dtype (its init runs no kernel): fake
    parameters cannot be converted by `Module.to`/`to_empty` afterwards (torch swaps them, and the
    fake mode holds weak references to them)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return build().eval()
    finally:
        torch.set_default_dtype(default)


def estimate_step(cfg: TrainConfig, world_size: int, shard_size: int) -> StepEstimate:
    """The step estimate of a resolved config (sd_train.preflight) on `world_size` ranks sharding
    over `shard_size`. Opens and closes a fake process group in this process."""
    key = estimate_key(cfg, world_size, shard_size)
    runtime = rss_bytes()
    started = time.perf_counter()
    dist.init_process_group("fake", rank=0, world_size=key["shard_size"], store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (key["shard_size"],))  # outside fake mode, as torchtitan
        with FakeTensorMode(allow_non_fake_inputs=True):
            step, eval_transient, sizes = unet_step(cfg, key, mesh)
            decode, encode, vae_numel, text_numel = frozen_transients(cfg, key)
    finally:
        dist.destroy_process_group()
    sizes.update(vae_numel=vae_numel, text_encoder_numel=text_numel, unet_file_bytes=4 * sizes["unet_numel"])
    server, worker = worker_memory()
    return StepEstimate(
        key=key,
        step=step,
        eval_transient=eval_transient,
        decode_transient=decode,
        encode_transient=encode,
        runtime_rss=runtime,
        worker_server_anon=server,
        worker_uss=worker,
        sizes=sizes,
        seconds=round(time.perf_counter() - started, 1),
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m sd_train.memory.estimate --config X --world-size N [--ranks-per-node R] [overrides]`:
    compute the step estimate of a resolved config and cache it; print where."""
    p = argparse.ArgumentParser(prog="python -m sd_train.memory.estimate", description=main.__doc__)
    p.add_argument("--config", required=True, help="a resolved config (sd_train.preflight), e.g. a run's config.yaml")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--shard-size", type=int, required=True, help="ranks sharding the UNet (the plan's shard group)")
    p.add_argument("overrides", nargs="*")
    ns = p.parse_args(argv)
    cfg = load_config(ns.config, ns.overrides)
    record = estimate_step(cfg, ns.world_size, ns.shard_size)
    path = store_estimate(record)
    print(f"memory estimate: {record.step.get('Total', 0) / 2**30:.2f} GiB step peak in {record.seconds} s -> {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
