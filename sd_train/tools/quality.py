"""`sd-train quality`: the EMA quality figure. The demo model is trained three times with the same
seed, steps and data, and the final held-out validation loss is compared:

    no_ema           ema.enabled=false
    ema_whole_run    ema.step_start_ema=0 (the EMA over the whole run)
    ema_late_window  ema.window_fraction=0.035 (the last 3.5% of the run, MosaicML's SD2 share)

    sd-train quality [--config configs/demo.yaml] [--steps N] [--out runs/quality] [--decay D] [key=value ...]

Each variant is a separate `python train.py --config C ... output_dir=OUT/VARIANT` (so the figure
comes from the real trainer, not a re-implementation); its output goes to OUT/VARIANT.log. Then
each run's metrics.jsonl gives the final `val/loss_raw` and `val/loss_ema` (evaluated at the
last step on the fixed held-out samples, timesteps and noise), printed as a table and one JSON line.

Both EMA variants use the same constant decay (warmup off, so the decay is the one asked for).
By default it is the largest decay the late window allows: the window's N updates must leave at
most `ema.tolerance` of the final EMA to pre-window weights, decay^N <= tolerance. Every plan is
checked before the first run starts. Extra `key=value` overrides go to all three runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sd_train.config import ConfigError, TrainConfig, load_config
from sd_train.ema_plan import plan_from_config
from sd_train.preflight import preflight

TRAIN_PY = Path(__file__).resolve().parents[2] / "train.py"  # the repository root, above sd_train/tools/
LATE_WINDOW_FRACTION = 0.035
VARIANTS = ("no_ema", "ema_whole_run", "ema_late_window")


def largest_safe_decay(window_updates: int, tolerance: float) -> float:
    """The largest constant decay d with d^N <= tolerance for N = `window_updates`, tested with the
    very comparison the startup check makes (d**N > tolerance refuses), so float rounding can never
    make the check refuse it."""
    decay = tolerance ** (1.0 / window_updates)
    while decay**window_updates > tolerance:
        decay = math.nextafter(decay, 0.0)
    return decay


def variant_overrides(decay: float) -> dict[str, list[str]]:
    """The overrides that make each variant; they reset every EMA key a config might set, so the
    three runs differ only where the figure says they do."""
    common = [
        "ema.enabled=true",
        "ema.warmup=false",
        "ema.window_from_tolerance=false",
        "ema.update_every=1",
        f"ema.decay={decay!r}",
    ]
    return {
        "no_ema": ["ema.enabled=false"],
        "ema_whole_run": [*common, "ema.step_start_ema=0"],
        "ema_late_window": [*common, "ema.step_start_ema=null", f"ema.window_fraction={LATE_WINDOW_FRACTION}"],
    }


def late_window_updates(cfg: TrainConfig) -> int:
    """Updates in the late window of this run (what the default decay is computed for)."""
    late = dataclasses.replace(
        cfg.ema,
        enabled=True,
        step_start_ema=None,
        window_from_tolerance=False,
        window_fraction=LATE_WINDOW_FRACTION,
        update_every=1,
        warmup=False,
    )
    return plan_from_config(late, cfg.max_steps).num_updates


def resolved_configs(config: str, base: list[str], decay: float) -> dict[str, TrainConfig]:
    """Each variant's config, validated (EMA plan included) before anything runs."""
    out = {}
    for name, extra in variant_overrides(decay).items():
        cfg = load_config(config, [*base, *extra])
        cfg.validate(1)
        cfg = preflight(cfg, 1)
        if cfg.eval.every_steps <= 0 or not cfg.data.val_shards:
            raise ConfigError(
                "the quality figure needs the validation loss: set eval.every_steps > 0 and data.val_shards"
            )
        out[name] = cfg
    return out


def run_variant(config: str, overrides: list[str], out_dir: Path, log_path: Path) -> float:
    """Train one variant in a child process; returns its wall seconds."""
    cmd = [sys.executable, str(TRAIN_PY), "--config", config, *overrides, f"output_dir={out_dir}"]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} exited {code}; end of {log_path}:\n{tail}")
    return time.perf_counter() - t0


def final_val_losses(metrics_path: Path) -> dict[str, Any]:
    """The last step's `val/loss_raw` and `val/loss_ema` from a run's metrics.jsonl."""
    last: dict[str, Any] = {}
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line)
            if "val/loss_raw" in record and record.get("step", -1) >= last.get("step", -1):
                last = record
    if not last:
        raise RuntimeError(f"{metrics_path} has no val/loss_raw record")
    return {"step": last["step"], "val/loss_raw": last["val/loss_raw"], "val/loss_ema": last.get("val/loss_ema")}


def print_report(rows: dict[str, dict[str, Any]]) -> None:
    header = (
        f"{'variant':<16} {'EMA window (steps)':>20} {'decay':>10} "
        f"{'val/loss_raw':>13} {'val/loss_ema':>13} {'wall s':>7}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for name, r in rows.items():
        window = f"{r['step_start_ema']}..{r['max_steps']}" if r["ema_enabled"] else "none"
        decay = f"{r['decay']:.6g}" if r["ema_enabled"] else "-"
        ema = f"{r['val/loss_ema']:.6f}" if r["val/loss_ema"] is not None else "-"
        print(f"{name:<16} {window:>20} {decay:>10} {r['val/loss_raw']:>13.6f} {ema:>13} {r['wall_s']:>7.1f}")
    raws = {r["val/loss_raw"] for r in rows.values()}
    # The EMA never feeds back into training, so the raw weights (and their loss) should be the
    # same in all three runs; a difference means the runs did not see the same steps.
    print(
        "raw weights' val loss identical across the three runs: "
        f"{'yes' if len(raws) == 1 else 'NO: ' + str(sorted(raws))}"
    )


def main_quality(argv: list[str]) -> int:
    """`sd-train quality`: train the demo model three ways (no EMA, EMA over the whole run, EMA over
    the last 3.5%) and compare the final held-out validation loss."""
    p = argparse.ArgumentParser(
        prog="sd-train quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="configs/demo.yaml", help="the run to repeat three ways")
    p.add_argument("--steps", type=int, default=None, help="max_steps of every run (default: the config's)")
    p.add_argument("--out", default="runs/quality", help="OUT/VARIANT gets each run's output_dir; must not exist yet")
    p.add_argument(
        "--decay",
        type=float,
        default=None,
        help="EMA decay of both EMA variants (default: the largest the late window allows)",
    )
    p.add_argument("overrides", nargs="*", help="section.key=value for all three runs")
    ns = p.parse_args(argv)
    base = list(ns.overrides) + ([f"max_steps={ns.steps}"] if ns.steps is not None else [])
    out = Path(ns.out)
    try:
        cfg = load_config(ns.config, base)
        window = late_window_updates(cfg)
        safe = largest_safe_decay(window, cfg.ema.tolerance)
        decay = ns.decay if ns.decay is not None else safe
        configs = resolved_configs(ns.config, base, decay)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        if ns.decay is not None and "window" in locals():
            print(
                f"(the late window has {window} updates: at ema.tolerance={cfg.ema.tolerance} its largest "
                f"decay is {safe:.6g})",
                file=sys.stderr,
            )
        return 2
    taken = [str(out / name) for name in VARIANTS if (out / name).exists()]
    if taken:
        print(
            f"sd-train quality: {taken} already exist (a rerun would resume or append to them); "
            "pick another --out or delete them",
            file=sys.stderr,
        )
        return 2
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    for name, extra in variant_overrides(decay).items():
        c = configs[name]
        plan = plan_from_config(c.ema, c.max_steps)
        print(f"[{name}] training {c.max_steps} steps -> {out / name} (log: {out / name}.log)", flush=True)
        wall = run_variant(ns.config, [*base, *extra], out / name, out / f"{name}.log")
        rows[name] = {
            "ema_enabled": plan.enabled, "decay": plan.decay if plan.enabled else None,
            "step_start_ema": plan.step_start_ema if plan.enabled else None, "max_steps": c.max_steps,
            "pre_window_share": plan.pre_window_share() if plan.enabled else None,
            **final_val_losses(out / name / "metrics.jsonl"), "wall_s": wall,
        }  # fmt: skip
    print_report(rows)
    print(
        json.dumps(
            {
                "bench": "quality",
                "config": ns.config,
                "steps": configs["no_ema"].max_steps,
                "decay": decay,
                "variants": rows,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main_quality(sys.argv[1:]))
