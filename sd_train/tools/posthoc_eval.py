"""`sd-train posthoc --eval`: score every reconstructed EMA length, the raw weights and the run's
late EMA with the run's own held-out loss (same samples, timesteps and noise) and, with
`--quality-samples K` (default the run's `eval.quality_samples`), the sample-quality instrument
(sd_train.sample_quality: prompt accuracy with its 95% interval, fidelity distance); print the
table, choose the best length by `--select loss|accuracy`, and plot both against the EMA length.

The plot is drawn with matplotlib, the `plot` extra (`pip install 'sd-train[plot]'`; `make venv`
installs it); without it the table and posthoc.json are still written and the plot is skipped
with a message saying so.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from sd_train.config import ConfigError, TrainConfig, load_config
from sd_train.data.sources import PipeRefused, expand_sources
from sd_train.errors import UsageError
from sd_train.evaluation import Validator, build_quality
from sd_train.model.parts import encode_text, load_sd_parts
from sd_train.objective import DiffusionObjective
from sd_train.parallel.process_group import DistInfo

BASELINES = ("raw", "late_ema")
PLOT_NAME = "posthoc_loss.png"


@dataclass
class Scored:
    """One variant's figures: its EMA length (None for the baselines), held-out loss and, when
    measured, the instrument's figures."""

    name: str
    length: float | None
    loss: float
    quality: dict | None = None

    @property
    def accuracy(self) -> float:
        return self.quality["accuracy"] if self.quality else float("nan")


def run_config(run_dir: Path, allow_pipe: bool, with_train_shards: bool = False) -> TrainConfig:
    """The run's config.yaml, with `data.allow_pipe` as this command allows it (`--allow-pipe`),
    never as the run says: a run may come from elsewhere. UsageError naming the field and the flag
    when the shards it reads (the held-out ones; the training ones too for the instrument, with
    `with_train_shards`) hold a `pipe:` URL and `allow_pipe` is off."""
    path = Path(run_dir) / "config.yaml"
    try:
        cfg = load_config(str(path))
    except ConfigError as e:
        raise UsageError(f"--eval: {path}: {e}") from e
    cfg.data.allow_pipe = allow_pipe
    fields = ["val_shards"] + (["train_shards"] if with_train_shards else [])
    for name in fields:
        spec = getattr(cfg.data, name)
        try:
            if not spec:
                raise ValueError("empty: the run has no such shards to score on")
            expand_sources(spec, allow_pipe)
        except PipeRefused as e:
            raise UsageError(
                f"--eval: {path}: data.{name}={spec!r}: {e.where} names {e.url!r}, a `pipe:` URL, "
                "which would run its command through /bin/sh. A run's config.yaml may come from elsewhere, so its "
                "data.allow_pipe is not trusted: pass --allow-pipe if you trust this run"
            ) from e
        except ValueError as e:
            raise UsageError(f"--eval: {path}: data.{name}={spec!r}: {e}") from e
    return cfg


def score_folders(
    run_dir: Path, folders: dict[str, Path], quality_samples: int = 0, allow_pipe: bool = False
) -> dict[str, dict]:
    """Each pipeline folder's UNet scored in this process with no process group: {name: {"loss":
    held-out loss, "quality": the instrument's figures (with `quality_samples` > 0)}}. `allow_pipe`:
    see `run_config`."""
    cfg = run_config(run_dir, allow_pipe, quality_samples > 0)
    cfg.model.pretrained_path = str(next(iter(folders.values())))
    cfg.model.init_unet = "pretrained"
    device = torch.device("cpu")
    parts = load_sd_parts(cfg.model, device, cfg.seed)
    objective = DiffusionObjective(
        cfg.objective, parts.noise_scheduler.alphas_cumprod, encode_text(parts, [""], device)
    )
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device, mesh=None)
    validator = Validator(cfg, parts, objective, info)
    probe = build_quality(cfg, parts, info, quality_samples) if quality_samples > 0 else None
    out: dict[str, dict] = {}
    for name, folder in folders.items():
        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
        parts.unet.load_state_dict(unet.state_dict())
        out[name] = {"loss": validator.loss(parts.unet)}
        if probe is not None:
            out[name]["quality"] = probe.score(parts.unet)
    return out


def select_best(rows: list[Scored], by: str) -> Scored:
    """The best post-hoc length: the lowest held-out loss, or the highest prompt accuracy (ties:
    the smaller fidelity distance, then the lower loss)."""
    if by == "loss":
        return min(rows, key=lambda r: r.loss)
    return min(rows, key=lambda r: (-r.quality["accuracy"], r.quality["fidelity"], r.loss))


def table(rows: list[Scored], best: Scored, by: str) -> str:
    """The printed table: every variant's loss against raw and the late EMA, and the instrument's
    figures where measured."""
    raw, late = rows[0].loss, rows[1].loss
    quality = rows[0].quality is not None
    head = f"{'variant':<18} {'length':>8} {'val loss':>10} {'vs raw':>10} {'vs late EMA':>12}"
    if quality:
        head += f" {'accuracy':>9} {'95% interval':>15} {'fidelity':>9}"
    lines = [head]
    for r in rows:
        length = f"{r.length:>8.4f}" if r.length is not None else f"{'':>8}"
        line = f"{r.name:<18} {length} {r.loss:>10.6f} {r.loss - raw:>+10.6f} {r.loss - late:>+12.6f}"
        if quality:
            lo, hi = r.quality["accuracy_95"]
            line += f" {r.accuracy:>9.3f} {f'[{lo:.3f}, {hi:.3f}]':>15} {r.quality['fidelity']:>9.4f}"
        lines.append(line)
    figure = f"loss {best.loss:.6f}" + (f", accuracy {best.accuracy:.3f}" if quality else "")
    lines.append(f"best by {by}: {best.name} ({figure})")
    if quality:
        lines.append(
            "prompt accuracy: raw {:.3f}, late EMA {:.3f}, best post-hoc ({}) {:.3f}".format(
                rows[0].accuracy, rows[1].accuracy, best.name, best.accuracy
            )
        )
    return "\n".join(lines)


def plot(path: Path, rows: list[Scored], best: Scored) -> Path | None:
    """Held-out loss (top) and, when measured, prompt accuracy with its 95% interval (bottom)
    against the EMA length; raw and late EMA as horizontal lines; the chosen length circled.
    Returns None, after saying why, when matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        print(f"no plot: matplotlib is not installed (pip install 'sd-train[plot]', or make venv); {path} not written")
        return None
    import matplotlib  # lazy: the optional `plot` extra

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    quality = rows[0].quality is not None
    fig, axes = plt.subplots(2 if quality else 1, 1, figsize=(7, 6.5 if quality else 4), sharex=True, squeeze=False)
    panels = [("held-out loss", lambda r: r.loss, None)]
    if quality:
        panels.append(("prompt accuracy", lambda r: r.accuracy, lambda r: r.quality["accuracy_95"]))
    for ax, (label, value, interval) in zip(axes[:, 0], panels):
        for base, color in zip(BASELINES, ("tab:red", "tab:green")):
            r = next(x for x in rows if x.name == base)
            ax.axhline(value(r), color=color, linestyle="--", label=f"{base} {value(r):.4g}")
        for kind, color in (("sigma_rel", "tab:blue"), ("decay", "tab:orange")):
            pts = sorted((r for r in rows if r.name.startswith(kind)), key=lambda r: r.length)
            if not pts:
                continue
            xs, ys = [r.length for r in pts], [value(r) for r in pts]
            err = None
            if interval is not None:
                err = [[y - interval(r)[0] for r, y in zip(pts, ys)], [interval(r)[1] - y for r, y in zip(pts, ys)]]
            ax.errorbar(xs, ys, yerr=err, color=color, marker="o", capsize=3, label=kind)
        if interval is not None and rows[0].quality.get("chance"):
            chance = rows[0].quality["chance"]
            ax.axhline(chance, color="gray", linestyle=":", label=f"chance {chance:.4g}")
        ax.scatter(
            [best.length], [value(best)], s=160, facecolors="none", edgecolors="black", label=f"best: {best.name}"
        )
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("EMA length (relative std of the weighting over the window)")
    axes[0, 0].set_title("post-hoc EMA: " + " and ".join(p[0] for p in panels) + " vs EMA length")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
