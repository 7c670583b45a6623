"""`sd-train quality`: the EMA quality figure, from one training run and post-hoc EMA.

    sd-train quality [--config configs/demo.yaml] [--steps N] [--out runs/quality]
                     [--window-fraction 0.5] [--snapshots 40] [--sigma-rel LIST] [--decay LIST] [key=value ...]

One `python train.py` run (the real trainer) with a constant LR after warmup, where the EMA length
matters most, tracks EDM2's two power-function profiles (sigma_rel 0.05, 0.10) over the last
`--window-fraction` of the run and snapshots them `--snapshots` times; the config's own EMA (the
late window, 3.5% of the run by default) is tracked next to them. Then `sd-train posthoc --eval`
reconstructs a grid of sigma_rel and classic decays from the snapshots and scores each, the raw
weights and the late EMA with the run's held-out loss (same samples, timesteps and noise). The
table, `posthoc.json` and the plot are under OUT/run/posthoc_export/.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from sd_train.config import ConfigError, load_config
from sd_train.preflight import preflight
from sd_train.tools.posthoc import main_posthoc

TRAIN_PY = Path(__file__).resolve().parents[2] / "train.py"  # the repository root, above sd_train/tools/
LATE_WINDOW_FRACTION = 0.035  # MosaicML SD2's late EMA window (bench/bench_run_ema.py uses it too)
SIGMA_GRID = "0.01,0.02,0.03,0.05,0.07,0.1,0.15,0.2,0.25"
DECAY_GRID = "0.9,0.95,0.98,0.99,0.995,0.998"


def largest_safe_decay(window_updates: int, tolerance: float) -> float:
    """The largest constant decay d with d^N <= tolerance for N = `window_updates`, tested with the
    very comparison the startup check makes (d**N > tolerance refuses), so float rounding can never
    make the check refuse it."""
    decay = tolerance ** (1.0 / window_updates)
    while decay**window_updates > tolerance:
        decay = math.nextafter(decay, 0.0)
    return decay


def run_overrides(steps: int, window_fraction: float, snapshots: int) -> list[str]:
    start = steps - max(1, round(window_fraction * steps))
    every = max(1, (steps - start) // snapshots)
    return [
        f"max_steps={steps}",
        "optim.schedule=constant",
        "export_at_end=true",
        "ema.posthoc.sigma_rels=[0.05,0.1]",
        f"ema.posthoc.step_start={start}",
        f"ema.posthoc.snapshot_every={every}",
    ]


def main_quality(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="sd-train quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="configs/demo.yaml", help="the run to train")
    p.add_argument("--steps", type=int, default=None, help="max_steps (default: the config's)")
    p.add_argument("--out", default="runs/quality", help="OUT/run is the run's output_dir; must not exist yet")
    p.add_argument("--window-fraction", type=float, default=0.5, help="share of the run the profiles cover")
    p.add_argument("--snapshots", type=int, default=40, help="snapshots over the profiles' window")
    p.add_argument("--sigma-rel", default=SIGMA_GRID, help="power-function targets")
    p.add_argument("--decay", default=DECAY_GRID, help="classic EMA targets (from the profiles' start)")
    p.add_argument("overrides", nargs="*", help="section.key=value for the run")
    ns = p.parse_args(argv)
    out = Path(ns.out)
    run_dir = out / "run"
    try:
        steps = ns.steps or load_config(ns.config, list(ns.overrides)).max_steps
        overrides = [*ns.overrides, *run_overrides(steps, ns.window_fraction, ns.snapshots)]
        cfg = load_config(ns.config, overrides)
        cfg.validate(1)
        preflight(cfg, 1)
        if not cfg.data.val_shards or cfg.eval.num_val_samples <= 0:
            raise ConfigError("the quality figure needs the held-out loss: set data.val_shards")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if run_dir.exists():
        print(f"sd-train quality: error: {run_dir} already exists; pick another --out or delete it", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(TRAIN_PY), "--config", ns.config, *overrides, f"output_dir={run_dir}"]
    print(f"training {steps} steps -> {run_dir} (log: {out / 'train.log'})", flush=True)
    t0 = time.perf_counter()
    with open(out / "train.log", "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        print(f"{' '.join(cmd)} exited {code}; see {out / 'train.log'}", file=sys.stderr)
        return 1
    print(f"trained in {time.perf_counter() - t0:.0f}s", flush=True)
    rc = main_posthoc(["--run", str(run_dir), "--sigma-rel", ns.sigma_rel, "--decay", ns.decay, "--eval"])
    report = json.loads((run_dir / "posthoc_export" / "posthoc.json").read_text())
    print(json.dumps({"bench": "quality", "config": ns.config, "steps": steps, "overrides": overrides, **report}))
    return rc


if __name__ == "__main__":
    sys.exit(main_quality(sys.argv[1:]))
