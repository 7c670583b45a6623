"""Post-hoc EMA under DeepSpeed on 2 CPU processes: ZeRO-3 tracks the profiles per partition,
ZeRO-2 replicated. One run per stage serves several checks (the profiles' layout, the snapshots
read in one process with no process group equal the live profiles of the run's last checkpoint, a
tracked profile and the plain EMA's decay reconstruct to what the run tracked, the exported
pipeline is the reconstruction); a second run per stage resumes a copy of a mid-window checkpoint
and must end with the same profiles and snapshot, bitwise."""

import json
import math
import shutil

import pytest
import torch
import torch.distributed as dist
from diffusers import UNet2DConditionModel
from launch import run
from test_deepspeed import assert_equal_states, check_topology, step, zero_cmd

from sd_train.ema_posthoc import load_snapshot_profile
from sd_train.parallel.deepspeed import offline_shadow, offline_state, shadow_file
from sd_train.paths import snapshot_steps
from sd_train.tools.posthoc import find_snapshots, main_posthoc, plan_targets, reconstruct

pytestmark = pytest.mark.multiproc
# test_deepspeed's COMMON: 12 steps, the plain EMA (decay 0.5) from step 8. The profiles start
# there too; snapshots at 8, 10, 12: 3 x 2 profiles span the 5 weights w_8..w_12.
POSTHOC = [
    "ema.posthoc.sigma_rels=[0.05,0.1]",
    "ema.posthoc.snapshot_every=2",
    "eval.every_steps=0",
    "export_at_end=false",
    "checkpoint.every_steps=10",
]
SIGMAS, DECAYS, K = [0.1], [0.5], 2


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.fixture(scope="module", params=[3, 2], ids=["zero3", "zero2"])
def ds_posthoc_run(request, tiny_assets, tmp_path_factory):
    stage = request.param
    out = tmp_path_factory.mktemp(f"ds_posthoc_zero{stage}") / "a"
    run(zero_cmd(stage, out, tiny_assets, *POSTHOC), timeout=400)
    return stage, out


def test_profiles_snapshots_and_reconstruction_under_deepspeed(ds_posthoc_run):
    stage, out = ds_posthoc_run
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
        for r in topo["ranks"]:
            assert r["placements"] == ["zero3-partition"]
            assert full_numel * 2 <= r["local_param_bytes"] <= full_numel * 2 + 4 * len(raw), r
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


def test_resume_mid_window_restores_the_profiles_bitwise(ds_posthoc_run, tiny_assets, tmp_path):
    """B resumes from a copy of the run's step-10 checkpoint (two profile updates in) and runs to
    step 12: its profiles and its last snapshot equal the uninterrupted run's."""
    stage, a = ds_posthoc_run
    b = tmp_path / "b"
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(step(a, 10), step(b, 10))
    resumed = run(zero_cmd(stage, b, tiny_assets, *POSTHOC), timeout=400)
    assert f"resumed from {step(b, 10)} at step 10 (saved by 2 ranks, now 2)" in resumed.stdout
    for r in range(2):
        pa, pb = (torch.load(shadow_file(step(x, 12), "posthoc", r), weights_only=False) for x in (a, b))
        assert pa["zero_stage"] == stage and pa["world_size"] == 2
        assert_equal_states(pa["pieces"], pb["pieces"], f"ZeRO-{stage} profile pieces of rank {r} after resume")
    assert snapshot_steps(b / "posthoc") == [12]
    for i in range(K):
        sa, sb = (load_snapshot_profile(x / "posthoc" / "step_00000012", i) for x in (a, b))
        assert_equal_states(sa, sb, f"ZeRO-{stage} snapshot profile {i} after resume")
