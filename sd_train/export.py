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
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from torch.distributed.checkpoint.api import CheckpointException

from sd_train.errors import CheckpointLoadError, ConfigError
from sd_train.parallel.deepspeed import offline_state
from sd_train.parallel.fsdp import describe_dcp_load_error
from sd_train.paths import MODEL_SUBFOLDERS, check_model_folder, checkpoint_is_complete


def save_pipeline(model_path: str, unet_state: dict[str, torch.Tensor], out_dir: Path, prediction_type: str) -> Path:
    """Write `out_dir` as a diffusers SD folder: the given UNet weights + the frozen parts of
    `model_path` (VAE, text encoder, tokenizer, scheduler)."""
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
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


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


def read_trainer_state(checkpoint: Path) -> dict:
    """The trainer_state.json of a complete step folder, with what export reads checked. ConfigError
    (naming --checkpoint) for a folder that is not one; CheckpointLoadError for an unreadable file."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise ConfigError(
            f"--checkpoint {checkpoint}: no such folder. Give a step folder, e.g. RUN/checkpoints/step_00001000"
        )
    if not checkpoint_is_complete(checkpoint):
        raise ConfigError(
            f"--checkpoint {checkpoint} is not a complete checkpoint (no trainer_state.json, or no .metadata / zero/): "
            "give a step folder, e.g. RUN/checkpoints/step_00001000"
        )
    try:
        with open(checkpoint / "trainer_state.json") as f:
            state = json.load(f)
        int(state["step"]), bool(state["ema"]["open"])
        str(state["config"]["model"]["pretrained_path"]), str(state["config"]["objective"]["prediction_type"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointLoadError(f"{checkpoint / 'trainer_state.json'} is unreadable ({type(e).__name__}: {e})") from e
    return state


def _is_model_folder(path: Path) -> bool:
    return all((path / sub).is_dir() for sub in MODEL_SUBFOLDERS)


def resolve_model_path(pretrained_path: str, checkpoint: Path, output_dir: str) -> str:
    """Where a run's `model.pretrained_path` is now. A relative one was relative to the directory
    the run was launched from, which the run itself tells: the checkpoint lies in `<launch
    dir>/<output_dir>/checkpoints/step_N`, with `output_dir` as the run's config wrote it. So the
    path is tried there first, wherever export runs from, then in the current directory.
    ConfigError naming the places tried, and --model-path, when none holds the model folder."""
    if Path(pretrained_path).is_absolute():
        tried = [Path(pretrained_path)]
    else:
        run, out = Path(checkpoint).resolve().parent.parent, Path(output_dir)
        launch = []
        if output_dir and not out.is_absolute() and ".." not in out.parts and run.parts[-len(out.parts) :] == out.parts:
            launch = [Path(*run.parts[: -len(out.parts)]) / pretrained_path]
        tried = list(dict.fromkeys([*launch, Path.cwd() / pretrained_path]))
    for path in tried:
        if _is_model_folder(path):
            return str(path)
    raise ConfigError(
        f"the run's model.pretrained_path={pretrained_path!r} holds no diffusers Stable Diffusion folder (unet/ vae/ "
        f"text_encoder/ tokenizer/ scheduler/) at {', '.join(map(str, tried))}: the model folder moved? Pass it as "
        "--model-path"
    )


def load_checkpoint_unet(
    checkpoint: Path, weights: str, model_path: Optional[str] = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read one UNet's weights (`raw` or `ema`) from a checkpoint into plain tensors, in one
    process. `model_path`: the model folder whose UNet config the weights fit (default: the run's,
    `resolve_model_path`). Returns (trainer_state, state_dict). ConfigError for what the user asked
    that cannot be done, CheckpointLoadError for a checkpoint whose tensors do not read."""
    checkpoint = Path(checkpoint)
    trainer_state = read_trainer_state(checkpoint)
    if weights == "ema" and not trainer_state["ema"]["open"]:
        raise ConfigError(
            f"{checkpoint}: the EMA window had not opened at step {trainer_state['step']}; export --weights raw instead"
        )
    try:
        if trainer_state.get("format") == "zero":
            return trainer_state, offline_state(checkpoint, weights)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointLoadError(f"{checkpoint}: the DeepSpeed files do not read ({type(e).__name__}: {e})") from e
    cfg = trainer_state["config"]
    model_path = model_path or resolve_model_path(
        cfg["model"]["pretrained_path"], checkpoint, cfg.get("output_dir", "")
    )
    config = UNet2DConditionModel.load_config(model_path, subfolder="unet")
    template = UNet2DConditionModel.from_config(config).state_dict()
    prefix = "model" if weights == "raw" else "ema"
    names = (
        template.keys()
        if weights == "raw"
        else [n for n, p in UNet2DConditionModel.from_config(config).named_parameters()]
    )
    state = {prefix: {n: torch.empty_like(template[n]) for n in names}}
    try:
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    except (Exception, CheckpointException) as e:  # DCP raises CheckpointException (a BaseException)
        raise CheckpointLoadError(
            f"{checkpoint}: the {weights} UNet does not read ({describe_dcp_load_error(checkpoint, e)}); if the model "
            f"folder {model_path} is not the one the run trained, pass the right one as --model-path"
        ) from e
    return trainer_state, state[prefix]


def main_export(argv: list[str]) -> int:
    """`sd-train export --checkpoint DIR --out DIR [--weights ema|raw]`. Exit 2 for what was asked
    wrongly (a missing folder, an EMA that never opened, a model folder that moved), 1 for a
    checkpoint that does not read or an output that cannot be written; each with one line on stderr."""
    p = argparse.ArgumentParser(prog="sd-train export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a complete step folder, e.g. runs/x/checkpoints/step_00001000")
    p.add_argument("--out", required=True, help="the pipeline folder to write")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema")
    p.add_argument(
        "--model-path",
        default=None,
        help="the model folder (UNet config and frozen parts) instead of the run's model.pretrained_path",
    )
    ns = p.parse_args(argv)
    try:
        if ns.model_path:
            try:
                check_model_folder(ns.model_path)
            except ConfigError as e:
                raise ConfigError(f"--model-path: {e}") from e
        checkpoint = Path(ns.checkpoint)
        cfg = read_trainer_state(checkpoint)["config"]
        model_path = ns.model_path or resolve_model_path(
            cfg["model"]["pretrained_path"], checkpoint, cfg.get("output_dir", "")
        )
        trainer_state, unet_state = load_checkpoint_unet(checkpoint, ns.weights, model_path)
        out = save_pipeline(model_path, unet_state, Path(ns.out), cfg["objective"]["prediction_type"])
    except ConfigError as e:
        print(f"sd-train export: {e}", file=sys.stderr)
        return 2
    except CheckpointLoadError as e:
        print(f"sd-train export: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"sd-train export: writing {ns.out}: {e}", file=sys.stderr)
        return 1
    print(f"exported {ns.weights} UNet of step {trainer_state['step']} to {out}")
    return 0
