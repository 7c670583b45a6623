"""Langevin noise on the demo, honestly: 3 seeds x D (optim.langevin.diffusion) in {0, 1e-5, 1e-4}.

    nice .venv/bin/python bench/langevin_demo_grid.py [--out runs/langevin] [--seeds 0,1,2]
        [--diffusion 0,1e-5,1e-4] [--threads 1] [train|score|table ...]

`train`: one `make demo` training per cell (with `--code DIR`: the train.py and sd_train/ of DIR, so that
the grid can train from a frozen copy while the working tree changes) (`train.py --config configs/demo.yaml seed=S
optim.langevin.diffusion=D`), one at a time, skipping cells already trained. Evaluation during
training is cut to the last step (`eval.every_steps=1000`): evaluation never changes training
(tests/e2e/test_train.py checks it), and `score` measures everything after the fact.
`score`: `sd-train posthoc --eval` on each cell with the demo's post-hoc targets (the Makefile's
POSTHOC_FLAGS): held-out loss and prompt accuracy for the raw weights, the late EMA and every
reconstructed length. `table`: the table (markdown) and one JSON line, also written to
OUT/table.md and OUT/table.json. With no phase named, all three.

The D = 0 cells are `make demo`'s training with seed S, so their rows are the demo's figures over
3 seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The Makefile's POSTHOC_FLAGS (make demo).
SIGMA_RELS = "0.03,0.05,0.07,0.1,0.15"
DECAYS = "0.95,0.98,0.99"
QUALITY_SAMPLES = 4  # and its --quality-samples


def cell_dir(out: Path, diffusion: float, seed: int) -> Path:
    return out / f"d{diffusion:g}_s{seed}"


def training_order(seeds: list[int], diffusions: list[float]) -> list[tuple[float, int]]:
    """The first and last D over every seed first (the comparison the table needs most), seed by
    seed, then the D values between them."""
    ends = [diffusions[0], diffusions[-1]] if len(diffusions) > 1 else diffusions
    first = [(d, s) for s in seeds for d in ends]
    return first + [(d, s) for d in diffusions if d not in ends for s in seeds]


def train(out: Path, seeds: list[int], diffusions: list[float], threads: int, code: Path) -> None:
    for d, s in training_order(seeds, diffusions):
        run = cell_dir(out, d, s)
        if (run / "export" / "raw" / "unet").is_dir():
            print(f"{run}: trained", flush=True)
            continue
        cmd = [
            sys.executable, str(code / "train.py"), "--config", "configs/demo.yaml", f"seed={s}",
            f"optim.langevin.diffusion={d}", "eval.every_steps=1000", f"output_dir={run}",
        ]  # fmt: skip
        run.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        log_path = run.parent / f"{run.name}.train.log"  # not with_suffix: "d0.0001_s0" has a dot
        with open(log_path, "w") as log:
            code_ = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=_env(threads)).returncode
        print(f"{run}: trained in {time.time() - t0:.0f}s, exit {code_}", flush=True)
        if code_ != 0:
            raise SystemExit(f"{' '.join(cmd)} exited {code_}; see {log_path}")


def score(out: Path, seeds: list[int], diffusions: list[float], threads: int) -> None:
    for d in diffusions:
        for s in seeds:
            run = cell_dir(out, d, s)
            report = run / "posthoc_export" / "posthoc.json"
            if report.is_file() and "quality" in json.loads(report.read_text()).get("eval", {}):
                print(f"{run}: scored", flush=True)
                continue
            cmd = [
                str(REPO / ".venv" / "bin" / "sd-train"), "posthoc", "--run", str(run), "--eval",
                "--sigma-rel", SIGMA_RELS, "--decay", DECAYS, "--quality-samples", str(QUALITY_SAMPLES),
            ]  # fmt: skip
            t0 = time.time()
            log_path = run.parent / f"{run.name}.score.log"
            with open(log_path, "w") as log:
                code = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=_env(threads)).returncode
            print(f"{run}: scored in {time.time() - t0:.0f}s, exit {code}", flush=True)
            if code != 0:
                raise SystemExit(f"{' '.join(cmd)} exited {code}; see {log_path}")


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def _cell(run: Path) -> dict:
    """raw, late EMA and the best post-hoc length (by held-out loss and by prompt accuracy)."""
    ev = json.loads((run / "posthoc_export" / "posthoc.json").read_text())["eval"]
    losses, quality = ev["losses"], ev["quality"]
    targets = [n for n in losses if n not in ("raw", "late_ema")]
    by_loss = min(targets, key=lambda n: losses[n])
    by_acc = max(targets, key=lambda n: (quality[n]["accuracy"], -quality[n]["fidelity"]))
    pick = {"raw": "raw", "late_ema": "late_ema", "best_by_loss": by_loss, "best_by_accuracy": by_acc}
    return {
        k: {
            "variant": n,
            "loss": losses[n],
            "accuracy": quality[n]["accuracy"],
            "fidelity": quality[n]["fidelity"],
        }
        for k, n in pick.items()
    }


def _mean_spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    spread = (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {spread:.4f}"


def table(out: Path, seeds: list[int], diffusions: list[float]) -> None:
    cells = {(d, s): _cell(cell_dir(out, d, s)) for d in diffusions for s in seeds}
    rows = [
        "| D | weights | held-out loss | prompt accuracy | fidelity distance | chosen lengths |",
        "| ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for d in diffusions:
        for k in ("raw", "late_ema", "best_by_loss", "best_by_accuracy"):
            per_seed = [cells[(d, s)][k] for s in seeds]
            names = ", ".join(c["variant"] for c in per_seed) if k.startswith("best") else ""
            rows.append(
                f"| {d:g} | {k} | {_mean_spread([c['loss'] for c in per_seed])} | "
                f"{_mean_spread([c['accuracy'] for c in per_seed])} | "
                f"{_mean_spread([c['fidelity'] for c in per_seed])} | {names} |"
            )
    text = "\n".join(rows)
    note = f"mean ± half-range over seeds {seeds}; each cell: {out}/d<D>_s<seed>/posthoc_export/posthoc.json"
    print(text + "\n\n" + note)
    (out / "table.md").write_text(text + "\n\n" + note + "\n")
    payload = {f"d{d:g}_s{s}": c for (d, s), c in cells.items()}
    (out / "table.json").write_text(json.dumps(payload, indent=1))
    print(json.dumps({"bench": "langevin_demo_grid", "seeds": seeds, "diffusions": diffusions, "cells": payload}))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/langevin")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--diffusion", default="0,1e-5,1e-4")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (1 on a busy machine)")
    p.add_argument(
        "--code", default=str(REPO), help="train with the train.py (and sd_train/) of this folder, e.g. a frozen copy"
    )
    # Checked by hand: Python 3.11's argparse checks a nargs="*" default (or no phase) against `choices`
    # as one value and refuses it.
    p.add_argument("phases", nargs="*", help="train, score and/or table (default: all three)")
    ns = p.parse_args(argv)
    out = Path(ns.out).resolve()
    seeds = [int(v) for v in ns.seeds.split(",")]
    diffusions = [float(v) for v in ns.diffusion.split(",")]
    ns.phases = ns.phases or ["train", "score", "table"]
    if unknown := set(ns.phases) - {"train", "score", "table"}:
        p.error(f"unknown phase(s) {sorted(unknown)}: choose from train, score, table")
    if "train" in ns.phases:
        train(out, seeds, diffusions, ns.threads, Path(ns.code).resolve())
    if "score" in ns.phases:
        score(out, seeds, diffusions, ns.threads)
    if "table" in ns.phases:
        table(out, seeds, diffusions)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
