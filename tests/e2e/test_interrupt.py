"""Ctrl-C on a real one-process run, pressed as a terminal does (SIGINT to the whole process group):
the run stops at the step it is in, saves that step, prints one line and exits 130; a second press
aborts at once without saving; the same command then resumes, bitwise equal to a run never stopped,
with metrics.jsonl reading forward through both relaunches and a summary at the end. (Two ranks:
the kill chain of tests/e2e/test_faults.py.)

One process, so this file runs in the single-process session, beside the multi-process one."""

import json

from sd_train.paths import complete_steps
from sd_train.step_signals import FORWARD_WINDOW_S
from tests.support.launch import interrupt, run
from tests.support.runs import assert_states_equal, full_state, train_cmd

# 8 steps, a checkpoint every 4 and at each stop, every step logged, evaluation at the last step.
EXTRA = [
    "max_steps=8",
    "ema.step_start_ema=4",
    "checkpoint.every_steps=4",
    "eval.every_steps=8",
    "export_at_end=false",
    "metrics.log_every=1",
    "data.log_keys=false",
]
NOISE = ("requires torchvision", "Setting accelerator to CPU", "Loading weights", "Traceback")


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in rows(out) if "train/loss" in r]


def test_ctrl_c_saves_a_second_aborts_and_the_rerun_resumes_bitwise(tiny_assets, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "run"
    run(train_cmd(1, ref, tiny_assets, *EXTRA), timeout=300)
    cmd = train_cmd(1, out, tiny_assets, *EXTRA)

    # Ctrl-C while step 3 runs: that step finishes, is saved, and the run says so in one line.
    first, _ = interrupt(
        cmd,
        "[fault injection] rank 0 step 3 phase mid_step",
        SD_TRAIN_FAULT="rank=0,step=3,phase=mid_step,action=wait_signal",
    )
    assert first.returncode == 130, first.stdout[-2000:] + first.stderr[-2000:]
    assert first.stdout.count("interrupted at step 3; saved step 3; rerun the same command to resume") == 1
    assert "Ctrl-C: stopping after this step and saving a checkpoint" in first.stderr
    assert complete_steps(out / "checkpoints") == [3]

    # The rerun goes on; Ctrl-C twice during step 6: the second press aborts without saving (the
    # step's 60 s sleep was not waited for), after step 4's checkpoint and step 5's metrics row.
    second, after_press = interrupt(
        cmd, "[fault injection] rank 0 step 6 phase mid_step", again_after=FORWARD_WINDOW_S + 0.5,
        SD_TRAIN_FAULT="rank=0,step=6,phase=mid_step,action=sleep,seconds=60",
    )  # fmt: skip
    assert second.returncode == 130, second.stdout[-2000:] + second.stderr[-2000:]
    assert "second Ctrl-C: aborting without saving" in second.stderr and after_press < 30
    assert "interrupted at step" not in second.stdout
    assert complete_steps(out / "checkpoints") == [3, 4]
    assert max(s for s, _ in losses(out)) == 5, "step 5 was logged after the last checkpoint"

    # The same command once more: resumed from step 4, every tensor as the run that never stopped.
    last = run(cmd, timeout=300)
    assert "resumed from" in last.stdout and "step_00000004 at step 4" in last.stdout
    assert_states_equal(
        full_state(ref / "checkpoints" / "step_00000008"), full_state(out / "checkpoints" / "step_00000008")
    )

    # metrics.jsonl reads forward: each step once, in order, as logged by the run that never stopped,
    # with an event at each resume; step 5 of the aborted launch was superseded.
    assert losses(out) == losses(ref) and [s for s, _ in losses(out)] == list(range(1, 9))
    events = [r for r in rows(out) if r.get("event") == "resumed"]
    assert [e["step"] for e in events] == [3, 4] and events[1]["dropped_rows"] >= 1
    steps = [r["step"] for r in rows(out) if "step" in r]
    assert steps == sorted(steps)

    # The summary block says what metrics.jsonl says.
    final_loss = losses(ref)[-1][1]
    val = {k: r[k] for r in rows(ref) if r.get("step") == 8 for k in ("val/loss_raw", "val/loss_ema") if k in r}
    summary = last.stdout[last.stdout.index("run summary: ") :]
    assert "steps        8 (this launch: steps 5..8), 0 skipped" in summary
    assert f"train loss   {final_loss:.4f} (step 8)" in summary
    assert f"val loss     raw {val['val/loss_raw']:.6f} (step 8); EMA {val['val/loss_ema']:.6f} (step 8)" in summary
    assert "checkpoints  step_00000003, step_00000004, step_00000008 in" in summary
    assert "exports      none (export_at_end=false)" in summary
    assert f"next         sd-train posthoc --run {out} --eval" in summary
    for proc in (first, second, last):
        assert not [n for n in NOISE if n in proc.stdout + proc.stderr], proc.stderr[-3000:]
