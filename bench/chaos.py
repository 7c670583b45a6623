"""Goodput under faults: a 2-rank run of configs/test.yaml, once straight and once with a random rank
killed (SIGKILL) at seeded random times and the same command relaunched each time, as a SLURM
requeue or a supervisor would.

    nice .venv/bin/python bench/chaos.py [--steps 600] [--mtbf 120] [--seed 0] [--every-steps 20]
                                         [--dir /tmp] [--keep]

The assets are those of the test suite (tests/conftest.py `tiny_assets`: 128 Twemoji at 32 px in 8
shards, the tiny SD folder with an untrained VAE), built once under `--dir`. Each launch is
`torchrun --nproc_per_node 2 train.py --config configs/test.yaml ...`, one BLAS thread per rank.

Failures are a Poisson process over the chaos run's wall time: the gaps are drawn from an
exponential distribution of mean `--mtbf` seconds with `random.Random(--seed)`, which also picks
the rank to kill; a failure can land anywhere (start-up, a step, a checkpoint being written, the
export). After each kill the bench waits for the launcher to exit and relaunches at once.

Reported:
- goodput: straight wall time / chaos wall time (the straight run is timed before and after the
  chaos run, the machine being shared; their mean is used);
- per failure: the step reached at the kill (rank 0's key log), the step resumed from (the
  relaunch's `# start` line), so the steps redone, and the times: kill -> launcher gone
  (teardown), relaunch -> first new step done (restart: process start, imports, model and
  checkpoint load, data replay), kill -> first new step (time to resume);
- where the lost time went: teardown + restart per failure, steps redone x the straight run's
  time per step, and the checkpoint saves' blocked time (the cadence's own cost, paid by the
  straight run too).
It asserts that the chaos run's final raw and EMA UNets (its end-of-run export) equal the straight
run's bitwise. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import benchlib

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def train_cmd(out: Path, assets: list[str], args: argparse.Namespace) -> list[str]:
    from sd_train.parallel.process_group import free_port

    overrides = [
        *assets,
        f"output_dir={out}",
        f"max_steps={args.steps}",
        f"checkpoint.every_steps={args.every_steps}",
        "checkpoint.keep_last_k=2",
        f"eval.every_steps={args.eval_every}",
        "data.log_keys=true",
        "metrics.log_every=10",
    ]
    return [
        str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}",
        str(REPO / "train.py"), "--config", "configs/test.yaml", *overrides,
    ]  # fmt: skip


def launch(cmd: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("SD_TRAIN_FAULT", None)
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def key_log(out: Path) -> list[str]:
    path = out / "keys" / "rank0.txt"
    return path.read_text().splitlines() if path.exists() else []


def last_step(lines: list[str]) -> int:
    """The last step rank 0 recorded: a step line's, or the step a launch started from."""
    for line in reversed(lines):
        fields = line.split("\t")
        return int(fields[1]) if line.startswith("# start") else abs(int(fields[0]))
    return 0


def workers(launcher: int) -> dict[int, int]:
    """rank -> pid of the training processes the launcher started (its children)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != launcher:
                continue
            env = dict(
                kv.split("=", 1)
                for kv in (entry / "environ").read_bytes().decode(errors="replace").split("\0")
                if "=" in kv
            )
        except (OSError, ValueError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


def straight(out: Path, assets: list[str], args: argparse.Namespace, logs: Path) -> tuple[float, float]:
    """(wall seconds, seconds to the first step done) of an uninterrupted run."""
    t0, first = time.monotonic(), None
    proc = launch(train_cmd(out, assets, args), logs / f"{out.name}.log")
    while proc.poll() is None:
        time.sleep(0.05)
        if first is None and any(not ln.startswith("#") for ln in key_log(out)):
            first = time.monotonic() - t0
    if proc.returncode != 0 or first is None:
        raise RuntimeError(f"the straight run failed: see {logs / f'{out.name}.log'}")
    return time.monotonic() - t0, first


@dataclass
class Launch:
    """One launch of the chaos run; times in seconds since the chaos run started."""

    started: float
    steps_before: int  # the highest step recorded before it
    start_step: Optional[int] = None  # the step it resumed from (its `# start` line)
    first_step: Optional[float] = None  # when it recorded its first step
    killed: Optional[float] = None
    killed_rank: Optional[int] = None
    step_at_kill: Optional[int] = None
    ended: float = 0.0

    def progress_at(self) -> float:
        """When it first moved the run forward: its first step; killed before one, never (its
        kill); resumed at the last step (a kill during the export), never either (its end)."""
        for t in (self.first_step, self.killed):
            if t is not None:
                return t
        return self.ended

    @property
    def redone(self) -> int:
        """Steps it recomputed: those between its start and the highest recorded before it."""
        return max(0, self.steps_before - self.start_step) if self.start_step is not None else 0


def chaos(out: Path, assets: list[str], args: argparse.Namespace, logs: Path) -> tuple[float, list[Launch]]:
    """The chaos run: (wall seconds, its launches)."""
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    next_kill = rng.expovariate(1.0 / args.mtbf)
    launches: list[Launch] = []
    while True:
        lines = key_log(out)
        steps = [abs(int(ln.split("\t")[0])) for ln in lines if not ln.startswith("#")]
        run = Launch(time.monotonic() - t0, max(steps, default=0))
        launches.append(run)
        proc = launch(train_cmd(out, assets, args), logs / f"chaos-{len(launches) - 1:02d}.log")
        seen = len(lines)
        while proc.poll() is None:
            time.sleep(0.05)
            now = time.monotonic() - t0
            if run.first_step is None:
                new = key_log(out)[seen:]
                starts = [ln for ln in new if ln.startswith("# start")]
                run.start_step = int(starts[0].split("\t")[1]) if starts else None
                if any(not ln.startswith("#") for ln in new):
                    run.first_step = now
            if now < next_kill:
                continue
            ranks = workers(proc.pid)
            if len(ranks) < 2:  # starting or ending: the kill lands when both ranks exist
                continue
            run.killed, run.killed_rank, run.step_at_kill = now, rng.choice(sorted(ranks)), last_step(key_log(out))
            try:
                os.kill(ranks[run.killed_rank], signal.SIGKILL)
            except ProcessLookupError:
                pass  # it had just exited: the launcher's exit is what counts
            proc.wait()
            next_kill = run.killed + rng.expovariate(1.0 / args.mtbf)
        run.ended = time.monotonic() - t0
        if run.killed is None:
            if proc.returncode == 0:
                return run.ended, launches
            raise RuntimeError(
                f"chaos launch {len(launches) - 1} failed by itself (exit {proc.returncode}): see {logs}"
            )
        if len(launches) > 200:
            raise RuntimeError("more than 200 launches: the run does not progress")


def time_to_resume(launches: list[Launch]) -> list[float]:
    """For each kill: the seconds until a later launch recorded its first step."""
    out = []
    for i, run in enumerate(launches):
        if run.killed is not None:
            later = next((r.first_step for r in launches[i + 1 :] if r.first_step is not None), None)
            if later is not None:
                out.append(later - run.killed)
    return out


def unet_weights(pipe: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(pipe / "unet" / "diffusion_pytorch_model.safetensors"))


def bitwise_equal(a: Path, b: Path) -> dict[str, bool]:
    import torch

    out = {}
    for weights in ("raw", "ema"):
        x, y = unet_weights(a / "export" / weights), unet_weights(b / "export" / weights)
        out[weights] = x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    return out


def blocked_s(out: Path) -> float:
    """Seconds the loop waited for checkpoint saves (rank 0's metrics of the last launch's run)."""
    total = 0.0
    for line in (out / "metrics.jsonl").read_text().splitlines():
        total += json.loads(line).get("checkpoint/blocked_s", 0.0)
    return total


def summarize(
    args: argparse.Namespace,
    before: tuple[float, float],
    after: tuple[float, float],
    chaos_s: float,
    launches: list[Launch],
    checkpoint_blocked_s: float,
) -> dict:
    """The figures of one bench (see the module docstring); prints the table of launches."""
    straight_s = [before[0], after[0]]
    straight_mean = sum(straight_s) / len(straight_s)
    start_up = (before[1] + after[1]) / 2  # launch to the first step done
    per_step = (straight_mean - start_up) / (args.steps - 1)  # steps, evaluations and saves, per step
    kills = [r for r in launches if r.killed is not None]
    redone = sum(r.redone for r in launches)
    # Time no step moved forward: each later launch until it first moved the run forward, and each
    # kill until its launcher was gone. The first launch's start-up is the straight run's too.
    restarts = sum(r.progress_at() - r.started for r in launches[1:])
    teardowns = sum(r.ended - r.killed for r in kills)  # type: ignore[operator]
    resumes = time_to_resume(launches)
    lost = chaos_s - straight_mean
    rows = [
        [i, f"{r.started:.0f}", r.start_step, r.steps_before, r.redone, f"{r.first_step or 0:.0f}", r.killed_rank,
         r.step_at_kill, f"{(r.ended - r.killed) if r.killed is not None else 0:.1f}"]
        for i, r in enumerate(launches)
    ]  # fmt: skip
    headers = [
        "launch",
        "at s",
        "resumed",
        "done before",
        "redone",
        "1st step s",
        "killed rank",
        "at step",
        "teardown s",
    ]
    benchlib.print_table(headers, rows)
    print(
        f"straight {straight_s[0]:.1f} / {straight_s[1]:.1f} s, chaos {chaos_s:.1f} s with {len(kills)} failures: "
        f"goodput {straight_mean / chaos_s:.3f}; lost {lost:.1f} s: restarts and teardowns "
        f"{restarts + teardowns:.1f} s, {redone} redone steps x {per_step:.2f} s"
    )
    return {
        "steps": args.steps,
        "mtbf_s": args.mtbf,
        "seed": args.seed,
        "checkpoint_every_steps": args.every_steps,
        "straight_s": [round(s, 1) for s in straight_s],
        "straight_start_up_s": round(start_up, 1),
        "straight_s_per_step": round(per_step, 3),
        "chaos_s": round(chaos_s, 1),
        "goodput": round(straight_mean / chaos_s, 3),
        "failures": len(kills),
        "failures_per_min": round(len(kills) / (chaos_s / 60), 2),
        "killed_in_start_up": sum(r.first_step is None and r.start_step is None for r in kills),
        "steps_redone": redone,
        "steps_redone_per_failure": round(redone / len(kills), 1) if kills else None,
        "teardown_s_mean": round(teardowns / len(kills), 1) if kills else None,
        "time_to_resume_s_mean": round(sum(resumes) / len(resumes), 1) if resumes else None,
        "lost_s": round(lost, 1),
        "lost_to_restarts_s": round(restarts + teardowns, 1),
        "lost_to_redone_steps_s": round(redone * per_step, 1),
        "checkpoint_blocked_s_straight": round(checkpoint_blocked_s, 1),
        "launches": [asdict(r) for r in launches],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600, help="max_steps of each run")
    p.add_argument("--mtbf", type=float, default=120.0, help="mean seconds between failures of the chaos run")
    p.add_argument("--seed", type=int, default=0, help="seed of the failure times and ranks")
    p.add_argument("--every-steps", type=int, default=20, help="checkpoint.every_steps")
    p.add_argument("--eval-every", type=int, default=200, help="eval.every_steps")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the assets and runs go")
    p.add_argument("--keep", action="store_true", help="keep the runs (the assets are always kept)")
    args = p.parse_args()
    root = Path(args.dir) / "sd-train-chaos"
    assets = benchlib.tiny_test_assets(root / "assets")
    work = Path(tempfile.mkdtemp(prefix="runs-", dir=root))
    logs = work / "logs"
    logs.mkdir()
    load_before = benchlib.load_average()
    before = straight(work / "straight", assets, args, logs)
    (logs / "straight-before.json").write_text(json.dumps(before))
    chaos_s, launches = chaos(work / "chaos", assets, args, logs)
    (logs / "launches.json").write_text(json.dumps({"chaos_s": chaos_s, "launches": [asdict(r) for r in launches]}))
    shutil.rmtree(work / "straight")
    after = straight(work / "straight", assets, args, logs)
    equal = bitwise_equal(work / "straight", work / "chaos")
    result = summarize(args, before, after, chaos_s, launches, blocked_s(work / "straight"))
    result.update(bitwise_equal=equal, load_before=load_before, load_after=benchlib.load_average())
    print(f"final UNets bitwise equal to the straight run's: {equal}")
    if not args.keep:
        shutil.rmtree(work)
    benchlib.emit_json("chaos", result)
    assert all(equal.values()), f"the chaos run's final UNets differ from the straight run's: {equal}"
    return 0


if __name__ == "__main__":
    sys.exit(main())
