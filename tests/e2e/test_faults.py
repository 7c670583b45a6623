"""Fault injection on real 2-rank runs (SD_TRAIN_FAULT, see sd_train/faults.py). The tests relaunch
the job themselves; torchrun --max-restarts over gloo on one machine is unreliable (port reuse)."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from sd_train.paths import complete_steps, snapshot_steps
from tests.support.launch import REPO, env, free_port, interrupt, run
from tests.support.runs import TRAIN, assert_states_equal, full_state, keys_by_step, reconstruct_all, train_cmd

pytestmark = pytest.mark.multiproc
FAST = ["eval.every_steps=0", "export_at_end=false"]


def ckpts(out: Path) -> Path:
    return out / "checkpoints"


def test_kill_chain_each_phase_resumes_exactly(tiny_assets, straight_run, tmp_path):
    """kill -9 of rank 0 or 1 in each checkpoint phase, SIGTERM during a save, Ctrl-C to the whole
    job mid-step (SIGINT to the process group, as a terminal sends it: each rank gets it twice, from
    the terminal and from the launcher), kill -9 mid-step inside the EMA window, async saves and
    keep-last-2 retention, relaunching after each: the final weights, EMA, post-hoc profiles and
    optimizer state equal the uninterrupted run's, every step saw the same sample keys, the newest
    complete checkpoint always survives, metrics.jsonl reads forward (each logged step once, the
    uninterrupted run's losses, an event per resume), wandb (offline) continues one run id across
    the relaunches, and the post-hoc snapshots written across the relaunches reconstruct bitwise
    like the uninterrupted run's. While the last relaunch runs, the same command launched a second
    time is refused (exit 2, naming rank 0's host and pid) and writes nothing; the relaunch right
    after each kill -9 got the output_dir lock at once."""
    out = tmp_path / "chain"
    base = ["checkpoint.every_steps=2", "checkpoint.keep_last_k=2", *FAST]
    wandb = ["metrics.wandb=true"]
    chain = [
        # (fault, extra overrides, newest complete checkpoint expected afterwards)
        ("rank=0,step=6,phase=after_shards", [], 4),  # shards + .metadata written, not renamed
        ("rank=1,step=8,phase=after_rank_files", [], 6),  # rank files written, no shards
        ("rank=0,step=10,phase=before_retention", [], 10),  # renamed, retention not yet run
        ("rank=1,step=12,phase=during_async_save", ["checkpoint.async_save=true"], 10),
        ("rank=0,step=14,phase=after_rank_files,action=term", wandb, 14),  # SIGTERM while saving
        ("rank=1,step=15,phase=mid_step,action=wait_signal", wandb, 15),  # Ctrl-C, off the cadence
        ("rank=1,step=16,phase=mid_step", wandb, 15),  # kill -9 mid-step inside the window
    ]
    for fault, extra, newest in chain:
        cmd = train_cmd(2, out, tiny_assets, *base, *extra)
        if "wait_signal" in fault:
            proc, _ = interrupt(cmd, "[fault injection] rank 1 step 15", SD_TRAIN_FAULT=fault, WANDB_MODE="offline")
            assert proc.returncode == 130, proc.stdout[-3000:] + proc.stderr[-3000:]
            assert proc.stdout.count("interrupted at step 15; saved step 15; rerun the same command to resume") == 1
            assert "Traceback" not in proc.stderr and "aborting" not in proc.stderr
        else:
            proc = run(cmd, timeout=300, check=False, SD_TRAIN_FAULT=fault, WANDB_MODE="offline")
        if "action=term" in fault:
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            assert "preempted (SIGTERM)" in proc.stdout
        elif "wait_signal" not in fault:
            assert proc.returncode != 0, f"{fault}: the run should have died"
        steps = complete_steps(ckpts(out))
        assert steps and steps[-1] == newest, (fault, steps)
        # Partial folders never count: what complete_steps lists has .metadata and its state file.
        for s in steps:
            assert (ckpts(out) / f"step_{s:08d}" / ".metadata").is_file()
    final = relaunch_beside_a_second_launch(train_cmd(2, out, tiny_assets, *base, *wandb), out)
    assert "resumed from" in final and "step 15" in final
    steps = complete_steps(ckpts(out))
    assert steps == [15, 16], f"keep_last_k=2 keeps the two newest complete checkpoints, got {steps}"
    assert not list(ckpts(out).glob(".*partial")), "stale partial folders are cleaned up"
    assert_states_equal(
        full_state(straight_run / "checkpoints" / "step_00000016"), full_state(ckpts(out) / "step_00000016")
    )
    for r in (0, 1):  # same sample keys per step as the uninterrupted run, no gaps, no repeats
        assert keys_by_step(out, r) == keys_by_step(straight_run, r)
    # The relaunches logged steps their killed predecessors had logged past their last checkpoint:
    # each is in metrics.jsonl once, in order, with the uninterrupted run's loss, and every resume
    # is an event at the step it resumed from.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    want = [
        (r["step"], r["train/loss"])
        for r in map(json.loads, (straight_run / "metrics.jsonl").open())
        if "train/loss" in r
    ]
    assert logged == want, f"metrics.jsonl does not read forward: {[s for s, _ in logged]}"
    assert [r["step"] for r in rows if r.get("event") == "resumed"] == [4, 6, 10, 10, 14, 15, 15]
    run_id = (out / "wandb_run_id.txt").read_text()
    assert len(list((out / "wandb").glob(f"offline-run-*-{run_id}"))) == 4, "the 4 wandb launches share one run id"
    # Post-hoc EMA through the same kills: snapshots of 10, 12, 14 and 16 written across four
    # launches (12 twice, after the kill during its save), and every reconstruction bitwise the
    # uninterrupted run's.
    assert snapshot_steps(out / "posthoc") == [10, 12, 14, 16]
    a, b = reconstruct_all(straight_run), reconstruct_all(out)
    assert a.keys() == b.keys() and len(a) == 5
    for target in a:
        diff = [n for n in a[target] if not torch.equal(a[target][n], b[target][n])]
        assert not diff, f"{target}: {len(diff)} tensors differ, e.g. {diff[:3]}"


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    files = (p for p in folder.rglob("*") if "wandb" not in p.relative_to(folder).parts)
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


def relaunch_beside_a_second_launch(cmd: list[str], out: Path) -> str:
    """Run `cmd` on `out` with its rank 0 paused (SIGSTOP) mid-step 16, holding the output_dir lock;
    meanwhile the same command launched again must exit 2, naming rank 0's host and pid, having
    written nothing into `out` (nor started a wandb run: the caller counts them). Then rank 0 goes on
    and the first launch ends normally. Returns its output."""
    first = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env(SD_TRAIN_FAULT="rank=0,step=16,phase=mid_step,action=stop", WANDB_MODE="offline"),
    )  # fmt: skip
    seen: list[str] = []

    def read() -> None:
        for line in first.stdout:
            seen.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not any("phase mid_step: stop" in line for line in seen):
        assert first.poll() is None and time.monotonic() < deadline, "".join(seen)[-3000:]
        time.sleep(0.1)
    try:
        before = _tree(out)
        second = run(cmd, timeout=300, check=False, WANDB_MODE="offline")
        assert second.returncode == 2, second.stdout[-3000:] + second.stderr[-3000:]
        holder = re.search(r"is in use by another launch \(host (\S+), pid (\d+),", second.stderr)
        assert holder and holder.group(1) == socket.gethostname(), second.stderr[-3000:]
        # The first launch's rank 0, stopped mid-step by its fault. (Its parent is the launcher, or
        # the warm interpreter it was forked from, tests/support/zygote.py: not a test of the pid.)
        named = psutil.Process(int(holder.group(2)))
        assert named.pid != first.pid and named.status() == psutil.STATUS_STOPPED, "the pid named is the stopped rank"
        assert _tree(out) == before, "the refused launch wrote nothing into output_dir"
    finally:
        # Every rank of the first launch is in its process group, wherever it was forked from
        # (SIGCONT to a running process, this one included, does nothing).
        os.killpg(os.getpgid(first.pid), signal.SIGCONT)
    assert first.wait(timeout=300) == 0, "".join(seen)[-3000:]
    reader.join(timeout=30)
    return "".join(seen)


def test_truncated_shard_falls_back_then_refuses(tiny_assets, straight_run, tmp_path):
    """A truncated shard in the newest complete-looking checkpoint: warn naming the file, resume from
    the previous one, and still end bitwise equal. With every checkpoint broken: exit non-zero."""
    out = tmp_path / "trunc"
    shutil.copytree(ckpts(straight_run), ckpts(out))
    shutil.rmtree(ckpts(out) / "step_00000016")
    broken = ckpts(out) / "step_00000012" / "__1_0.distcp"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    proc = run(train_cmd(2, out, tiny_assets, *FAST), timeout=300)
    assert "could not be loaded" in proc.stdout and str(broken) in proc.stdout
    assert "resumed from" in proc.stdout and "step_00000008" in proc.stdout
    assert_states_equal(
        full_state(straight_run / "checkpoints" / "step_00000016"), full_state(ckpts(out) / "step_00000016")
    )

    for step_dir in ckpts(out).glob("step_*"):
        for shard in step_dir.glob("__*_0.distcp"):
            shard.write_bytes(b"")
    proc = run(train_cmd(2, out, tiny_assets, *FAST), timeout=300, check=False)
    assert proc.returncode != 0
    assert "none could be loaded, refusing to start from step 0" in proc.stdout + proc.stderr


def test_nonfinite_steps_skipped_then_stop(tiny_assets, tmp_path):
    """A NaN loss on rank 1 only: every rank skips the step together (counter up, schedule and EMA
    untouched). Five in a row stop the run, naming step and rank, with no checkpoint written."""
    out = tmp_path / "nan"
    proc = run(
        train_cmd(2, out, tiny_assets, *FAST, "max_steps=12", "checkpoint.every_steps=12"),
        timeout=300,
        SD_TRAIN_FAULT="rank=1,step=11,phase=mid_step,action=nan",
    )
    assert "step 11: non-finite loss/gradient on rank(s) [1]; step skipped" in proc.stdout
    state = json.loads((ckpts(out) / "step_00000012" / "trainer_state.json").read_text())
    assert state["train"]["skipped_steps"] == 1 and state["step"] == 12
    assert state["lr_scheduler"]["_step_count"] == 13, "the scheduler stepped only for the 12 steps taken"
    assert state["ema"]["num_updates"] == 2, "EMA: opened at 10, updated at 11 and 12 only"

    out2 = tmp_path / "nan5"
    proc = run(
        train_cmd(2, out2, tiny_assets, *FAST, "max_steps=12", "checkpoint.every_steps=4"),
        timeout=300,
        check=False,
        SD_TRAIN_FAULT="rank=0,step=3,phase=mid_step,action=nan,count=5",
    )
    assert proc.returncode != 0
    assert "5 consecutive non-finite steps, the last at step 3 on rank(s) [0]" in proc.stdout + proc.stderr
    assert complete_steps(ckpts(out2)) == [], "no checkpoint is written once training diverged"


def test_hung_rank_exits_nonzero(tiny_assets, tmp_path):
    """Rank 1 hangs mid-step; rank 0 hits the 10 s collective timeout and exits non-zero instead of
    waiting forever. The two ranks are started as srun starts them (SLURM_PROCID / SLURM_NTASKS, no
    torchrun): torchrun 2.13 would add a fixed 30 s before it stops the workers of a failed group
    (LocalElasticAgent._stop_workers ignores --shutdown_timeout unless torchrun itself is signalled),
    which is the launcher's time, not ours. srun then stops the hung task (--kill-on-bad-exit); here
    the test does."""
    out, port, hang = tmp_path / "hang", str(free_port()), "rank=1,step=3,phase=mid_step,action=hang"
    cmd = [sys.executable, TRAIN, *train_cmd(1, out, tiny_assets, *FAST, "dist.timeout_s=10")[2:]]
    procs = [
        subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r), SLURM_JOB_ID="7",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=port, SD_TRAIN_FAULT=hang),
        )
        for r in (0, 1)
    ]  # fmt: skip
    try:
        log0 = procs[0].communicate(timeout=150)[0]
    except subprocess.TimeoutExpired:
        pytest.fail("rank 0 hung past its collective timeout")
    finally:
        procs[1].kill()
        log1 = procs[1].communicate()[0]
    assert procs[0].returncode != 0, log0[-3000:]
    assert "[fault injection] rank 1 step 3 phase mid_step: hang" in log1
