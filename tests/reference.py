"""Independent references for what a run logs: the held-out loss of an exported pipeline, scored in
this process by a plain (unwrapped, unsharded) UNet loaded from the exported folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sd_train.config import load_config
from sd_train.evaluation import Validator
from sd_train.model.parts import encode_text, load_sd_parts
from sd_train.objective import DiffusionObjective
from sd_train.parallel.process_group import DistInfo


def exported_val_loss(run_dir: Path, weights: str) -> float:
    """The run's own validation loss (same samples, timesteps and noise) of `export/<weights>`,
    computed by one process with no process group."""
    cfg = load_config(str(run_dir / "config.yaml"))
    cfg.model.pretrained_path = str(run_dir / "export" / weights)
    cfg.model.init_unet = "pretrained"
    device = torch.device("cpu")
    parts = load_sd_parts(cfg.model, device, cfg.seed)
    objective = DiffusionObjective(
        cfg.objective, parts.noise_scheduler.alphas_cumprod, encode_text(parts, [""], device)
    )
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device, mesh=None)
    return Validator(cfg, parts, objective, info).loss(parts.unet)


def logged_val_losses(run_dir: Path, step: int) -> dict[str, float]:
    """`val/loss_*` values the run logged at `step`."""
    out: dict[str, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("step") == step:
            out.update({k: v for k, v in row.items() if k.startswith("val/")})
    return out


def assert_logged_val_matches_export(run_dir: Path, step: int, rel: float = 1e-6) -> dict[str, float]:
    """The logged raw and EMA validation losses at the last step equal the exported pipelines'
    scored independently, to `rel` (the ranks sum their shares in another order than one process)."""
    logged = logged_val_losses(run_dir, step)
    assert {"val/loss_raw", "val/loss_ema"} <= logged.keys(), logged
    figures = {}
    for weights in ("raw", "ema"):
        ref = exported_val_loss(run_dir, weights)
        got = logged[f"val/loss_{weights}"]
        figures[weights] = (got, ref)
        assert abs(got - ref) <= rel * abs(ref), f"logged val/loss_{weights}={got!r}, exported {weights} scores {ref!r}"
    assert figures["raw"][1] != figures["ema"][1], "raw and EMA must differ, or the comparison shows nothing"
    return figures
