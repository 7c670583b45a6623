"""End-to-end training runs through `train.py`: one process, two processes, stops, resumes and
world-size changes. Final weights, EMA and optimizer state are compared with torch.equal."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.support.launch import run
from tests.support.runs import assert_states_equal, full_state, keys_by_step, train_cmd, unet_weights


@pytest.mark.multiproc
def test_two_ranks_shard_one_epoch_and_reshard_to_one(tiny_assets, straight_run, tmp_path):
    """The reference 2-rank run is FSDP2-sharded and sees each training sample once; from its step-12
    checkpoint one process reads the rest of the epoch, each sample once, and a relaunch after a
    kill -9 at one rank is bitwise a straight one-rank run. (Stops and relaunches on 2 ranks:
    tests/e2e/test_faults.py, the kill chain.)"""
    a = straight_run
    topo = json.loads((a / "topology.json").read_text())
    assert topo["world_size"] == 2 and topo["strategy"] == "fsdp2"
    assert all(r["all_dtensor"] and r["placements"] == ["(Shard(dim=0),)"] for r in topo["ranks"])
    # Exactly one epoch over both ranks: every training key once.
    keys = [k for r in (0, 1) for ks in keys_by_step(a, r).values() for k in ks]
    manifest = json.loads((tiny_assets["data"] / "dataset.json").read_text())
    assert len(keys) == len(set(keys)) == manifest["counts"]["train"]

    # D, E: 2 -> 1 ranks mid-epoch, the data position spread over the new slots (sd_train.data.elastic).
    # The 2-rank step-12 checkpoint on one process, straight to the end (D). E: D's folder as a kill -9
    # in step 15 leaves it (its step-14 checkpoint and snapshot the newest; one launch fewer than
    # killing a run), relaunched at the new size. E's steps and final state (model, optimizer, EMA,
    # post-hoc) are bitwise D's, and A's steps 1-12 with D's steps 13-16 read every training key
    # exactly once. (That a 2-rank checkpoint loads on one process with the same weights and EMA:
    # tests/e2e/test_sdxl.py, C.)
    d, e = tmp_path / "d", tmp_path / "e"
    every2, fast = "checkpoint.every_steps=2", ["eval.every_steps=0", "export_at_end=false"]
    proc = run(train_cmd(1, d, tiny_assets, f"checkpoint.resume={a}/checkpoints/step_00000012", every2, *fast), 300)
    assert "data position: resharded from 2x1 to 1x1 slots" in proc.stdout + proc.stderr
    shutil.copytree(d, e)
    for folder in (e / "checkpoints" / "step_00000016", e / "posthoc" / "step_00000016"):
        shutil.rmtree(folder)
    run(train_cmd(1, e, tiny_assets, every2, *fast), timeout=300)  # checkpoint.resume=auto: E's step 14
    assert_states_equal(
        full_state(d / "checkpoints" / "step_00000016"), full_state(e / "checkpoints" / "step_00000016")
    )
    assert keys_by_step(e, 0) == keys_by_step(d, 0) and sorted(keys_by_step(d, 0)) == [13, 14, 15, 16]
    assert (e / "keys" / "rank0.txt").read_text().count("# start") == 2  # E really read steps 15 and 16 again
    before = [k for r in (0, 1) for step, ks in keys_by_step(a, r).items() if step <= 12 for k in ks]
    after = [k for ks in keys_by_step(d, 0).values() for k in ks]
    assert (len(before), len(after)) == (96, 32) and sorted(before + after) == sorted(keys)


@pytest.mark.multiproc
def test_evaluation_off_async_time_cadence_saves_and_a_slow_export_write(tiny_assets, straight_run, tmp_path):
    """The reference run evaluates raw and EMA weights (loss and sample grid) between steps and saves
    synchronously every 4 steps. The same run with evaluation off, async saves and
    checkpoint.every_minutes so short that every step saves (rank 0's clock decides, the ranks agree
    in the step's all-reduce) ends with every checkpoint tensor equal and the same per-step losses:
    evaluation leaves training alone, and each of steps 4, 8, 12, 16 holds exactly the reference
    run's checkpoint, though the weights moved on while it was written. Every save logs its figures
    once; bytes per rank is the largest rank's files.

    The same run also shows that the end-of-run export gathers first and writes with no collective
    pending: rank 0 sleeps 15 s before its write, past a 10 s collective timeout, and the job still
    exits 0 with both pipelines written, equal to the reference run's (the other ranks used to time
    out waiting in the EMA gather)."""
    e = tmp_path / "e"
    proc = run(
        train_cmd(2, e, tiny_assets, "eval.every_steps=0", "dist.timeout_s=10", "checkpoint.async_save=true",
                  "checkpoint.every_minutes=0.000001"),
        timeout=300,
        SD_TRAIN_FAULT="rank=0,step=16,phase=export_write,action=sleep,seconds=15",
    )  # fmt: skip
    assert "[fault injection] rank 0 step 16 phase export_write: sleep" in proc.stdout
    for kind in ("raw", "ema"):
        wa, we = unet_weights(straight_run / "export" / kind), unet_weights(e / "export" / kind)
        assert all(torch.equal(wa[k], we[k]) for k in wa), kind

    def losses(out: Path) -> dict:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}

    assert losses(e) == losses(straight_run)
    logged = [json.loads(line) for line in (straight_run / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in logged if "val/loss_ema" in r} == {12, 15, 16}

    assert "staging in the background into pageable (CPU run: pinned memory needs CUDA) CPU buffers" in proc.stdout
    root = e / "checkpoints"
    assert sorted(int(p.name[5:]) for p in root.glob("step_*") if p.is_dir()) == list(range(1, 17))
    for s in (4, 8, 12, 16):  # the EMA window opens at step 10: model and optimizer only before it
        want, got = full_state(straight_run / "checkpoints" / f"step_{s:08d}"), full_state(root / f"step_{s:08d}")
        if s > 10:
            assert_states_equal(want, got)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), s
    rows = [json.loads(line) for line in (e / "metrics.jsonl").read_text().splitlines()]
    saves = [r for r in rows if "checkpoint/step" in r]
    assert [r["checkpoint/step"] for r in saves] == list(range(1, 17))
    assert all(r["checkpoint/blocked_s"] >= 0 and r["checkpoint/save_s"] > 0 for r in saves)
    folder = root / "step_00000016"

    def size(*names: str) -> int:
        return sum((folder / n).stat().st_size for n in names)

    per_rank = [size("__0_0.distcp", "rank_0.pt", ".metadata", "trainer_state.json"), size("__1_0.distcp", "rank_1.pt")]
    assert saves[-1]["checkpoint/bytes_per_rank"] == max(per_rank)


@pytest.mark.multiproc
def test_hsdp_run_resumes_exactly(tiny_assets, tmp_path):
    """A 2-rank HSDP run (dist.shard_group_size=1: replicate 2 x shard 1) says so in topology.json,
    and a relaunch from its step-8 checkpoint ends with every checkpoint tensor equal."""
    fast = ["dist.shard_group_size=1", "max_steps=12", "eval.every_steps=0", "export_at_end=false"]
    h = tmp_path / "h"
    run(train_cmd(2, h, tiny_assets, *fast), timeout=300)
    topo = json.loads((h / "topology.json").read_text())
    assert topo["world_size"] == 2 and topo["mesh"] == {"replicate": 2, "shard": 1}
    assert all(r["placements"] == ["(Replicate(), Shard(dim=0))"] and r["all_dtensor"] for r in topo["ranks"])
    r = tmp_path / "r"
    (r / "checkpoints").mkdir(parents=True)
    shutil.copytree(h / "checkpoints" / "step_00000008", r / "checkpoints" / "step_00000008")
    resumed = run(train_cmd(2, r, tiny_assets, *fast), timeout=300)
    assert "resumed from" in resumed.stdout and "at step 8" in resumed.stdout
    assert_states_equal(
        full_state(h / "checkpoints" / "step_00000012"), full_state(r / "checkpoints" / "step_00000012")
    )


@pytest.mark.multiproc
def test_second_stage_starts_from_first_stage_weights_and_optimizer(tiny_assets, straight_run, tmp_path):
    """checkpoint.init_from: stage 2 starts from stage 1's last checkpoint. Its step-0 held-out loss is
    stage 1's final one (the weights), Adam's step counts carry on (the optimizer), while its own
    step, EMA window and data position start fresh.

    The same run shows that sample grids are written off the training thread: rank 0's first grid
    write at step 4 sleeps 15 s, past a 10 s collective timeout, while the other rank goes on into
    the step-4 checkpoint's collectives; the job still exits 0 with both grids written."""
    s2 = tmp_path / "stage2"
    init = straight_run / "checkpoints" / "step_00000016"
    proc = run(
        train_cmd(2, s2, tiny_assets, f"checkpoint.init_from={init}", "max_steps=4", "ema.step_start_ema=2",
                  "eval.every_steps=4", "export_at_end=false", "checkpoint.every_steps=4", "dist.timeout_s=10"),
        timeout=300,
        SD_TRAIN_FAULT="rank=0,step=4,phase=grid_write,action=sleep,seconds=15",
    )  # fmt: skip
    assert f"initialised from {init} (step 16 of that run)" in proc.stdout
    assert "[fault injection] rank 0 step 4 phase grid_write: sleep" in proc.stdout
    for kind in ("raw", "ema"):
        assert (s2 / "samples" / f"step_00000004_{kind}.png").is_file(), kind

    def val_raw(out: Path, step: int) -> float:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return next(r["val/loss_raw"] for r in rows if r.get("step") == step and "val/loss_raw" in r)

    assert val_raw(s2, 0) == val_raw(straight_run, 16), "stage 2 starts from stage 1's weights"
    state = full_state(s2 / "checkpoints" / "step_00000004")
    assert state["optim.state.conv_in.weight.step"].item() == 20, "Adam's state carried over: 16 + 4 steps"
    trainer_state = json.loads((s2 / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert trainer_state["step"] == 4 and trainer_state["ema"]["num_updates"] == 2
    keys = keys_by_step(s2, 0)
    assert keys_by_step(straight_run, 0)[1] == keys[1], "the data position starts fresh (same first batch)"


def test_single_process_run_then_two_ranks_resume(tiny_assets, tmp_path):
    """One process trains, validates, samples and exports a pipeline diffusers loads; its checkpoint
    then resumes on 2 ranks (1 -> 2) with equal weights and EMA."""
    f = tmp_path / "f"
    proc = run(train_cmd(1, f, tiny_assets, "max_steps=12", "data.log_keys=false"), timeout=300)
    rows = [json.loads(line) for line in (f / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    val = [r["val/loss_raw"] for r in rows if "val/loss_raw" in r]
    assert len(losses) >= 3 and len(val) >= 2
    assert any("val/loss_ema" in r for r in rows)
    # The summary block at the end says what metrics.jsonl and the run folder say.
    ema = [r["val/loss_ema"] for r in rows if "val/loss_ema" in r]
    summary = proc.stdout[proc.stdout.index("run summary: ") :]
    assert f"train loss   {losses[-1]:.4f} (step 12)" in summary
    assert f"val loss     raw {val[-1]:.6f} (step 12); EMA {ema[-1]:.6f} (step 12)" in summary
    assert "checkpoints  step_00000004, step_00000008, step_00000012 in" in summary
    assert f"exports      {f}/export/raw, {f}/export/ema" in summary
    assert "data         " in summary and ", 0 bad, 0 filtered out" in summary
    assert f"next         sd-train posthoc --run {f} --eval" in summary
    assert (f / "samples" / "step_00000012_raw.png").is_file() and (f / "samples" / "step_00000012_ema.png").is_file()
    plan = json.loads((f / "ema_plan.json").read_text())
    assert plan["ema/step_start_ema"] == 10 and plan["ema/pre_window_share"] == 0.25

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(f / "export" / "ema", local_files_only=True)
    image = pipe("an emoji of rocket", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and float(image.std()) > 0

    g = tmp_path / "g"
    run(train_cmd(2, g, tiny_assets, "max_steps=12", f"checkpoint.resume={f}/checkpoints/step_00000012"), timeout=300)
    for kind in ("raw", "ema"):
        wf, wg = unet_weights(f / "export" / kind), unet_weights(g / "export" / kind)
        assert all(torch.equal(wf[k], wg[k]) for k in wf), kind
