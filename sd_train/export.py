"""Export a trained UNet (raw or EMA) with the frozen parts as a diffusers pipeline folder that
`StableDiffusionPipeline.from_pretrained(folder)` (SDXL: `StableDiffusionXLPipeline`, with both
text encoders and tokenizers) loads offline.

Both ways in read a checkpoint into a plain module in one process, with no process group, whatever
world size wrote it (DCP for FSDP2/DDP; DeepSpeed's zero_to_fp32 plus our per-rank EMA pieces for
DeepSpeed): `sd-train export --checkpoint DIR`, and the end of training, where the main process
exports the final checkpoint once the process group is gone and the training state is freed
(`export_checkpoint`). One UNet is held at a time: the weights are read into tensors the pipeline's
UNet then takes as its own (no second copy), written, and dropped before the EMA is read. Gathering
the raw UNet and the EMA on the main process at the last step held both there on top of its training
state (SD2 at 2 CPU ranks: killed for memory); and no file is written while a collective is pending.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from torch.distributed.checkpoint.api import CheckpointException

from sd_train import dcp_io
from sd_train.checksums import verify
from sd_train.errors import CheckpointLoadError, OutputRefusedError, UsageError
from sd_train.folders import refusal, write_then_replace
from sd_train.model.family import model_family
from sd_train.parallel.deepspeed import offline_state
from sd_train.parallel.fsdp import describe_dcp_load_error
from sd_train.paths import (
    EXPORT_MARKER,
    MODEL_SUBFOLDERS,
    PARTIAL_SUFFIX,
    STEP_RE,
    checkpoint_is_complete,
    complete_steps,
    is_export,
    step_dir,
)


def build_pipeline(
    model_path: str, unet: UNet2DConditionModel, prediction_type: str, zero_dropped_captions: bool = False
) -> DiffusionPipeline:
    """The diffusers pipeline of `model_path`'s family around `unet`. SDXL's
    `force_zeros_for_empty_prompt` is set to how the run replaced dropped captions (zeros, or the
    empty caption's embeddings), so diffusers' unconditional branch is the one the UNet learnt.
    Raises ConfigError if `model_path` is not a model folder whose parts fit its family."""
    if model_family(model_path) == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(model_path, unet=unet)
        pipe.register_to_config(force_zeros_for_empty_prompt=zero_dropped_captions)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            model_path, unet=unet, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.scheduler.register_to_config(prediction_type=prediction_type)
    return pipe


def save_pipeline(
    model_path: str,
    unet_state: dict[str, torch.Tensor],
    out_dir: Path,
    prediction_type: str,
    zero_dropped_captions: bool = False,
) -> Path:
    """Write `out_dir` as a diffusers SD or SDXL folder: the given UNet weights + the frozen parts of
    `model_path` (VAE, text encoder(s), tokenizer(s), scheduler). An existing `out_dir` is replaced
    only if it is an earlier export (EXPORT_MARKER) or empty, and only once the new one is complete
    (sd_train.folders.replace_folder): anything else there is refused before any work is done."""
    out_dir = Path(out_dir)
    check_export_target(out_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_family(model_path)  # a missing or mixed-up folder is refused before anything loads
    with torch.device("meta"):  # no init: the UNet takes the given tensors as its parameters
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model_path, subfolder="unet"))
    missing, unexpected = unet.load_state_dict(unet_state, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(
            f"export: UNet weights do not match the model config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    pipe = build_pipeline(model_path, unet, prediction_type, zero_dropped_captions)

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


def export_checkpoint(
    checkpoint: Path,
    model_path: str,
    out_root: Path,
    prediction_type: str,
    before_write: Callable[[], None] = lambda: None,
    zero_dropped_captions: bool = False,
) -> list[Path]:
    """Export the raw UNet of a complete checkpoint to `out_root/raw` and, if its EMA window had
    opened, the EMA to `out_root/ema`, one UNet at a time. No process group needed (the end of
    training calls it on the main process after tearing the group down)."""
    trainer_state, raw = load_checkpoint_unet(checkpoint, "raw", model_path)
    before_write()
    written = [save_pipeline(model_path, raw, out_root / "raw", prediction_type, zero_dropped_captions)]
    del raw
    if trainer_state["ema"]["open"]:
        # The raw read has just verified every file of the folder: hashing the whole per-rank state
        # again (13.9 GB for SD2 base) would find nothing new.
        _, ema = load_checkpoint_unet(checkpoint, "ema", model_path, verified=True)
        written.append(save_pipeline(model_path, ema, out_root / "ema", prediction_type, zero_dropped_captions))
    return written


def read_trainer_state(checkpoint: Path, objective: bool = False) -> dict:
    """The trainer_state.json of a complete step folder, with what export reads checked (the
    objective's prediction type too with `objective`, for `sd-train export`, which takes it from
    there); CheckpointLoadError naming the file when it does not read."""
    try:
        with open(Path(checkpoint) / "trainer_state.json") as f:
            state = json.load(f)
        int(state["step"]), bool(state["ema"]["open"]), str(state["config"]["model"]["pretrained_path"])
        if objective:
            str(state["config"]["objective"]["prediction_type"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointLoadError(
            f"{Path(checkpoint) / 'trainer_state.json'} is unreadable ({type(e).__name__}: {e})"
        ) from e
    return state


def _is_model_folder(path: Path) -> bool:
    return all((path / sub).is_dir() for sub in MODEL_SUBFOLDERS)


def resolve_model_path(pretrained_path: str, checkpoint: Path, output_dir: str) -> str:
    """Where a run's `model.pretrained_path` is now. A relative one was relative to the directory
    the run was launched from, which the run itself tells: the checkpoint lies in `<launch
    dir>/<output_dir>/checkpoints/step_N`, with `output_dir` as the run's config wrote it. So the
    path is tried there first, wherever export runs from, then in the current directory.
    UsageError naming the places tried, and --model-path, when none holds the model folder."""
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
    raise UsageError(
        f"the run's model.pretrained_path={pretrained_path!r} (for the UNet config, VAE, text encoder and tokenizer) "
        f"holds no diffusers model folder at {', '.join(map(str, tried))}: the model folder moved? Point --model-path "
        "at a copy"
    )


def load_checkpoint_unet(
    checkpoint: Path, weights: str, model_path: Optional[str] = None, verified: bool = False
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read one UNet's weights (`raw` or `ema`) from a complete step folder into plain tensors, in
    one process. `model_path`: the model folder whose UNet config the weights fit (default: the
    run's, `resolve_model_path`); `verified`: the caller has just checked the folder's checksums
    (a second UNet read from it). Returns (trainer_state, state_dict). UsageError for what was asked
    that cannot be done, CheckpointLoadError for a checkpoint whose files do not read."""
    checkpoint = Path(checkpoint)
    if not checkpoint_is_complete(checkpoint):
        raise UsageError(f"{checkpoint} is not a complete checkpoint (no trainer_state.json, or no .metadata / zero/)")
    # Every byte as written before any is trusted: the manifests first, then what trainer_state says.
    try:
        saved_world = int(json.loads((checkpoint / "trainer_state.json").read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointLoadError(f"{checkpoint / 'trainer_state.json'} is unreadable ({type(e).__name__}: {e})") from e
    problem = None if verified else verify(checkpoint, saved_world)
    if problem is not None:
        raise UsageError(f"{checkpoint} is damaged: {problem}. Export an earlier checkpoint")
    trainer_state = read_trainer_state(checkpoint)
    if weights == "ema" and not trainer_state["ema"]["open"]:
        raise UsageError(
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
    with torch.device("meta"):  # shapes only: the weights are read into empty tensors below
        template = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model_path, subfolder="unet"))
    prefix = "model" if weights == "raw" else "ema"
    # The EMA covers the parameters (the SD UNet has no buffers, so both are its whole state).
    shapes = template.state_dict() if weights == "raw" else dict(template.named_parameters())
    state = {prefix: {n: torch.empty(t.shape, dtype=t.dtype) for n, t in shapes.items()}}
    try:
        dcp_io.load(state, checkpoint, no_dist=True)
    except dcp_io.UnsafeCheckpointError:
        raise  # a refusal of code in the checkpoint says so itself
    except (Exception, CheckpointException) as e:  # DCP raises CheckpointException (a BaseException)
        raise CheckpointLoadError(
            f"{checkpoint}: the {weights} UNet does not read ({describe_dcp_load_error(checkpoint, e)}); if the model "
            f"folder {model_path} is not the one the run trained, point --model-path at that one"
        ) from e
    return trainer_state, state[prefix]


def resolve_checkpoint(path: Path) -> tuple[Path, str]:
    """The step folder `--checkpoint PATH` names, and a line saying which: PATH itself when it is a
    complete step folder, else the newest complete step of PATH/checkpoints (PATH is a run's
    output_dir) or of PATH (its checkpoints/). Raises UsageError listing what is there."""
    path = Path(path)
    if not path.exists():
        raise UsageError(
            f"--checkpoint {path}: no such folder. Give a run's output_dir, its checkpoints/, or a step folder"
        )
    if STEP_RE.match(path.name):
        if checkpoint_is_complete(path):
            return path, f"step folder {path}"
        steps = complete_steps(path.parent)
        raise UsageError(
            f"--checkpoint {path} is not a complete checkpoint (no trainer_state.json, or no .metadata / zero/: "
            f"a save that did not finish). Complete steps beside it: {_names(steps)}"
        )
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = complete_steps(root)
    if not steps:
        partial = sorted(e.name for e in root.iterdir() if e.name.endswith(PARTIAL_SUFFIX)) if root.is_dir() else []
        raise UsageError(
            f"--checkpoint {path}: no complete checkpoint in {root}"
            + (f" (only unfinished saves: {', '.join(partial)})" if partial else "")
            + ". Give a run's output_dir, its checkpoints/, or a step folder step_NNNNNNNN"
        )
    newest = step_dir(root, steps[-1])
    return newest, f"the newest complete checkpoint of {root}: {newest.name} (of {_names(steps)})"


def _names(steps: list[int]) -> str:
    return ", ".join(f"step_{s:08d}" for s in steps) if steps else "none"


def main_export(argv: list[str]) -> int:
    """`sd-train export --checkpoint RUN_DIR|STEP_DIR --out DIR [--weights ema|raw]`. What was asked
    wrongly (no such folder, an EMA that never opened, a model folder that moved) raises UsageError,
    which `sd-train` prints as one line, exit 2; a checkpoint that does not read, or an output that
    cannot be written, is one line here, exit 1."""
    p = argparse.ArgumentParser(prog="sd-train export", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a run's output_dir or its checkpoints/ (the newest complete step is taken), or one step folder, "
        "e.g. runs/x/checkpoints/step_00001000",
    )
    p.add_argument("--out", required=True, help="the pipeline folder to write")
    p.add_argument(
        "--weights",
        choices=["ema", "raw"],
        default="ema",
        help="which UNet: ema (default; the EMA window must have opened by that step) or raw (the trained weights)",
    )
    p.add_argument(
        "--model-path",
        default=None,
        help="the model folder (UNet config and frozen parts) instead of the run's model.pretrained_path",
    )
    ns = p.parse_args(argv)
    if ns.model_path and not _is_model_folder(Path(ns.model_path)):
        raise UsageError(f"--model-path {ns.model_path}: not a diffusers model folder (unet/ vae/ text_encoder/ ...)")
    folder, which = resolve_checkpoint(Path(ns.checkpoint))
    print(f"exporting {ns.weights} weights from {which}")
    try:
        cfg = read_trainer_state(folder, objective=True)["config"]
        model_path = ns.model_path or resolve_model_path(
            cfg["model"]["pretrained_path"], folder, cfg.get("output_dir", "")
        )
        trainer_state, unet_state = load_checkpoint_unet(folder, ns.weights, model_path)
        objective = cfg["objective"]
        out = save_pipeline(
            model_path,
            unet_state,
            Path(ns.out),
            objective["prediction_type"],
            objective.get("zero_dropped_captions", False),  # absent in configs written before it existed
        )
    except CheckpointLoadError as e:
        print(f"sd-train export: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"sd-train export: writing {ns.out}: {e}", file=sys.stderr)
        return 1
    print(f"exported {ns.weights} UNet of step {trainer_state['step']} to {out}")
    return 0
