"""Where the CPU time of one training launch goes, phase by phase, per rank.

    .venv/bin/python bench/launch_cost.py [--nproc 2] [--out /tmp/launch_cost] [--assets DIR] [override ...]

Starts `--nproc` ranks of the trainer on the tiny SD the test suite uses (built into `--assets`
once, as tests/conftest.py builds it) with the settings of the suite's reference run
(tests/support/runs.py COMMON: 16 steps, saves every 4, evaluation every 3, post-hoc snapshots
every 2, export at the end), then the overrides given here. Each rank runs the trainer unchanged,
with its phases wrapped: the CPU seconds (user + system, every thread of the process) spent inside
each phase are added up, each phase's own time only (a save's wait for an earlier save counts
once). The loader's worker processes are counted when they exit.

CPU seconds, not wall time: the box this project is developed on is shared, and at load 10-25 a
phase's wall time says more about the neighbours than about the phase. On an idle 2-core box with
2 ranks, wall time is about the sum over ranks divided by 2.

Prints a table (phase, CPU seconds per rank, the sum) and one JSON line.
"""

from __future__ import annotations

import resource

_START = resource.getrusage(resource.RUSAGE_SELF)  # before any import of ours: the interpreter's own start

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IMPORTS = "imports (torch, diffusers, transformers, ...)"
RANK_MODE = "SD_TRAIN_LAUNCH_COST_OUT"  # set in the ranks: where to write their phase table


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Phases:
    """Exclusive CPU seconds per phase: a phase entered inside another is subtracted from it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.stack: list[list] = []  # [label, start, time of the nested phases]

    def add(self, label: str, seconds: float) -> None:
        self.seconds[label] = self.seconds.get(label, 0.0) + seconds

    def wrap(self, owner, name: str, label) -> None:
        """Replace owner.name by a wrapper that books its time to `label` (a str, or a function of
        the call count that returns one)."""
        original = getattr(owner, name)
        calls = [0]

        def wrapper(*args, **kwargs):
            calls[0] += 1
            tag = label(calls[0]) if callable(label) else label
            self.stack.append([tag, cpu_self(), 0.0])
            try:
                return original(*args, **kwargs)
            finally:
                tag, start, nested = self.stack.pop()
                spent = cpu_self() - start
                self.add(tag, spent - nested)
                if self.stack:
                    self.stack[-1][2] += spent

        setattr(owner, name, wrapper)


class GCTimer:
    """CPU seconds inside the cyclic garbage collector, per generation (overlaps the phases)."""

    def __init__(self) -> None:
        import gc

        self.seconds, self.counts, self._start = [0.0, 0.0, 0.0], [0, 0, 0], 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = cpu_self()
        else:
            self.seconds[info["generation"]] += cpu_self() - self._start
            self.counts[info["generation"]] += 1


def run_rank(out: Path, argv: list[str]) -> int:
    phases = Phases()
    gc_timer = GCTimer()
    phases.add("interpreter start", _START.ru_utime + _START.ru_stime)
    t = cpu_self()
    from sd_train.entry import validated_config

    cfg, _ = validated_config(argv)
    phases.add("config: parse, validate, preflight", cpu_self() - t)
    t = cpu_self()
    import sd_train.trainer as trainer
    from sd_train.checkpoint import Checkpointer
    from sd_train.ema.posthoc import PowerEMAProfiles
    from sd_train.ema.sharded import ShardedEMA
    from sd_train.evaluation import Evaluator
    from sd_train.model.parts import SDParts
    from sd_train.parallel.fsdp import FSDPStrategy

    phases.add(IMPORTS, cpu_self() - t)
    phases.wrap(trainer, "init_distributed", "process group")
    phases.wrap(trainer, "load_sd_parts", "model load (UNet, VAE, text encoder)")
    phases.wrap(SDParts, "load", "model load (UNet, VAE, text encoder)")
    phases.wrap(trainer.Trainer, "_count_flops", "FLOP count")
    phases.wrap(FSDPStrategy, "wrap", "FSDP2 wrap + optimizer")
    phases.wrap(ShardedEMA, "__init__", "EMA and post-hoc setup")
    phases.wrap(PowerEMAProfiles, "__init__", "EMA and post-hoc setup")
    phases.wrap(trainer, "build_train_loader", "loader build")
    phases.wrap(Evaluator, "__init__", "evaluator setup")
    phases.wrap(Checkpointer, "__init__", "checkpointer setup")
    phases.wrap(trainer.Trainer, "describe", "describe (plans, topology)")
    phases.wrap(trainer.Trainer, "resume", "resume")
    phases.wrap(trainer.Trainer, "train_step", lambda n: "first step" if n == 1 else "steps 2+")
    phases.wrap(trainer.Trainer, "log_step", "logging (metrics, data health)")
    phases.wrap(Evaluator, "run", "evaluation (val loss + grids)")
    phases.wrap(Evaluator, "baseline", "evaluation (val loss + grids)")
    phases.wrap(PowerEMAProfiles, "maybe_snapshot", "post-hoc snapshots")
    phases.wrap(Checkpointer, "save", "checkpoint saves")
    phases.wrap(Checkpointer, "wait", "checkpoint saves")
    phases.wrap(trainer, "export_from_training", "export")
    phases.wrap(trainer.Trainer, "close", "teardown")
    t = cpu_self()
    rc = trainer.run(cfg)
    run_total = cpu_self() - t
    before_run = ("interpreter start", "config: parse, validate, preflight", IMPORTS)
    inside = sum(v for k, v in phases.seconds.items() if k not in before_run)
    phases.add("other (loop, trainer setup between phases)", run_total - inside)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    phases.add("loader workers (separate processes)", children.ru_utime + children.ru_stime)
    for gen in range(3):
        phases.add(f"  of which garbage collection, generation {gen} ({gc_timer.counts[gen]}x)", gc_timer.seconds[gen])
    rank = int(os.environ.get("RANK", "0"))
    (out / f"phases.rank{rank}.json").write_text(json.dumps(phases.seconds))
    return rc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default="/tmp/launch_cost")
    p.add_argument("--assets", default="/tmp/launch_cost_assets", help="the tiny data and model (built if missing)")
    p.add_argument("overrides", nargs="*", help="config overrides after the reference run's, e.g. eval.every_steps=0")
    ns = p.parse_args()
    sys.path.insert(0, str(REPO))
    import benchlib  # the launcher's imports only: a rank's start stays as measured

    from sd_train.parallel.process_group import free_port
    from tests.support.runs import COMMON

    out = Path(ns.out)
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    assets = benchlib.tiny_test_assets(Path(ns.assets))
    args = ["--config", "configs/test.yaml", *assets, *COMMON, f"output_dir={out / 'run'}", *ns.overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(ns.nproc), **{RANK_MODE: str(out)})
    env["LOCAL_WORLD_SIZE"] = str(ns.nproc)
    procs = []
    for r in range(ns.nproc):
        log = open(out / f"rank{r}.log", "w")
        cmd = [sys.executable, __file__, *args]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=log,
                                      stderr=subprocess.STDOUT))  # fmt: skip
    totals = []
    for r, proc in enumerate(procs):
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            print(f"rank {r} failed (status {status}); see {out / f'rank{r}.log'}")
            return 1
        totals.append(usage.ru_utime + usage.ru_stime)
    ranks = [json.loads((out / f"phases.rank{r}.json").read_text()) for r in range(ns.nproc)]
    labels = list(ranks[0])
    width = max(len(k) for k in labels) + 2
    print(f"{'phase':{width}s}" + "".join(f"{'rank ' + str(r):>9s}" for r in range(ns.nproc)) + f"{'sum':>9s}")
    for k in labels:
        vals = [rk.get(k, 0.0) for rk in ranks]
        print(f"{k:{width}s}" + "".join(f"{v:9.2f}" for v in vals) + f"{sum(vals):9.2f}")
    print(
        f"{'total (the OS count of each rank)':{width}s}" + "".join(f"{v:9.2f}" for v in totals) + f"{sum(totals):9.2f}"
    )
    print(json.dumps({"nproc": ns.nproc, "overrides": ns.overrides, "phases": ranks, "rank_totals": totals}))
    return 0


if __name__ == "__main__":
    if RANK_MODE in os.environ:
        sys.exit(run_rank(Path(os.environ[RANK_MODE]), sys.argv[1:]))
    sys.exit(main())
