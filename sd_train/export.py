"""Export a trained UNet (raw or EMA) with the frozen parts as a diffusers pipeline folder that
`StableDiffusionPipeline.from_pretrained(folder)` loads offline.

Two ways in: at the end of training (the shards are gathered one parameter at a time, a collective)
and `sd-train export --checkpoint DIR`, which reads a per-rank checkpoint into a plain module in one
process, with no process group, whatever world size wrote it (DCP for FSDP2/DDP; DeepSpeed's
zero_to_fp32 plus our per-rank EMA pieces for DeepSpeed).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Callable

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from sd_train import dcp_io
from sd_train.checksums import verify
from sd_train.errors import OutputRefusedError
from sd_train.folders import refusal, write_then_replace
from sd_train.parallel.deepspeed import offline_state
from sd_train.paths import EXPORT_MARKER, check_model_folder, checkpoint_is_complete, is_export


def save_pipeline(model_path: str, unet_state: dict[str, torch.Tensor], out_dir: Path, prediction_type: str) -> Path:
    """Write `out_dir` as a diffusers SD folder: the given UNet weights + the frozen parts of
    `model_path` (VAE, text encoder, tokenizer, scheduler). An existing `out_dir` is replaced only
    if it is an earlier export (EXPORT_MARKER) or empty, and only once the new one is complete
    (sd_train.folders.replace_folder): anything else there is refused before any work is done."""
    out_dir = Path(out_dir)
    check_export_target(out_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_model_folder(model_path)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model_path, subfolder="unet"))
    missing, unexpected = unet.load_state_dict(unet_state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"export: UNet weights do not match the model config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    pipe = StableDiffusionPipeline.from_pretrained(
        model_path, unet=unet, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.scheduler.register_to_config(prediction_type=prediction_type)

    def write(folder: Path) -> None:
        pipe.save_pretrained(folder)
        marker = {"written_by": "sd-train", "base_model": str(model_path)}
        (folder / EXPORT_MARKER).write_text(json.dumps(marker, indent=1))  # last: the folder is complete

    # Every file of an earlier export is ours: nothing is carried over.
    write_then_replace(out_dir, write, ours=lambda name: True, check=check_export_target)
    return out_dir


def check_export_target(out_dir: Path) -> None:
    """Raise OutputRefusedError unless `out_dir` is missing, empty or an earlier export."""
    if is_export(out_dir):
        return
    problem = refusal(
        out_dir,
        f"an earlier export (no {EXPORT_MARKER})",
        "export into a new or empty folder (an export replaces only an earlier export)",
    )
    if problem is not None:
        raise OutputRefusedError(problem)


def export_from_training(
    gather_model: Callable[[], dict],
    ema,
    model_path: str,
    out_root: Path,
    prediction_type: str,
    is_main: bool,
    before_write: Callable[[], None] = lambda: None,
) -> list[Path]:
    """Gather and export the raw UNet and (if the window opened) the EMA UNet. Collective.
    `gather_model` returns the full raw state on the main process (`Strategy.full_model_state`).

    Every gather comes first, and only the main process keeps the host copies; the files are
    written after that, with no collective pending. A write that takes longer than the collective
    timeout (multi-GB pipelines on a slow file system) then cannot kill the job at its last step, as
    it did when the other ranks waited in the EMA gather while the main process wrote the raw UNet."""
    raw = gather_model()
    full = ema.full_tensors(keep=is_main) if ema.is_open else {}
    if not is_main:
        return []
    before_write()
    written = [save_pipeline(model_path, raw, out_root / "raw", prediction_type)]
    del raw
    if ema.is_open:
        written.append(save_pipeline(model_path, full, out_root / "ema", prediction_type))
    return written


def load_checkpoint_unet(checkpoint: Path, weights: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read one UNet's weights (`raw` or `ema`) from a DCP checkpoint into plain tensors, in one
    process. Returns (trainer_state, state_dict)."""
    checkpoint = Path(checkpoint)
    if not checkpoint_is_complete(checkpoint):
        raise FileNotFoundError(
            f"{checkpoint} is not a complete checkpoint (no trainer_state.json, or no .metadata / zero/)"
        )
    with open(checkpoint / "trainer_state.json") as f:
        trainer_state = json.load(f)
    problem = verify(checkpoint, int(trainer_state["world_size"]))  # every byte as written, before any is read
    if problem is not None:
        raise ValueError(f"{checkpoint} is damaged: {problem}. Export an earlier checkpoint")
    if weights == "ema" and not trainer_state["ema"]["open"]:
        raise ValueError(
            f"{checkpoint}: the EMA window had not opened at step {trainer_state['step']}; export --weights raw instead"
        )
    if trainer_state.get("format") == "zero":
        return trainer_state, offline_state(checkpoint, weights)
    model_path = trainer_state["config"]["model"]["pretrained_path"]
    config = UNet2DConditionModel.load_config(model_path, subfolder="unet")
    template = UNet2DConditionModel.from_config(config).state_dict()
    prefix = "model" if weights == "raw" else "ema"
    names = (
        template.keys()
        if weights == "raw"
        else [n for n, p in UNet2DConditionModel.from_config(config).named_parameters()]
    )
    state = {prefix: {n: torch.empty_like(template[n]) for n in names}}
    dcp_io.load(state, checkpoint, no_dist=True)
    return trainer_state, state[prefix]


def main_export(argv: list[str]) -> int:
    """`sd-train export --checkpoint DIR --out DIR [--weights ema|raw]`."""
    p = argparse.ArgumentParser(prog="sd-train export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a complete step folder, e.g. runs/x/checkpoints/step_00001000")
    p.add_argument("--out", required=True, help="the pipeline folder to write")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema")
    p.add_argument(
        "--model-path", default=None, help="frozen parts from here instead of the run's model.pretrained_path"
    )
    ns = p.parse_args(argv)
    trainer_state, unet_state = load_checkpoint_unet(Path(ns.checkpoint), ns.weights)
    cfg = trainer_state["config"]
    out = save_pipeline(
        ns.model_path or cfg["model"]["pretrained_path"], unet_state, Path(ns.out), cfg["objective"]["prediction_type"]
    )
    print(f"exported {ns.weights} UNet of step {trainer_state['step']} to {out}")
    return 0
