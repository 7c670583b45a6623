"""Output folders are replaced, never lost: `replace_folder` keeps a complete folder in place at every
instant (with and without the file system's atomic exchange, and across a crash between its
renames), and an export replaces only an earlier export, refusing anything else by name; an export
of a crafted checkpoint runs no code from it."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from sd_train import folders
from sd_train.checksums import complete_manifest
from sd_train.errors import OutputRefusedError
from sd_train.export import main_export, save_pipeline
from sd_train.folders import aside_name, replace_folder
from sd_train.paths import EXPORT_MARKER


def _folder(path: Path, version: str) -> Path:
    path.mkdir(parents=True)
    (path / "weights.bin").write_text(version)
    (path / "sub").mkdir()
    (path / "sub" / "config.json").write_text(version)
    return path


def _version(path: Path) -> str:
    """The version a complete folder holds; raises if the folder is missing or half there."""
    a, b = (path / "weights.bin").read_text(), (path / "sub" / "config.json").read_text()
    assert a == b, f"{path} is a mix of two folders"
    return a


@pytest.mark.parametrize("atomic_exchange", [True, False])
def test_the_old_folder_is_deleted_only_once_the_new_one_is_in_place(tmp_path, monkeypatch, atomic_exchange):
    """Whatever deletes a folder runs only when `final` already holds the new complete folder."""
    if not atomic_exchange:
        monkeypatch.setattr(folders, "_RENAMEAT2", None)  # NFS, macOS: the rename-aside path
    final = _folder(tmp_path / "export", "old")
    new = _folder(tmp_path / ".export.partial", "new")
    seen = []
    real_rmtree = shutil.rmtree

    def watching_rmtree(path, *args, **kwargs):
        seen.append(_version(final))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", watching_rmtree)
    replace_folder(new, final)
    assert seen == ["new"], "the old folder went only after the new one was in place"
    assert _version(final) == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_crash_between_the_renames_leaves_the_old_folder_complete_and_is_repaired(tmp_path, monkeypatch):
    monkeypatch.setattr(folders, "_RENAMEAT2", None)
    final = _folder(tmp_path / "export", "old")
    new = _folder(tmp_path / ".export.partial", "new")
    real_rename, calls = folders.os.rename, []

    def crash_on_second(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        real_rename(src, dst)

    monkeypatch.setattr(folders.os, "rename", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        replace_folder(new, final)
    monkeypatch.setattr(folders.os, "rename", real_rename)
    assert not final.exists() and _version(aside_name(final)) == "old", "the complete old folder is aside"
    newer = _folder(tmp_path / ".export.partial2", "newer")
    replace_folder(newer, final)  # the next replacement puts the old one back first, then replaces it
    assert _version(final) == "newer" and not aside_name(final).exists()


def test_export_refuses_a_folder_that_is_not_an_export_and_replaces_an_earlier_one(tiny_assets, tmp_path):
    """`--out runs/demo` (a run folder) is refused naming what is there, before any work; an earlier
    export is replaced by the new one, which diffusers loads, and carries the marker."""
    from diffusers import UNet2DConditionModel

    model = str(tiny_assets["model"])
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    run = tmp_path / "runs" / "demo"
    (run / "checkpoints" / "step_00000016").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    base = shutil.copytree(tiny_assets["model"], tmp_path / "base-model")
    for target in (run, base):  # a run's folder, a base model (a diffusers folder, but not an export)
        with pytest.raises(OutputRefusedError, match=r"is not an earlier export .*it holds .*refusing to replace"):
            save_pipeline(model, state, target, "epsilon")
    with pytest.raises(OutputRefusedError, match=r"it holds checkpoints/, metrics.jsonl"):
        save_pipeline(model, state, run, "epsilon")
    assert (run / "metrics.jsonl").read_text() == "{}\n" and (run / "checkpoints" / "step_00000016").is_dir()

    out = tmp_path / "export" / "ema"
    save_pipeline(model, state, out, "epsilon")
    assert json.loads((out / EXPORT_MARKER).read_text())["written_by"] == "sd-train"
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    save_pipeline(model, changed, out, "epsilon")
    got = UNet2DConditionModel.from_pretrained(out, subfolder="unet").state_dict()
    assert all(torch.equal(got[k], changed[k]) for k in changed)
    assert sorted(p.name for p in out.parent.iterdir()) == ["ema"], "no partial or aside folder left"


class _WritesAFile:
    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_export_of_a_crafted_checkpoint_is_refused_and_runs_nothing(tiny_assets, tmp_path):
    """`sd-train export --checkpoint` of a step folder whose .metadata pickle would write a file."""
    step = tmp_path / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    config = {"model": {"pretrained_path": str(tiny_assets["model"])}, "objective": {"prediction_type": "epsilon"}}
    state = {"step": 4, "world_size": 1, "format": "dcp", "ema": {"open": False}, "config": config}
    (step / "trainer_state.json").write_text(json.dumps(state))
    pwned = tmp_path / "pwned"
    (step / ".metadata").write_bytes(pickle.dumps(_WritesAFile(pwned)))
    complete_manifest(step, 0)  # whoever crafted it wrote a matching checksum manifest too
    with pytest.raises(Exception, match="names io.open, which is not part of DCP's metadata"):
        main_export(["--checkpoint", str(step), "--out", str(tmp_path / "out"), "--weights", "raw"])
    assert not pwned.exists() and not (tmp_path / "out").exists()
