"""The tiny SDXL end to end on 2 CPU ranks under FSDP2, in one chain of launches that share their
checkpoints: a straight run; a run stopped by SIGTERM at step 5 and relaunched; the straight run's
last checkpoint resumed on one process (2 -> 1). Training sees the LAION-like shards (wide, tall,
square, tiny and extreme images) in aspect-ratio buckets (data.buckets=generated, misfits filtered),
with random crops and flips, so every sample carries its own size, crop and bucket into the
micro-conditioning, and drops captions and size/crop pairs. (SDXL under DeepSpeed ZeRO-3:
tests/e2e/test_deepspeed.py.)"""

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from sd_train.config import DataArgs
from sd_train.data.buckets import bucket_set, pixel_factor
from sd_train.export import main_export
from sd_train.perf import training_flops_per_image
from sd_train.tools.posthoc import main_posthoc
from tests.support.bucket_reference import expected_bucket, upright_sizes
from tests.support.launch import ranks_cmd, run
from tests.support.reference import assert_logged_val_matches_export
from tests.support.runs import TRAIN, assert_states_equal, full_state, keys_by_step, unet_weights
from tests.support.streams import LAION_SPEC

pytestmark = pytest.mark.multiproc
# 8 steps of 8 samples; the EMA window opens at step 4 (0.5^4 = 6.25% pre-window share); post-hoc
# snapshots at 4, 6, 8 (3 x 2 profiles span the 5 weights w_4..w_8); one evaluation, at the end.
COMMON = [
    "max_steps=8",
    "ema.step_start_ema=4",
    "ema.decay=0.5",
    "ema.tolerance=0.1",
    "checkpoint.every_steps=4",
    "checkpoint.keep_last_k=0",
    "eval.every_steps=8",
    "eval.num_val_samples=8",
    "data.log_keys=true",
    "data.center_crop=false",
    "data.random_flip=true",
    "objective.microcond_dropout=0.3",
    "metrics.log_every=2",
    "ema.posthoc.sigma_rels=[0.05,0.1]",
    "ema.posthoc.snapshot_every=2",
    "perf.peak_tflops=0.001",  # so a CPU run logs speed/mfu too
    # Aspect-ratio buckets on the LAION-like set at 32 px: 16x64, 24x40, 32x32, 40x24, 64x16 (the
    # tiny SDXL's pixel factor is 8), its misfits filtered and counted.
    f"data.train_shards={LAION_SPEC}",
    "data.resolution=32",
    "data.buckets=generated",
    "data.bucket_misfits=filter",
]
FAST = ["eval.every_steps=0", "export_at_end=false"]


def sdxl_cmd(nproc: int, out: Path, assets: dict, *extra: str) -> list[str]:
    args = ["--config", "configs/test.yaml", *assets["overrides"], *COMMON, f"output_dir={out}", *extra]
    return [sys.executable, TRAIN, *args] if nproc == 1 else ranks_cmd(nproc, TRAIN, *args)


def test_sdxl_fsdp2_ema_export_sigterm_resume_reshard_and_posthoc(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    # A: the straight run, FSDP2-sharded per transformer block and resnet (dist.fsdp_units=auto).
    a = tmp_path / "a"
    straight = run(sdxl_cmd(2, a, tiny_sdxl), timeout=300)
    assert "buckets: 5 buckets" in straight.stdout and "sets the activation peak" in straight.stdout
    topo = json.loads((a / "topology.json").read_text())
    assert topo["world_size"] == 2 and topo["strategy"] == "fsdp2"
    assert all(r["all_dtensor"] and r["placements"] == ["(Shard(dim=0),)"] for r in topo["ranks"])
    assert "fsdp_units: layers" in (a / "config.yaml").read_text()
    assert topo["ranks"][0]["fsdp_units"] == expected_units(tiny_sdxl["model"])
    # The logged EMA evaluation is the exported EMA pipeline's loss, scored by a plain UNet here.
    assert_logged_val_matches_export(a, 8)
    # Each micro-batch held one bucket (from the keys and an independent reading of the images), and
    # the ranks held different buckets at some steps (the collectives are on the parameters).
    sizes = list(bucket_set(DataArgs(buckets="generated", resolution=32), pixel_factor(str(tiny_sdxl["model"]))).sizes)
    bucket_of = {k: expected_bucket(s, sizes, 4.0, "filter") for k, s in upright_sizes().items() if s}
    keys = {r: keys_by_step(a, r) for r in (0, 1)}
    shapes = {(step, r): {bucket_of[k] for k in keys[r][step]} for step in range(1, 9) for r in (0, 1)}
    assert all(len(s) == 1 for s in shapes.values()), "a micro-batch of one bucket"
    assert any(shapes[(step, 0)] != shapes[(step, 1)] for step in range(1, 9)), "the ranks held different buckets"
    # Throughput in buckets: each window's FLOPs per image are those of the buckets its steps trained
    # (plain counts at each bucket's latent shape, with the pooled embedding and time ids).
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl["model"], subfolder="unet")
    cpu = torch.device("cpu")
    flops = {f"{h}x{w}": training_flops_per_image(unet, (4, h // 2, w // 2), (77, 96), cpu) for h, w in sizes}
    rows = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    speed = [r for r in rows if "speed/mfu" in r]
    assert [r["step"] for r in speed] == [2, 4, 6, 8]
    for r in speed:
        window = [k for step in (r["step"] - 1, r["step"]) for rank in (0, 1) for k in keys[rank][step]]
        want = sum(flops[bucket_of[k]] for k in window) / len(window)
        assert r["speed/tflops_per_gpu"] * 1e12 / r["speed/img_per_s_per_gpu"] == pytest.approx(want, rel=1e-9)
    # Per-bucket samples and shares, the carried samples and the misfits, counted.
    last = [r for r in rows if "data/bucket_carried" in r][-1]
    trained = Counter(bucket_of[k] for r in (0, 1) for step in range(1, 9) for k in keys[r][step])
    assert {f"{h}x{w}": last.get(f"data/bucket_{h}x{w}_samples", 0) for h, w in sizes} == {
        f"{h}x{w}": trained[f"{h}x{w}"] for h, w in sizes
    }
    shares = [v for k, v in last.items() if k.startswith("data/bucket_") and k.endswith("_share")]
    assert abs(sum(shares) - 1) < 1e-9 and last["data/bucket_carried"] > 0
    assert last["data/filtered_bucket_aspect"] > 0 and last["data/filtered_bucket_too_small"] > 0

    # B: SIGTERM on rank 1 in the middle of step 5 (off the checkpoint cadence), then a relaunch:
    # every checkpoint tensor (raw and EMA UNets, optimizer, post-hoc profiles) equals A's, and
    # every step saw the same sample keys in the same order: the bucket buffers came back exactly.
    b = tmp_path / "b"
    proc = run(sdxl_cmd(2, b, tiny_sdxl, *FAST), timeout=300, SD_TRAIN_FAULT="rank=1,step=5,phase=mid_step,action=term")
    assert "preempted (SIGTERM): saved a complete checkpoint at step 5" in proc.stdout
    resumed = run(sdxl_cmd(2, b, tiny_sdxl, *FAST), timeout=300)
    assert "resumed from" in resumed.stdout and "at step 5" in resumed.stdout
    assert_states_equal(
        full_state(a / "checkpoints" / "step_00000008"), full_state(b / "checkpoints" / "step_00000008")
    )
    for r in (0, 1):
        assert keys_by_step(b, r) == keys_by_step(a, r)

    # C: 2 -> 1. A's last checkpoint loads on one process: the exported raw and EMA UNets are A's.
    c = tmp_path / "c"
    one = run(sdxl_cmd(1, c, tiny_sdxl, "eval.every_steps=0", f"checkpoint.resume={a}/checkpoints/step_00000008"))
    assert "at step 8 (saved by 2 ranks, now 1)" in one.stdout
    for kind in ("raw", "ema"):
        wa, wc = unet_weights(a / "export" / kind), unet_weights(c / "export" / kind)
        assert wa.keys() == wc.keys() and all(torch.equal(wa[k], wc[k]) for k in wa), kind

    # `sd-train export` of the 2-rank checkpoint, in this process: the same SDXL pipeline.
    assert main_export(["--checkpoint", str(a / "checkpoints" / "step_00000008"), "--out", str(c / "cli")]) == 0
    wa, wx = unet_weights(a / "export" / "ema"), unet_weights(c / "cli")
    assert all(torch.equal(wa[k], wx[k]) for k in wa) and (c / "cli" / "tokenizer_2").is_dir()

    # Post-hoc: a reconstructed EMA exports as an SDXL pipeline that diffusers loads offline and samples.
    assert main_posthoc(["--run", str(a), "--sigma-rel", "0.1"]) == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(a / "posthoc_export" / "sigma_rel_0.1", local_files_only=True)
    image = pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="np").images[0]
    assert image.shape == (16, 16, 3) and float(image.std()) > 0


def expected_units(model: Path) -> int:
    """FSDP units below the root under `layers`, counted from the module tree: each down/mid/up
    block, each resnet in them, and each Transformer2DModel, or each of its transformer blocks
    when it holds several."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    resnets = sum(len(b.resnets) for b in blocks)
    transformers = [a for b in blocks for a in getattr(b, "attentions", None) or []]
    split = sum(len(a.transformer_blocks) if len(a.transformer_blocks) > 1 else 1 for a in transformers)
    assert any(len(a.transformer_blocks) > 1 for a in transformers), "the tiny SDXL must exercise the split"
    return len(blocks) + resnets + split
