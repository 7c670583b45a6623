"""`sd-train quality-check`: validate the sample-quality instrument (sd_train.sample_quality) on a
config's training set and model, before trusting what it says about a run.

    sd-train quality-check [--config configs/demo.yaml] [--samples 4] [--grid docs/demo_grid.png]
                           [--grid-step 1000] [key=value ...]

Three checks, each printed with its prompt accuracy, 95% interval and fidelity distance:
- **chance**: the model folder's UNet with fresh random weights (`--init-seed`), sampled like a
  run's evaluation: its samples carry nothing of the prompt, so it must score near 1/C (C captions);
- **VAE round trip**: the training images themselves, encoded and decoded by the folder's VAE (the
  blur every sample goes through): must score near 1;
- **grid** (with `--grid`): a sample grid PNG (the run's `samples/step_*_{raw,ema}.png`), cut into
  its cells, each scored against the prompt of `eval.prompts` it was drawn for.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from sd_train.config import ConfigError, TrainConfig, load_config
from sd_train.evaluation import build_quality
from sd_train.model.parts import SDParts, decode_latents, encode_pixels, load_sd_parts
from sd_train.parallel.process_group import DistInfo
from sd_train.sample_quality import SampleQuality, read_reference

GRID_COLS = 4  # sd_train.evaluation.grid_image: four cells per row


def random_unet_figures(cfg: TrainConfig, parts: SDParts, samples: int, init_seed: int) -> dict:
    """The instrument on a UNet of the folder's architecture with fresh random weights."""
    torch.manual_seed(init_seed)
    parts.unet = UNet2DConditionModel.from_config(parts.unet.config)
    probe = build_quality(cfg, parts, _one_process(), samples)
    return probe.score(parts.unet)


def vae_round_trip_figures(cfg: TrainConfig, parts: SDParts) -> dict:
    """The training images through the VAE (posterior mean, then the decoder), one per caption."""
    captions, reference = read_reference(cfg)
    pixels = torch.from_numpy(reference).permute(0, 3, 1, 2)
    images = decode_latents(parts, encode_pixels(parts, pixels, torch.device("cpu"), sample=False))
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return SampleQuality(captions, reference).score_images(images)


def grid_cells(path: Path, count: int) -> np.ndarray:
    """The first `count` cells of a sample grid PNG (GRID_COLS per row, square cells), uint8 [N, s, s, 3]."""
    grid = np.asarray(Image.open(path).convert("RGB"))
    size = grid.shape[1] // min(count, GRID_COLS)
    return np.stack([grid[(i // GRID_COLS) * size :][:size, (i % GRID_COLS) * size :][:, :size] for i in range(count)])


def grid_figures(cfg: TrainConfig, path: Path) -> dict:
    """A grid drawn for `eval.prompts`, each cell scored against the training image its prompt names."""
    captions, reference = read_reference(cfg)
    unknown = [p for p in cfg.eval.prompts if p not in captions]
    if unknown:
        raise ConfigError(f"eval.prompts {unknown} name no training caption; the grid check needs captions of the set")
    cells = grid_cells(path, len(cfg.eval.prompts))
    labels = torch.tensor([captions.index(p) for p in cfg.eval.prompts])
    return SampleQuality(captions, reference).score_images(cells, labels)


def _one_process() -> DistInfo:
    return DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None)


def _line(name: str, s: dict) -> str:
    lo, hi = s["accuracy_95"]
    misses = "; ".join(f"{k} -> {', '.join(f'{o} x{n}' for o, n in v.items())}" for k, v in s["misses"].items())
    return (
        f"{name:<16} accuracy {s['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] of {s['samples']:>4}  "
        f"fidelity {s['fidelity']:.4f}" + (f"  misses: {misses}" if misses else "")
    )


def main_quality_check(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="sd-train quality-check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="configs/demo.yaml", help="its model folder, training set and eval settings")
    p.add_argument("--samples", type=int, default=4, help="samples per caption for the chance check")
    p.add_argument("--init-seed", type=int, default=0, help="seed of the random UNet weights")
    p.add_argument("--grid", default=None, help="a sample grid PNG drawn for the config's eval.prompts")
    p.add_argument("--out", default=None, help="also write the figures here as JSON")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    ns = p.parse_args(argv)
    try:
        cfg = load_config(ns.config, list(ns.overrides))
        cfg.validate(1)
        read_reference(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    parts = load_sd_parts(cfg.model, torch.device("cpu"), cfg.seed)
    parts.load("vae", "text_encoder")
    figures = {"vae_round_trip": vae_round_trip_figures(cfg, parts)}
    if ns.grid:
        figures["grid"] = grid_figures(cfg, Path(ns.grid))
    figures["chance"] = random_unet_figures(cfg, parts, ns.samples, ns.init_seed)
    chance = 1.0 / len(read_reference(cfg)[0])
    for name in ("chance", "vae_round_trip", "grid"):
        if name in figures:
            print(_line(name, figures[name]))
    print(f"(chance level 1/{round(1 / chance)} = {chance:.4f})")
    if ns.out:
        Path(ns.out).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main_quality_check(sys.argv[1:]))
