"""DeepSpeed ZeRO-3 and ZeRO-2 on 2 CPU processes, started the way users start them:
`accelerate launch --config_file launch/accelerate/zero{2,3}.yaml` with the sd-train config left at
`dist.strategy: auto`. Each test trains straight to the end, then resumes a copy of a mid-run
checkpoint to the same end, and compares optimizer state (with the fp32 master weights) and EMA
with torch.equal. ZeRO-3 runs in DeepSpeed's bf16 mode (`mixed_precision=bf16`: bf16 partitions,
fp32 master partitions, the EMA of the master), as at scale, and trains the tiny SDXL (two text
encoders, pooled and size/crop conditioning, non-square images with random crops and flips): the
strategy is model-agnostic, so SDXL's run covers what SD's did and SDXL under ZeRO-3 besides. SD
under ZeRO-3 is still run bitwise by scripts/compare_commits.py (its zero3 phase). ZeRO-2 trains
SD, in fp32."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from sd_train.ema.posthoc import load_snapshot_profile
from sd_train.parallel.deepspeed import offline_shadow, offline_state, shadow_file
from sd_train.paths import snapshot_steps
from sd_train.tools.posthoc import find_snapshots, main_posthoc, plan_targets, reconstruct
from tests.support.launch import BIN, REPO, free_port, run
from tests.support.noise_check import first_step_residual_share
from tests.support.reference import assert_logged_val_matches_export

DIFFUSION = 1e-4
# Window at step 8 of 12 with decay 0.5: 4 EMA updates, 0.5^4 = 6.25% pre-window share.
COMMON = [
    "max_steps=12",
    "ema.step_start_ema=8",
    "ema.decay=0.5",
    "ema.tolerance=0.1",
    "checkpoint.keep_last_k=0",
    "eval.every_steps=12",
    "metrics.log_every=2",
    # The post-hoc profiles start with the plain EMA; snapshots at 8, 10, 12: 3 x 2 profiles span
    # the 5 weights w_8..w_12.
    "ema.posthoc.sigma_rels=[0.05,0.1]",
    "ema.posthoc.snapshot_every=2",
    # Langevin noise after every step (std sqrt(2 D lr) = 3.2e-4 at step 1), which must land in the
    # fp32 master weights DeepSpeed's optimizer steps (check_first_step_noise) and resume exactly.
    f"optim.langevin.diffusion={DIFFUSION}",
]
SIGMAS, DECAYS, K = [0.1], [0.5], 2


def zero_cmd(stage: int, out: Path, assets: dict, *extra: str) -> list[str]:
    return [
        str(BIN / "accelerate"),
        "launch",
        "--config_file",
        f"launch/accelerate/zero{stage}.yaml",
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        str(REPO / "train.py"),
        "--config",
        "configs/test.yaml",
        *assets["overrides"],
        *COMMON,
        f"output_dir={out}",
        *extra,
    ]


def exported(out: Path, weights: str) -> dict[str, torch.Tensor]:
    return load_file(out / "export" / weights / "unet" / "diffusion_pytorch_model.safetensors")


def step(out: Path, n: int) -> Path:
    return out / "checkpoints" / f"step_{n:08d}"


def tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested state, by path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    out = {}
    for k, v in items:
        out.update(tensors(v, f"{prefix}.{k}"))
    return out


def assert_equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a and a.keys() == b.keys(), what
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{what}: {len(diff)} of {len(a)} tensors differ, e.g. {diff[:3]}"


def straight_and_resumed(stage: int, assets: dict, tmp_path: Path, every: int, *extra: str, **fault_env: str):
    """Run A to step 12 (checkpoints every `every` steps, export at the end); run B from a copy of
    A's step-8 checkpoint (the window's first step) to step 12. Their final checkpoints must be
    bitwise equal: every rank's optimizer partition (fp32 master weights, Adam moments, step), EMA
    pieces and post-hoc profile pieces, and so must their last snapshot."""
    a, b = tmp_path / "a", tmp_path / "b"
    proc = run(zero_cmd(stage, a, assets, f"checkpoint.every_steps={every}", *extra), timeout=300, **fault_env)
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(step(a, 8), step(b, 8))
    resumed = run(zero_cmd(stage, b, assets, "checkpoint.every_steps=4", "export_at_end=false", *extra), timeout=300)
    assert f"resumed from {step(b, 8)} at step 8 (saved by 2 ranks, now 2)" in resumed.stdout
    for r in range(2):
        [fa] = (step(a, 12) / "zero").glob(f"*zero_pp_rank_{r}_*optim_states.pt")  # bf16_zero_pp... in bf16 mode
        fb = step(b, 12) / "zero" / fa.name
        sa, sb = (tensors(torch.load(f, weights_only=False)["optimizer_state_dict"]) for f in (fa, fb))
        assert_equal_states(sa, sb, f"ZeRO-{stage} optimizer partition of rank {r} after resume")
        ea, eb = (torch.load(s / f"ema_rank_{r}.pt", weights_only=False)["pieces"] for s in (step(a, 12), step(b, 12)))
        assert_equal_states(ea, eb, f"ZeRO-{stage} EMA pieces of rank {r} after resume")
        pa, pb = (torch.load(shadow_file(step(x, 12), "posthoc", r), weights_only=False) for x in (a, b))
        assert pa["zero_stage"] == stage and pa["world_size"] == 2
        assert_equal_states(pa["pieces"], pb["pieces"], f"ZeRO-{stage} profile pieces of rank {r} after resume")
    assert snapshot_steps(b / "posthoc") == [10, 12]
    for i in range(K):
        sa, sb = (load_snapshot_profile(x / "posthoc" / "step_00000012", i) for x in (a, b))
        assert_equal_states(sa, sb, f"ZeRO-{stage} snapshot profile {i} after resume")
    return a, proc


def check_first_step_noise(out: Path, assets: dict, bf16: bool) -> None:
    """Step 1's master weights (zero_to_fp32 reads the optimizer's fp32 partitions) carry the noise
    the world-1 reference generates for step 1 (tests/support/noise_check.py): ZeRO-3 keyed it by each
    partition's global offset and put it into the master, not into a copy the next step overwrites.
    In bf16 mode the master starts from the bf16 weights."""
    before = UNet2DConditionModel.from_pretrained(str(assets["model"]), subfolder="unet").state_dict()
    before = {n: t.bfloat16().float() if bf16 else t for n, t in before.items()}
    after = offline_state(step(out, 1), "raw")
    # configs/test.yaml: lr 1e-3 with 2 warmup steps (step 1 at half), weight decay 1e-2 (the default).
    within, control = first_step_residual_share(before, {n: after[n] for n in before}, 5e-4, 1e-2, DIFFUSION, seed=0)
    print(f"\nstep-1 residuals within lr: {within:.4f} with the noise removed, {control:.4f} without")
    assert within >= 0.999 and control < 0.8, (within, control)


def check_topology(out: Path, stage: int) -> dict:
    topo = json.loads((out / "topology.json").read_text())
    assert (topo["world_size"], topo["strategy"], topo["zero_stage"], topo["backend"]) == (
        2,
        "deepspeed",
        stage,
        "gloo",
    )
    assert [r["rank"] for r in topo["ranks"]] == [0, 1]
    return topo


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def check_posthoc(stage: int, out: Path) -> None:
    """The post-hoc checks on run A of a stage (see the module docstring)."""
    assert not dist.is_initialized(), "the checks below read in one process with no process group"
    topo = check_topology(out, stage)
    last = step(out, 12)
    raw, ema = offline_state(last, "raw"), offline_state(last, "ema")
    full_numel = sum(t.numel() for t in raw.values())
    pieces = [torch.load(shadow_file(last, "posthoc", r), weights_only=False)["pieces"] for r in range(2)]
    assert pieces[0].keys() == {f"p{i}.{n}" for i in range(K) for n in raw}
    plan = json.loads((out / "ema_plan.json").read_text())
    if stage == 3:
        # Parameters are partitioned, and so are the profiles: ceil(numel / 2) per rank per tensor.
        size = {"bfloat16": 2, "float32": 4}[topo["ranks"][0]["param_dtype"]]
        for r in topo["ranks"]:
            assert r["placements"] == ["zero3-partition"]
            assert full_numel * size / 2 <= r["local_param_bytes"] <= full_numel * size / 2 + size * len(raw), r
        for name, t in raw.items():
            assert [p[f"p1.{name}"].numel() for p in pieces] == [math.ceil(t.numel() / 2)] * 2, name
        live = K * 4 * sum(math.ceil(t.numel() / 2) for t in raw.values())
    else:
        # ZeRO-2 keeps the profiles replicated, as it keeps the EMA: both ranks hold the same full tensors.
        assert all(r["placements"][0].startswith("replicated") for r in topo["ranks"])
        assert_equal_states(pieces[0], pieces[1], "replicated profiles on rank 0 vs rank 1")
        assert all(pieces[0][f"p0.{n}"].shape == t.shape for n, t in raw.items())
        live = K * 4 * full_numel
    assert plan["ema/posthoc/live_bytes_per_rank"] == live

    root = out / "posthoc"
    assert snapshot_steps(root) == [8, 10, 12]
    meta = json.loads((root / "step_00000012" / "snapshot.json").read_text())
    assert (meta["world_size"], meta["layout"]) == (2, "zero3" if stage == 3 else "replicated")
    assert ("shapes" in meta) == (stage == 3)  # ZeRO-3 stores each parameter flattened
    # DCP writes each element once (plus ~1.6 KB per stored tensor), the ranks about half each
    # (replicated tensors spread over them): the plan's K x P x 4 / W bytes per rank, also for ZeRO-2.
    sizes = [(root / "step_00000012" / f"__{r}_0.distcp").stat().st_size for r in range(2)]
    payload = K * 4 * full_numel
    assert payload <= sum(sizes) <= payload + 2 * K * len(raw) * 2048, sizes
    assert all(s >= 0.4 * sum(sizes) for s in sizes), sizes
    assert plan["ema/posthoc/bytes_per_snapshot_per_rank"] == payload // 2

    # Written by 2 ranks, read in one process: the live profiles of the last checkpoint, bitwise.
    tracked = [offline_shadow(last, "posthoc", f"p{i}.") for i in range(K)]
    for i in range(K):
        assert_equal_states(load_snapshot_profile(root / "step_00000012", i), tracked[i], f"snapshot profile {i}")

    snaps = find_snapshots(out)
    targets = plan_targets(snaps, SIGMAS, DECAYS, max_fit_error=0.05)
    assert all(t.refused is None for t in targets), [t.refused for t in targets]
    rec = reconstruct(snaps, targets)
    profile_diff = max_diff(rec["sigma_rel_0.1"], tracked[1])
    decay_diff = max_diff(rec["decay_0.5"], ema)
    raw_vs_ema = max_diff(raw, ema)
    print(
        f"\nZeRO-{stage} max abs diff over tensors: reconstructed sigma_rel 0.1 vs tracked {profile_diff:.3g}, "
        f"reconstructed decay 0.5 vs ShardedEMA {decay_diff:.3g}, raw vs EMA {raw_vs_ema:.3g}"
    )
    assert profile_diff <= 1e-6 and decay_diff <= 1e-5
    assert raw_vs_ema > 100 * max(profile_diff, decay_diff), "raw and EMA must differ, or the match shows nothing"

    # What a user consumes: `sd-train posthoc` writes diffusers pipelines holding the reconstruction.
    assert main_posthoc(["--run", str(out), "--sigma-rel", "0.1", "--decay", "0.5"]) == 0
    for name, state in rec.items():
        unet = UNet2DConditionModel.from_pretrained(str(out / "posthoc_export" / name), subfolder="unet")
        assert_equal_states(dict(unet.state_dict()), state, f"exported {name} vs the reconstruction")


@pytest.mark.multiproc
def test_zero3_bf16_sdxl_partitioned_ema_of_the_fp32_master_and_exact_resume(tiny_sdxl, tmp_path):
    # Every step checkpointed, so the EMA can be recomputed from the weights below. DeepSpeed's
    # bf16 mode (`dist.param_dtype: auto` with mixed_precision=bf16 under ZeRO-3). SDXL's pooled
    # embedding reaches the UNet in bf16 (DeepSpeed casts the module, not its inputs).
    sdxl = ["data.center_crop=false", "data.random_flip=true", "objective.microcond_dropout=0.3"]
    a, proc = straight_and_resumed(3, tiny_sdxl, tmp_path, 1, "mixed_precision=bf16", *sdxl)
    assert "hot path: cpu, params bf16, AdamW" in proc.stdout  # no autocast on top
    check_first_step_noise(a, tiny_sdxl, bf16=True)
    for kind in ("raw", "ema"):
        index = json.loads((a / "export" / kind / "model_index.json").read_text())
        assert index["_class_name"] == "StableDiffusionXLPipeline" and (a / "export" / kind / "text_encoder_2").is_dir()
    raw = exported(a, "raw")
    full_bytes = sum(t.numel() * 4 for t in raw.values())

    # Parameters are partitioned in bf16: each rank holds ~half (ceil per tensor, so up to 2 bytes
    # per tensor of padding) at 2 bytes each, not a replica.
    topo = check_topology(a, 3)
    for r in topo["ranks"]:
        assert r["placements"] == ["zero3-partition"] and r["param_dtype"] == "bfloat16"
        assert full_bytes / 4 <= r["local_param_bytes"] <= full_bytes / 4 + 2 * len(raw), r
    # The exported raw UNet is the fp32 master (zero_to_fp32 reads the optimizer's partitions),
    # not the bf16 partitions the forward reads: the master holds values bf16 cannot.
    assert_equal_states(offline_state(step(a, 12), "raw"), raw, "raw export vs the fp32 master partitions")
    assert any(not torch.equal(t, t.bfloat16().float()) for t in raw.values()), "the master is not fp32"
    # So is the EMA: rank r's piece of each parameter is its ZeRO-3 partition, ceil(numel / 2).
    pieces = [torch.load(step(a, 12) / f"ema_rank_{r}.pt", weights_only=False) for r in range(2)]
    for name, shape in pieces[0]["shapes"].items():
        numel = math.prod(shape)
        assert [p["pieces"][name].numel() for p in pieces] == [math.ceil(numel / 2)] * 2, name
    ema_bytes = [sum(t.numel() * t.element_size() for t in p["pieces"].values()) for p in pieces]
    assert all(b <= full_bytes / 2 + 4 * len(raw) for b in ema_bytes), (ema_bytes, full_bytes)

    # It is the EMA of the weights, computed locally: recompute it from the full raw weights of
    # every checkpoint in the window (DeepSpeed's zero_to_fp32 reassembles them offline). In bf16
    # mode those are the fp32 master weights: an EMA of the bf16 partitions would not match bitwise.
    expected = offline_state(step(a, 8), "raw")
    for s in range(9, 13):
        raw_s = offline_state(step(a, s), "raw")
        expected = {n: torch.lerp(expected[n], raw_s[n], 0.5) for n in expected}
    ema = offline_state(step(a, 12), "ema")
    assert_equal_states({n: ema[n] for n in expected}, expected, "EMA pieces vs. the EMA of the gathered weights")
    assert_equal_states(ema, exported(a, "ema"), "offline EMA export vs. in-training export")
    assert not torch.equal(ema["conv_in.weight"], raw["conv_in.weight"])  # it did average something

    plan = json.loads((a / "ema_plan.json").read_text())
    assert (plan["ema/step_start_ema"], plan["ema/pre_window_share"]) == (8, 0.0625)
    # The EMA evaluation (val/loss_ema, swapped into the bf16 partitions) is the exported EMA's,
    # scored here in fp32: to bf16's error (measured 1.7e-4 raw and 2.3e-5 EMA relative on a 6-step
    # run; raw and EMA differ by 9%, and the unreleased persisted params of the negative control
    # in sd_train.parallel.deepspeed by 5%).
    figures = assert_logged_val_matches_export(a, 12, rel=1e-3)
    print(f"\nZeRO-3 bf16 logged vs exported (fp32) val loss: {figures}")
    check_posthoc(3, a)


@pytest.mark.multiproc
def test_zero2_nan_skip_replicated_ema_and_exact_resume(tiny_assets, tmp_path):
    # A NaN loss on rank 1 at step 5: DeepSpeed sees non-finite reduced gradients on every rank and
    # skips the step everywhere; the trainer retries step 5 with the next batch.
    a, proc = straight_and_resumed(
        2, tiny_assets, tmp_path, every=1, SD_TRAIN_FAULT="rank=1,step=5,phase=mid_step,action=nan"
    )
    assert "step 5: non-finite loss/gradient on rank(s) [1]; step skipped" in proc.stdout
    summary = json.loads((a / "data_summary.json").read_text())
    assert (summary["step"], summary["skipped_steps"]) == (12, 1)

    raw = exported(a, "raw")
    # The Langevin noise: in the fp32 master fragments (step 1), and in the replicas the forward
    # reads and export gathers (equal to the master at the end).
    check_first_step_noise(a, tiny_assets, bf16=False)
    assert_equal_states(offline_state(step(a, 12), "raw"), raw, "ZeRO-2 replicas vs the fp32 master")
    full_bytes = sum(t.numel() * 4 for t in raw.values())
    topo = check_topology(a, 2)
    assert all(
        r["local_param_bytes"] == full_bytes and r["placements"][0].startswith("replicated") for r in topo["ranks"]
    )
    # ZeRO-2 keeps the EMA replicated (docs/parallelism.md): both ranks hold the same full tensors.
    pieces = [torch.load(step(a, 12) / f"ema_rank_{r}.pt", weights_only=False)["pieces"] for r in range(2)]
    assert_equal_states(pieces[0], pieces[1], "replicated EMA on rank 0 vs rank 1")
    assert {n: list(t.shape) for n, t in pieces[0].items()} == {n: list(raw[n].shape) for n in pieces[0]}
    assert_logged_val_matches_export(a, 12)
    check_posthoc(2, a)


@pytest.mark.parametrize(
    "saved,fmt,world,match",
    [
        (
            {"format": "zero", "world_size": 2},
            "zero",
            1,
            r"DeepSpeed ZeRO partitions of 2 ranks and this run has 1: .*Relaunch with 2 processes",
        ),
        (
            {"format": "zero", "world_size": 2},
            "dcp",
            2,
            r"written with dist.strategy=deepspeed but this run uses dist.strategy=fsdp2",
        ),
        (
            {"world_size": 2},
            "zero",
            2,
            r"written with dist.strategy=fsdp2 \(or ddp\) but this run uses dist.strategy=deepspeed",
        ),
    ],
)
def test_incompatible_checkpoint_refused_with_the_way_out(saved, fmt, world, match):
    """Refused outright (not 'broken, try the previous one': every older folder is the same kind),
    naming the fix. A DCP checkpoint on another world size is fine: it reshards."""
    from sd_train.checkpoint import _check_compatible
    from sd_train.errors import CheckpointLoadError

    with pytest.raises(CheckpointLoadError, match=match):
        _check_compatible(Path("ck/step_00000008"), saved, fmt, world)
    _check_compatible(Path("ck/step_00000008"), {"world_size": 2}, "dcp", 4)
