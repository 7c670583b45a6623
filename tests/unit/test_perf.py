"""The hot-path pieces on CPU: host-sync counting, the perf switches, FLOPs per image, the
throughput window, and a per-block compiled UNet against eager."""

from __future__ import annotations

import copy
import dataclasses
import os
import time

import pytest
import torch
from diffusers import UNet2DConditionModel

from sd_train.config import ConfigError, OptimArgs, PerfArgs, TrainConfig
from sd_train.host_sync import COUNTER, read_float, read_floats
from sd_train.metrics import StepWindow
from sd_train.model.parallelize import fsdp_units
from sd_train.optim import build_optimizer
from sd_train.perf import (
    apply_backend_flags,
    bucket_flops_per_image,
    compile_module,
    micro_batch_flops,
    peak_tflops,
    training_flops_per_image,
    use_fused_adamw,
)
from sd_train.preflight import resolve_precision

CPU = torch.device("cpu")


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def test_read_floats_counts_one_sync_per_call_and_keeps_values():
    a, b = torch.tensor(0.1, dtype=torch.float32), torch.tensor([3.0], dtype=torch.float64)
    before = COUNTER.count
    assert read_floats([a, b]) == [float(a), 3.0]  # float32 -> float64 is exact
    assert read_float(a) == float(a)
    assert COUNTER.count - before == 2


def test_perf_defaults_fused_everywhere_backend_flags_cuda_only():
    args = PerfArgs()
    assert use_fused_adamw(args, CPU) and use_fused_adamw(args, torch.device("cuda")), "auto: fused on CPU and CUDA"
    assert not use_fused_adamw(args, torch.device("mps"))
    assert not use_fused_adamw(PerfArgs(optimizer_impl="foreach"), CPU)
    flags = {"tf32": False, "cudnn_benchmark": False, "deterministic": False, "cpu_mmap_threshold_kb": 1024}
    assert apply_backend_flags(args, CPU) == flags
    model = torch.nn.Linear(3, 3)
    assert build_optimizer(model, OptimArgs()).defaults["foreach"] is True
    assert build_optimizer(model, OptimArgs(), fused=True).defaults["fused"] is True


def test_peak_table_and_override(monkeypatch):
    assert peak_tflops(PerfArgs(), CPU) is None, "no MFU on CPU unless perf.peak_tflops is given"
    assert peak_tflops(PerfArgs(peak_tflops=2.5), CPU) == 2.5
    for name, peak in [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_tflops(PerfArgs(), torch.device("cuda")) == peak, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L4")
    assert peak_tflops(PerfArgs(), torch.device("cuda")) is None


def test_peak_tflops_must_be_positive():
    cfg = TrainConfig()
    cfg.perf.peak_tflops = 0.0
    with pytest.raises(ConfigError, match="perf.peak_tflops"):
        cfg.validate(1)


class _LinearUNet(torch.nn.Module):
    """A stand-in with the UNet's call signature whose FLOPs are known by hand."""

    def __init__(self, features: int):
        super().__init__()
        self.proj = torch.nn.Linear(features, features)

    def forward(self, x, t, encoder_hidden_states):
        out = self.proj(x.flatten(1)).view_as(x)
        return type("Out", (), {"sample": out})()


def test_training_flops_per_image_matches_hand_count():
    model = _LinearUNet(4 * 2 * 2)
    rng = torch.get_rng_state()
    flops = training_flops_per_image(model, (4, 2, 2), (3, 5), CPU)
    # Forward 2*16*16; backward only the weight gradient (the input needs none): another 2*16*16.
    assert flops == 2 * (2 * 16 * 16)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_unet_flops_scale_with_resolution():
    unet = tiny_unet()
    small = training_flops_per_image(unet, (4, 8, 8), (77, 32), CPU)
    large = training_flops_per_image(unet, (4, 16, 16), (77, 32), CPU)
    assert small > 0 and 3.0 < large / small < 4.5  # convs scale with pixels, attention a bit faster


def test_bucket_flops_are_each_buckets_own():
    """data.buckets: one count per bucket's latent (h, w), each the figure of a plain count at that
    shape; a transposed bucket costs the same, a smaller one less."""
    unet = tiny_unet()
    per_bucket = bucket_flops_per_image(unet, [(8, 16), (16, 8), (8, 8)], (77, 32), CPU)
    assert set(per_bucket) == {(8, 16), (16, 8), (8, 8)}
    assert per_bucket[(8, 16)] == training_flops_per_image(unet, (4, 8, 16), (77, 32), CPU) == per_bucket[(16, 8)]
    assert per_bucket[(8, 8)] < per_bucket[(8, 16)]


def test_a_micro_batch_counts_its_own_buckets_flops():
    """What the trainer adds per micro-batch: its images times its own bucket's count (an independent
    plain count at that shape), not the largest bucket's; nothing when nothing was counted, and a
    shape outside the counted set is an error, not a silent 0."""
    unet = tiny_unet()
    per_bucket = bucket_flops_per_image(unet, [(8, 16), (8, 8)], (77, 32), CPU)
    small = torch.zeros(3, 4, 8, 8)
    assert micro_batch_flops(per_bucket, small) == 3 * training_flops_per_image(unet, (4, 8, 8), (77, 32), CPU)
    assert micro_batch_flops(per_bucket, torch.zeros(2, 4, 8, 16)) == 2 * per_bucket[(8, 16)]
    assert micro_batch_flops({}, small) == 0.0
    with pytest.raises(KeyError):
        micro_batch_flops(per_bucket, torch.zeros(1, 4, 16, 8))


def test_step_window_excludes_eval_and_reports_mfu():
    window = StepWindow(8, CPU, world_size=2, flops_per_image=1e12, peak_tflops=10.0)
    window.step_started()
    with window.phase("forward_backward"):
        time.sleep(0.02)
    window.step_ended(0.0, True)
    window.count_host_syncs(1)
    with window.excluded():
        time.sleep(0.2)
    values = window.read()
    assert values["speed/img_per_s_per_gpu"] > 4 * values["speed/img_per_s"] / 2, "eval time left out"
    assert values["speed/mfu"] == pytest.approx(values["speed/tflops_per_gpu"] / 10.0)
    assert values["speed/forward_backward_ms"] >= 20
    assert values["speed/host_syncs_per_step"] == 1
    assert {"memory/peak_gb", "memory/peak_allocated_gb", "memory/peak_reserved_gb"} <= values.keys()


def test_step_window_counts_each_steps_own_flops_with_buckets():
    """data.buckets: the FLOPs are each step's own (its buckets), not samples x one figure; a skipped
    step counts none. One process here: the sum over ranks is this rank's."""
    window = StepWindow(8, CPU, world_size=1, flops_per_image=5e12, peak_tflops=10.0, step_flops=True)
    window.step_ended(0.0, True, flops=3e12)
    window.step_ended(0.0, True, flops=1e12)
    window.step_ended(0.0, False, flops=7e12)
    time.sleep(0.2)  # the window's time: about 0.2 s
    start = window.start
    values = window.read()
    elapsed = time.perf_counter() - start
    assert values["speed/tflops_per_gpu"] == pytest.approx(4e12 / elapsed / 1e12, rel=0.05)  # not 16 x 5e12
    assert values["speed/mfu"] == pytest.approx(values["speed/tflops_per_gpu"] / 10.0)


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",
        pytest.param(
            "inductor",
            marks=pytest.mark.skipif(
                not os.environ.get("SD_TRAIN_TEST_INDUCTOR"),
                reason="inductor's C++ code generation for 5 blocks takes 3-6 minutes on a 2-core CPU: "
                "`make test-slow` runs it (SD_TRAIN_TEST_INDUCTOR=1)",
            ),
        ),
    ],
)
def test_per_block_compile_matches_eager(backend):
    """Each FSDP unit compiled (what perf.compile does before fully_shard): forward and gradients
    within 1e-4 (relative to the largest value) of eager, and the parameter names, which the
    checkpoints use, unchanged. `aot_eager` captures the same forward and backward graphs through
    dynamo and AOTAutograd as inductor does, without generating code."""
    eager = tiny_unet()
    compiled = copy.deepcopy(eager)
    for unit in fsdp_units(compiled):
        compile_module(unit, backend)
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g)
    t = torch.tensor([10, 500])
    outs = []
    for model in (eager, compiled):
        out = model(x, t, encoder_hidden_states=text).sample
        out.square().mean().backward()
        outs.append((out.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (ye, ge), (yc, gc) = outs
    assert (ye - yc).abs().max() <= 1e-4 * ye.abs().max()
    assert (ge - gc).abs().max() <= 1e-4 * ge.abs().max()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "nothing was compiled"


@pytest.mark.parametrize(
    "strategy, mixed, param_dtype, resolved, autocast",
    [
        ("fsdp2", "bf16", "auto", "bf16", False),  # the FSDP2 policy: bf16 params, no autocast
        ("deepspeed3", "bf16", "auto", "bf16", False),  # DeepSpeed's bf16 mode, the same policy
        ("ddp", "bf16", "auto", "fp32", True),  # DDP and ZeRO-2: autocast over fp32 params
        ("deepspeed2", "bf16", "auto", "fp32", True),
        ("ddp", "bf16", "bf16", "bf16", True),  # DDP has no bf16 params to gather
        ("deepspeed3", "bf16", "fp32", "fp32", True),
        ("fsdp2", "bf16", "fp32", "fp32", True),  # the other policy, asked for explicitly
        ("fsdp2", "bf16", "bf16", "bf16", False),  # never bf16 params under autocast as well
        ("fsdp2", "no", "auto", "fp32", False),
        ("fsdp2", "no", "bf16", "bf16", False),
    ],
)
def test_one_bf16_policy_per_strategy(strategy, mixed, param_dtype, resolved, autocast):
    cfg = TrainConfig(mixed_precision=mixed)
    stage = None
    if strategy.startswith("deepspeed"):  # deepspeed2, deepspeed3: the ZeRO stage
        strategy, stage = "deepspeed", int(strategy[-1])
    cfg.dist = dataclasses.replace(cfg.dist, strategy=strategy, zero_stage=stage, param_dtype=param_dtype)
    out = resolve_precision(cfg)
    assert out.dist.param_dtype == resolved
    assert out.autocast_bf16() is autocast
