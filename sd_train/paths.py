"""The on-disk layout that preflight, the checkpointer and the exporter share. Torch-free, so the
startup checks can look at checkpoint and model folders without importing torch.

Checkpoints: `<output_dir>/checkpoints/step_00000100/`, first written as `.step_00000100.partial`
and renamed once complete (see sd_train.checkpoint). Models: a local diffusers Stable Diffusion
folder with the subfolders in MODEL_SUBFOLDERS.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from sd_train.errors import ConfigError

MODEL_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
STEP_RE = re.compile(r"^step_(\d{8})$")
PARTIAL_PREFIX = "."
PARTIAL_SUFFIX = ".partial"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def partial_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{PARTIAL_PREFIX}step_{step:08d}{PARTIAL_SUFFIX}"


def partial_step(name: str) -> Optional[int]:
    """The step of a partial folder's name (`.step_00000100.partial` -> 100), else None."""
    m = re.search(r"step_(\d{8})", name) if name.endswith(PARTIAL_SUFFIX) else None
    return int(m.group(1)) if m else None


def checkpoint_is_complete(folder: Path) -> bool:
    """A step folder that a resume may use: trainer_state.json plus the tensor part, DCP's
    `.metadata` (FSDP2/DDP, written last by DCP's coordinator) or `zero/` (DeepSpeed). Our writes
    make a folder with a final name complete by construction (see sd_train.checkpoint); this
    check guards against folders damaged or assembled by hand."""
    folder = Path(folder)
    return (folder / "trainer_state.json").is_file() and (
        (folder / ".metadata").is_file() or (folder / "zero").is_dir()
    )


def incompatibility(folder: Path, saved_state: dict, fmt: str, world_size: int) -> Optional[str]:
    """Why a run of checkpoint format `fmt` ("dcp": FSDP2/DDP, "zero": DeepSpeed) on `world_size`
    ranks cannot resume from `folder` (whose trainer_state.json is `saved_state`), or None: written
    by the other backend, or by DeepSpeed on another world size."""
    saved = saved_state.get("format", "dcp")
    if saved != fmt:
        how = {"dcp": "dist.strategy=fsdp2 (or ddp)", "zero": "dist.strategy=deepspeed"}
        return (
            f"{folder} was written with {how.get(saved, saved)} but this run uses {how[fmt]}: resume it with "
            f"{how.get(saved, saved)}, or export it (`sd-train export --checkpoint {folder} --weights raw`) and "
            "start a new run from the export with model.pretrained_path"
        )
    saved_world = int(saved_state["world_size"])
    if fmt == "zero" and saved_world != world_size:
        return (
            f"{folder} holds DeepSpeed ZeRO partitions of {saved_world} ranks and this run has {world_size}: DeepSpeed "
            f"checkpoints resume on the same world size. Relaunch with {saved_world} processes, or export it "
            f"(`sd-train export --checkpoint {folder}`) and start a new run from the export with "
            "model.pretrained_path. "
            "FSDP2 checkpoints (dist.strategy=fsdp2) reshard to any world size"
        )
    return None


def complete_steps(root: Path) -> list[int]:
    """Steps with a complete checkpoint folder, oldest first."""
    if not Path(root).is_dir():
        return []
    steps = []
    for entry in Path(root).iterdir():
        m = STEP_RE.match(entry.name)
        if m and checkpoint_is_complete(entry):
            steps.append(int(m.group(1)))
    return sorted(steps)


# An export (`sd-train export`, the end-of-run export, `sd-train posthoc`): a diffusers pipeline folder
# plus EXPORT_MARKER, written last. Only a folder with the marker is ever replaced by another export.
EXPORT_MARKER = "sd_train_export.json"


def is_export(folder: Path) -> bool:
    return (Path(folder) / EXPORT_MARKER).is_file()


def check_model_folder(path: str) -> None:
    """Raise ConfigError (naming model.pretrained_path) unless `path` is a diffusers Stable
    Diffusion folder: an existing folder with every one of MODEL_SUBFOLDERS."""
    if not Path(path).is_dir():
        raise ConfigError(
            f"model.pretrained_path={path!r}: no such folder. Run `make tiny-sd` for the "
            "demo model, or point it at a local diffusers Stable Diffusion folder"
        )
    missing = [s for s in MODEL_SUBFOLDERS if not (Path(path) / s).is_dir()]
    if missing:
        raise ConfigError(
            f"model.pretrained_path={path!r} lacks {missing}: it must be a diffusers Stable Diffusion folder "
            "(unet/ vae/ text_encoder/ tokenizer/ scheduler/). Run `make tiny-sd` for the demo model"
        )


# Post-hoc EMA snapshots: `<output_dir>/posthoc/step_00000100/` (DCP's `.metadata` and `__R_0.distcp`,
# plus SNAPSHOT_META written last), first written under the partial name like a checkpoint.
POSTHOC_DIR = "posthoc"
SNAPSHOT_META = "snapshot.json"


def snapshot_is_complete(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / SNAPSHOT_META).is_file() and (folder / ".metadata").is_file()


def snapshot_steps(root: Path) -> list[int]:
    """Steps with a complete post-hoc snapshot under `root` (`<output_dir>/posthoc`), oldest first."""
    if not Path(root).is_dir():
        return []
    found = (STEP_RE.match(e.name) for e in Path(root).iterdir())
    return sorted(int(m.group(1)) for m in found if m and snapshot_is_complete(Path(root) / m.group(0)))
