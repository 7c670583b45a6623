"""Independent references for what a run logs: the held-out loss of an exported pipeline, scored in
this process by a plain (unwrapped, unsharded) UNet loaded from the exported folder."""

from __future__ import annotations

import json
from pathlib import Path

from sd_train.tools.posthoc_eval import score_folders


def exported_val_loss(run_dir: Path, weights: str) -> float:
    """The run's own validation loss (same samples, timesteps and noise) of `export/<weights>`,
    computed by a plain UNet loaded from the exported folder, in one process with no process group."""
    return score_folders(run_dir, {weights: run_dir / "export" / weights})[weights]["loss"]


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
