"""`sd-train posthoc --run RUN_DIR`: reconstruct EMAs of any length after training from the run's
post-hoc EMA snapshots (`ema.posthoc.*`, EDM2's method; the math is in sd_train.ema.posthoc_math).

Targets are power-function profiles (`--sigma-rel`, relative to the window from the profiles' start
to the last snapshot) and classic EMAs (`--decay`, started at the profiles' start, updated every
step). Each is solved by least squares over every (snapshot, profile) pair; a target whose fit
error is over `--max-fit-error` is refused, because the snapshots cannot express it. The snapshots
are streamed: one snapshot's profile is in memory at a time, next to one accumulator per target.
Each target is written as a diffusers pipeline folder `sigma_rel_<v>` / `decay_<v>` with
`posthoc.json`; `--eval` scores them with the run's own held-out loss, next to the raw weights and
the tracked late EMA (`export/raw`, `export/ema`), and draws loss against EMA length as a PNG.
The held-out shards come from the run's config.yaml; a `pipe:` URL there (or in a list file it
names) runs a shell command, so `--eval` refuses it unless `--allow-pipe` is given: a run received
from elsewhere must not run commands by itself, whatever its `data.allow_pipe` says.
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
from diffusers import UNet2DConditionModel
from PIL import Image, ImageDraw

from sd_train.config import ConfigError, TrainConfig, load_config
from sd_train.data.sources import PipeRefused, expand_sources
from sd_train.ema.posthoc import load_snapshot_profile, read_snapshot_meta
from sd_train.ema.posthoc_math import Fit, classic_weights, power_weights, sigma_rel_to_gamma, solve
from sd_train.evaluation import Validator
from sd_train.export import save_pipeline
from sd_train.model.parts import encode_text, load_sd_parts
from sd_train.objective import DiffusionObjective
from sd_train.parallel.process_group import DistInfo
from sd_train.paths import POSTHOC_DIR, snapshot_steps, step_dir

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
        raise SystemExit(
            f"sd-train posthoc: {root} has no complete snapshots; train with ema.posthoc.sigma_rels=[0.05, 0.1]"
        )
    folders = [step_dir(root, s) for s in steps]
    metas = [read_snapshot_meta(f) for f in folders]
    starts = {m["step_start"] for m in metas}
    profiles = {tuple(m["sigma_rels"]) for m in metas}
    if len(starts) != 1 or len(profiles) != 1:
        raise SystemExit(f"sd-train posthoc: the snapshots in {root} come from different ema.posthoc settings")
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
                "express this EMA: a short one needs more frequent snapshots (ema.posthoc.snapshot_every), one "
                "wider than the profiles a wider profile in ema.posthoc.sigma_rels"
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


def run_config(run_dir: Path, allow_pipe: bool) -> TrainConfig:
    """The run's config.yaml, with `data.allow_pipe` as this command allows it (never as the run
    says). SystemExit naming the field and the flag when its held-out shards hold a `pipe:` URL and
    `allow_pipe` is off."""
    path = Path(run_dir) / "config.yaml"
    try:
        cfg = load_config(str(path))
        cfg.data.allow_pipe = allow_pipe
        if not cfg.data.val_shards:
            raise ValueError("data.val_shards is empty: the run has no held-out shards to score on")
        expand_sources(cfg.data.val_shards, allow_pipe)
    except PipeRefused as e:
        raise SystemExit(
            f"sd-train posthoc --eval: {path}: data.val_shards={cfg.data.val_shards!r}: {e.where} names {e.url!r}, "
            "a `pipe:` URL, which would run its command through /bin/sh. A run's config.yaml may come from elsewhere, "
            "so its data.allow_pipe is not trusted: pass --allow-pipe if you trust this run"
        ) from e
    except (ConfigError, ValueError) as e:
        raise SystemExit(f"sd-train posthoc --eval: {path}: {e}") from e
    return cfg


def score_folders(run_dir: Path, folders: dict[str, Path], allow_pipe: bool = False) -> dict[str, float]:
    """The run's own held-out loss (same samples, timesteps, noise) of each pipeline folder's UNet,
    in this process with no process group. `allow_pipe`: see `run_config`."""
    cfg = run_config(run_dir, allow_pipe)
    first = next(iter(folders.values()))
    cfg.model.pretrained_path = str(first)
    cfg.model.init_unet = "pretrained"
    device = torch.device("cpu")
    parts = load_sd_parts(cfg.model, device, cfg.seed)
    objective = DiffusionObjective(
        cfg.objective, parts.noise_scheduler.alphas_cumprod, encode_text(parts, [""], device)
    )
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device, mesh=None)
    validator = Validator(cfg, parts, objective, info)
    out = {}
    for name, folder in folders.items():
        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
        parts.unet.load_state_dict(unet.state_dict())
        out[name] = validator.loss(parts.unet)
    return out


def plot(path: Path, points: list[tuple[str, float, float]], lines: dict[str, float]) -> Path:
    """Loss against EMA length (points: label, length, loss), with horizontal lines (drawn with
    PIL: matplotlib is not a dependency)."""
    w, h, m = 720, 440, 70
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs = [x for _, x, _ in points] or [0.0, 1.0]
    ys = [y for _, _, y in points] + list(lines.values())
    x0, x1 = min(xs) * 0.9, max(xs) * 1.1 + 1e-9
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.1 or abs(y0) * 0.01 or 1e-3
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float, y: float) -> tuple[float, float]:
        return m + (x - x0) / (x1 - x0) * (w - 2 * m), h - m - (y - y0) / (y1 - y0) * (h - 2 * m)

    d.rectangle([m, m, w - m, h - m], outline="black")
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        d.text((5, px(x0, yv)[1] - 6), f"{yv:.5f}", fill="black")
        xv = x0 + (x1 - x0) * i / 4
        d.text((px(xv, y0)[0] - 15, h - m + 8), f"{xv:.3f}", fill="black")
    d.text((w // 2 - 120, h - 25), "EMA length (relative std over the window)", fill="black")
    d.text((m, 20), "held-out loss vs EMA length", fill="black")
    colors = {"raw": (200, 0, 0), "late_ema": (0, 130, 0)}
    for i, (name, yv) in enumerate(lines.items()):
        y = px(x0, yv)[1]
        d.line([m, y, w - m, y], fill=colors.get(name, (120, 120, 120)), width=2)
        d.text((w - m - 150, y - 14 if i % 2 == 0 else y + 2), f"{name} {yv:.5f}", fill=colors.get(name, "gray"))
    for kind, color in (("sigma_rel", (0, 0, 200)), ("decay", (200, 120, 0))):
        pts = sorted((px(x, y) for label, x, y in points if label.startswith(kind)), key=lambda p: p[0])
        if len(pts) > 1:
            d.line(pts, fill=color, width=1)
        for x, y in pts:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
    d.text((m + 10, m + 10), "blue: power profiles (sigma_rel); orange: classic decays", fill="black")
    img.save(path)
    return path


def _floats(text: str | None) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()] if text else []


def main_posthoc(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sd-train posthoc", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="the run's output_dir (with posthoc/ snapshots)")
    p.add_argument("--sigma-rel", default=None, help="power-function targets, e.g. 0.03,0.05,0.1 (default: tracked)")
    p.add_argument("--decay", default=None, help="classic EMA targets, e.g. 0.9,0.99")
    p.add_argument("--out", default=None, help="where to write the pipelines (default RUN/posthoc_export)")
    p.add_argument("--eval", action="store_true", help="score every target, raw and the late EMA on held-out loss")
    p.add_argument("--max-fit-error", type=float, default=MAX_FIT_ERROR, help="refuse targets fitted worse")
    p.add_argument(
        "--allow-pipe",
        action="store_true",
        help="with --eval: let `pipe:` URLs in the run's data.val_shards run their shell commands (trusted runs only)",
    )
    ns = p.parse_args(argv)
    run_dir = Path(ns.run)
    if ns.eval:
        run_config(run_dir, ns.allow_pipe)  # refused before any reconstruction is paid for
    out = Path(ns.out) if ns.out else run_dir / "posthoc_export"
    snaps = find_snapshots(run_dir)
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
    cfg = load_config(str(run_dir / "config.yaml"))
    t0 = time.perf_counter()
    written = {}
    if good:
        states = reconstruct(snaps, good)
        out.mkdir(parents=True, exist_ok=True)
        for t in good:
            written[t.name] = save_pipeline(
                cfg.model.pretrained_path, states.pop(t.name), out / t.name, cfg.objective.prediction_type
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
        report["eval"] = evaluate(run_dir, out, targets, written, ns.allow_pipe)
    out.mkdir(parents=True, exist_ok=True)
    (out / "posthoc.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'posthoc.json'}")
    if not good:
        print("sd-train posthoc: every target was refused (reasons above)", file=sys.stderr)
        return 1
    return 0


def evaluate(run_dir: Path, out: Path, targets: list[Target], written: dict[str, Path], allow_pipe: bool) -> dict:
    baselines = {"raw": run_dir / "export" / "raw", "late_ema": run_dir / "export" / "ema"}
    missing = [str(f) for f in baselines.values() if not (f / "unet").is_dir()]
    if missing:
        raise SystemExit(f"sd-train posthoc --eval: {missing} missing; the run must export at the end (export_at_end)")
    losses = score_folders(run_dir, {**baselines, **written}, allow_pipe)
    raw, late = losses["raw"], losses["late_ema"]
    print(f"\n{'variant':<18} {'length':>8} {'val loss':>10} {'vs raw':>10} {'vs late EMA':>12}")
    for name in ("raw", "late_ema"):
        print(f"{name:<18} {'':>8} {losses[name]:>10.6f} {losses[name] - raw:>+10.6f} {losses[name] - late:>+12.6f}")
    rows = []
    for t in targets:
        if t.name not in losses:
            continue
        v = losses[t.name]
        rows.append((t.name, t.length, v))
        print(f"{t.name:<18} {t.length:>8.4f} {v:>10.6f} {v - raw:>+10.6f} {v - late:>+12.6f}")
    best = min(rows, key=lambda r: r[2])
    print(f"best: {best[0]} at {best[2]:.6f} (raw {raw:.6f}, late EMA {late:.6f})")
    png = plot(out / "posthoc_loss.png", rows, {"raw": raw, "late_ema": late})
    print(f"plot: {png}")
    return {"losses": losses, "best": best[0], "plot": str(png)}
