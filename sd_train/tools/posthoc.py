"""`sd-train posthoc --run RUN_DIR`: reconstruct EMAs of any length after training from the run's
post-hoc EMA snapshots (`ema.posthoc.*`, EDM2's method; the math is in sd_train.ema.posthoc_math).

Targets are power-function profiles (`--sigma-rel`, relative to the window from the profiles' start
to the last snapshot) and classic EMAs (`--decay`, started at the profiles' start, updated every
step). Each is solved by least squares over every (snapshot, profile) pair; a target whose fit
error is over `--max-fit-error` is refused, because the snapshots cannot express it. The snapshots
are streamed: one snapshot's profile is in memory at a time, next to one accumulator per target.
Each target is written as a diffusers pipeline folder `sigma_rel_<v>` / `decay_<v>` with
`posthoc.json`; `--eval` scores them with the run's own held-out loss and the sample-quality
instrument, next to the raw weights and the tracked late EMA (`export/raw`, `export/ema`), chooses
the best by `--select loss|accuracy` and plots both against EMA length (sd_train.tools.posthoc_eval).
The held-out shards (and, for the instrument, the training shards) come from the run's
config.yaml; a `pipe:` URL there (or in a list file it names) runs a shell command, so `--eval`
refuses it unless `--allow-pipe` is given: a run received from elsewhere must not run commands by
itself, whatever its `data.allow_pipe` says.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sd_train.checksums import verify
from sd_train.config import load_config
from sd_train.ema.posthoc import load_snapshot_profile, read_snapshot_meta
from sd_train.ema.posthoc_math import Fit, classic_weights, power_weights, sigma_rel_to_gamma, solve
from sd_train.errors import UsageError
from sd_train.export import save_pipeline
from sd_train.paths import POSTHOC_DIR, snapshot_steps, step_dir
from sd_train.tools.posthoc_eval import PLOT_NAME, Scored, plot, run_config, score_folders, select_best, table

# The default bound on a target's relative L2 fit error |A^T x - b| / |b|: above it more than 5%
# of the target's weighting over the window's steps is not expressed by the snapshots.
MAX_FIT_ERROR = 0.05


@dataclass
class Target:
    kind: str  # "sigma_rel" or "decay"
    value: float
    weights: np.ndarray  # over w_0..w_N of the window
    fit: Fit | None = None
    refused: str | None = None

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.value:g}"

    @property
    def length(self) -> float:
        """Relative standard deviation of the target's weighting over the window, as a share of
        the window (for a power profile this is its sigma_rel): one axis for both kinds."""
        k = np.arange(self.weights.size, dtype=np.float64)
        mean = float(self.weights @ k)
        return math.sqrt(float(self.weights @ (k - mean) ** 2)) / max(1, self.weights.size - 1)


@dataclass
class Snapshots:
    folders: list[Path]
    metas: list[dict]
    step_start: int
    last_step: int
    sigma_rels: list[float]

    def basis(self) -> list[tuple[int, float]]:
        """(steps after the start, gamma) of every (snapshot, profile) pair, in streaming order."""
        return [(m["step"] - self.step_start, g) for m in self.metas for g in m["gammas"]]


def find_snapshots(run_dir: Path) -> Snapshots:
    root = Path(run_dir) / POSTHOC_DIR
    steps = snapshot_steps(root)
    if not steps:
        where = f"{run_dir} is not a folder" if not Path(run_dir).is_dir() else f"{root} holds no complete snapshot"
        raise UsageError(
            f"--run {run_dir}: {where}. Give the output_dir of a run trained with post-hoc EMA profiles "
            "(ema.posthoc.sigma_rels, e.g. [0.05, 0.1], as configs/demo.yaml does)"
        )
    folders = [step_dir(root, s) for s in steps]
    metas = [read_snapshot_meta(f) for f in folders]
    for folder, meta in zip(folders, metas):  # every byte as written, before any is used
        problem = verify(folder, meta["world_size"])
        if problem is not None:
            raise SystemExit(
                f"sd-train posthoc: snapshot {folder} is damaged: {problem}. Move it away to reconstruct "
                "from the others"
            )
    starts = {m["step_start"] for m in metas}
    profiles = {tuple(m["sigma_rels"]) for m in metas}
    if len(starts) != 1 or len(profiles) != 1:
        raise UsageError(f"--run {run_dir}: the snapshots in {root} come from different ema.posthoc settings")
    return Snapshots(folders, metas, starts.pop(), steps[-1], list(profiles.pop()))


def plan_targets(snaps: Snapshots, sigma_rels: list[float], decays: list[float], max_fit_error: float) -> list[Target]:
    n = snaps.last_step - snaps.step_start
    targets = [Target("sigma_rel", s, power_weights(sigma_rel_to_gamma(s), n)) for s in sigma_rels]
    targets += [Target("decay", d, classic_weights(d, n)) for d in decays]
    basis = snaps.basis()
    for t in targets:
        t.fit = solve(basis, t.weights)
        if t.fit.fit_error > max_fit_error:
            t.refused = (
                f"fit error {t.fit.fit_error:.3g} > {max_fit_error}: the {len(snaps.folders)} snapshots (every "
                f"{_spacing(snaps)} steps over a window of {n} steps, profiles sigma_rel {snaps.sigma_rels}) cannot "
                "express this EMA: a shorter one needs more frequent snapshots (ema.posthoc.snapshot_every), a "
                "wider one a wider profile in ema.posthoc.sigma_rels"
            )
    return targets


def _spacing(snaps: Snapshots) -> str:
    steps = [m["step"] for m in snaps.metas]
    gaps = sorted({b - a for a, b in zip(steps, steps[1:])})
    return "/".join(str(g) for g in gaps) or "-"


def reconstruct(snaps: Snapshots, targets: list[Target]) -> dict[str, dict[str, torch.Tensor]]:
    """Stream the snapshots once: load one (snapshot, profile) at a time and add it, times its
    coefficient, into every target's accumulator."""
    accs: dict[str, dict[str, torch.Tensor]] = {t.name: {} for t in targets}
    index = 0
    for folder, meta in zip(snaps.folders, snaps.metas):
        for p in range(len(meta["gammas"])):
            piece = load_snapshot_profile(folder, p)
            for t in targets:
                c = float(t.fit.coefficients[index])
                acc = accs[t.name]
                for name, x in piece.items():
                    if name in acc:
                        acc[name].add_(x, alpha=c)
                    else:
                        acc[name] = x * c
            del piece
            index += 1
    return accs


def _floats(text: str | None) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()] if text else []


def main_posthoc(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sd-train posthoc", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="the run's output_dir (with posthoc/ snapshots)")
    p.add_argument("--sigma-rel", default=None, help="power-function targets, e.g. 0.03,0.05,0.1 (default: tracked)")
    p.add_argument("--decay", default=None, help="classic EMA targets, e.g. 0.9,0.99")
    p.add_argument("--out", default=None, help="where to write the pipelines (default RUN/posthoc_export)")
    p.add_argument("--eval", action="store_true", help="score every target, raw and the late EMA on held-out loss")
    p.add_argument(
        "--max-fit-error",
        type=float,
        default=MAX_FIT_ERROR,
        help="refuse a target whose relative fit error is above this (default %(default)s: more than 5%% of its "
        "weighting not expressed by the snapshots)",
    )
    p.add_argument(
        "--quality-samples",
        type=int,
        default=None,
        help="with --eval: samples per caption for prompt accuracy (default: the run's eval.quality_samples; 0 off)",
    )
    p.add_argument(
        "--select",
        choices=("loss", "accuracy"),
        default="loss",
        help="with --eval: choose the best length by held-out loss or by prompt accuracy",
    )
    p.add_argument(
        "--allow-pipe",
        action="store_true",
        help="with --eval: let `pipe:` URLs in the run's shard specs run their shell commands (trusted runs only)",
    )
    ns = p.parse_args(argv)
    run_dir = Path(ns.run)
    out = Path(ns.out) if ns.out else run_dir / "posthoc_export"
    snaps = find_snapshots(run_dir)
    cfg = load_config(str(run_dir / "config.yaml"))
    quality_samples = cfg.eval.quality_samples if ns.quality_samples is None else ns.quality_samples
    if ns.eval and ns.select == "accuracy" and quality_samples <= 0:
        raise SystemExit(
            "sd-train posthoc --select accuracy: the run has eval.quality_samples=0; pass --quality-samples K (e.g. 4)"
        )
    if ns.eval:
        run_config(run_dir, ns.allow_pipe, quality_samples > 0)  # refused before anything is reconstructed
    sigma_rels = _floats(ns.sigma_rel) if ns.sigma_rel or ns.decay else list(snaps.sigma_rels)
    targets = plan_targets(snaps, sigma_rels, _floats(ns.decay), ns.max_fit_error)
    print(
        f"{len(snaps.folders)} snapshots x {len(snaps.sigma_rels)} profiles {snaps.sigma_rels}, window steps "
        f"{snaps.step_start}..{snaps.last_step}"
    )
    for t in targets:
        status = f"REFUSED: {t.refused}" if t.refused else "ok"
        print(f"  {t.name:<18} fit error {t.fit.fit_error:.3g}  max |coef| {t.fit.max_abs_coefficient:.3g}  {status}")
    good = [t for t in targets if t.refused is None]
    t0 = time.perf_counter()
    written = {}
    if good:
        states = reconstruct(snaps, good)
        out.mkdir(parents=True, exist_ok=True)
        for t in good:
            written[t.name] = save_pipeline(
                cfg.model.pretrained_path,
                states.pop(t.name),
                out / t.name,
                cfg.objective.prediction_type,
                cfg.objective.zero_dropped_captions,
            )
    print(f"reconstructed {len(good)} target(s) in {time.perf_counter() - t0:.1f}s into {out}")
    report = {
        "run": str(run_dir),
        "step_start": snaps.step_start,
        "last_step": snaps.last_step,
        "snapshots": [m["step"] for m in snaps.metas],
        "max_fit_error": ns.max_fit_error,
        "targets": [
            {
                "name": t.name,
                "kind": t.kind,
                "value": t.value,
                "length": t.length,
                "fit_error": t.fit.fit_error,
                **({"refused": t.refused} if t.refused else {"folder": str(written[t.name])}),
            }
            for t in targets
        ],
    }
    if ns.eval and good:
        report["eval"] = evaluate(run_dir, out, targets, written, snaps, quality_samples, ns.select, ns.allow_pipe)
    out.mkdir(parents=True, exist_ok=True)
    (out / "posthoc.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'posthoc.json'}")
    if not good:
        print("sd-train posthoc: every target was refused (reasons above)", file=sys.stderr)
        return 1
    return 0


def evaluate(
    run_dir: Path,
    out: Path,
    targets: list[Target],
    written: dict[str, Path],
    snaps: Snapshots,
    quality_samples: int,
    select: str,
    allow_pipe: bool = False,
) -> dict:
    """Score the targets, raw and the late EMA (sd_train.tools.posthoc_eval), print the table and
    what it means (`loss_notes`), choose the best length and plot. `allow_pipe`: see `run_config`."""
    baselines = {"raw": run_dir / "export" / "raw", "late_ema": run_dir / "export" / "ema"}
    missing = [str(f) for f in baselines.values() if not (f / "unet").is_dir()]
    if missing:
        raise UsageError(
            f"--eval scores against the run's end-of-run export, and {missing} is missing: train with "
            "export_at_end=true, or drop --eval"
        )
    scores = score_folders(run_dir, {**baselines, **written}, quality_samples, allow_pipe)
    lengths = {t.name: t.length for t in targets}
    rows = [Scored(n, lengths.get(n), s["loss"], s.get("quality")) for n, s in scores.items()]
    best = select_best(rows[len(baselines) :], select)
    losses = {r.name: r.loss for r in rows}
    scored = [t for t in targets if t.name in losses]
    print("\n" + table(rows, best, select))
    print("\n".join(loss_notes(losses, scored, snaps.step_start, snaps.last_step)))
    png = plot(out / PLOT_NAME, rows, best)
    if png is not None:
        print(f"plot: {png}")
    report = {"losses": losses, "best": best.name, "best_overall": min(losses, key=losses.get), "select": select}
    if quality_samples > 0:
        report["quality"] = {r.name: r.quality for r in rows}
        report["quality_samples"] = quality_samples
    return report | ({"plot": str(png)} if png is not None else {})


def loss_notes(losses: dict[str, float], targets: list[Target], step_start: int, last_step: int) -> list[str]:
    """What the loss column says: which variant is best overall (raw included) and which EMA is
    best, what `length` means, and which classic EMA the window cuts short (its length is then set
    by the window, not by its decay)."""
    raw = losses["raw"]
    n = last_step - step_start
    cut = [t for t in targets if t.kind == "decay" and 1.0 / (1.0 - t.value) > n]
    best = min(losses, key=losses.get)
    best_ema = min(["late_ema", *(t.name for t in targets)], key=losses.get)
    if best == "raw":
        verdict = (
            f"best overall: raw at {raw:.6f}, lower than every EMA (averaging does not help this run's held-out "
            f"loss); best EMA: {best_ema} at {losses[best_ema]:.6f} ({losses[best_ema] - raw:+.6f} vs raw)"
        )
    else:
        verdict = f"best overall: {best} at {losses[best]:.6f} ({losses[best] - raw:+.6f} vs raw, raw {raw:.6f})"
    lines = [
        verdict,
        f"length: the spread (standard deviation) of a variant's weights over the profiles' window, steps "
        f"{step_start}..{last_step}, as a share of the window; a sigma_rel target's length is its sigma_rel.",
    ]
    for t in cut:
        lines.append(
            f"* {t.name}: its horizon 1/(1-decay) = {1.0 / (1.0 - t.value):.0f} steps is longer than the {n}-step "
            "window, which cuts it off at the window's start: its length is set by the window, not by the decay "
            "(a longer run, or an earlier ema.posthoc.step_start, gives it room)."
        )
    return lines
