"""`sd-train export` on a small crafted run, in this process: each user error is one line on stderr
with an exit status (2 for what was asked wrongly, 1 for a checkpoint that does not read), never a
traceback; a relative model.pretrained_path is found from the run's own location, wherever export
runs from; and the hub is offline before anything could call it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

from sd_train import cli
from sd_train.checksums import complete_manifest, manifest_path
from tests.support.launch import REPO


@pytest.fixture()
def run(tiny_assets, tmp_path):
    """A launch folder with the model at a relative path `models/tiny-sd`, and a run there whose
    config says `output_dir: runs/r`, with one DCP checkpoint of the model's own UNet (raw only: the
    EMA window never opened)."""
    from diffusers import UNet2DConditionModel

    launch = tmp_path / "launch"
    shutil.copytree(tiny_assets["model"], launch / "models" / "tiny-sd")
    step = launch / "runs" / "r" / "checkpoints" / "step_00000003"
    unet = UNet2DConditionModel.from_pretrained(launch / "models" / "tiny-sd", subfolder="unet")
    dcp.save({"model": unet.state_dict()}, checkpoint_id=str(step), no_dist=True)
    config = {
        "output_dir": "runs/r",
        "model": {"pretrained_path": "models/tiny-sd"},
        "objective": {"prediction_type": "epsilon"},
    }
    state = {"step": 3, "world_size": 1, "format": "dcp", "ema": {"open": False}, "config": config}
    (step / "trainer_state.json").write_text(json.dumps(state))
    complete_manifest(step, 0)  # as a save writes it
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return launch, step, elsewhere, unet.state_dict()


def export(capsys, *args: str) -> tuple[int, str]:
    rc = cli.main(["export", *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err.strip()


def test_export_finds_the_runs_relative_model_and_refuses_user_errors_cleanly(run, capsys, monkeypatch, tmp_path):
    from diffusers import UNet2DConditionModel

    launch, step, elsewhere, weights = run
    monkeypatch.chdir(elsewhere)  # not the launch folder: models/tiny-sd is not here
    out = tmp_path / "pipe"
    rc, err = export(capsys, "--checkpoint", str(step), "--out", str(out), "--weights", "raw")
    assert rc == 0, err
    exported = UNet2DConditionModel.from_pretrained(out, subfolder="unet").state_dict()
    assert all(torch.equal(weights[n], t) for n, t in exported.items())

    unfinished = step.parent / "step_00000006"
    unfinished.mkdir()  # a save that did not finish
    cases = [
        (["--checkpoint", str(step.parent / "step_00000009")], 2, "no such folder. Give a run's output_dir"),
        (["--checkpoint", str(unfinished)], 2, "is not a complete checkpoint"),
        (["--checkpoint", str(step), "--weights", "ema"], 2, "the EMA window had not opened at step 3"),
        (["--checkpoint", str(step), "--model-path", str(elsewhere)], 2, "not a diffusers model folder"),
    ]
    for args, want_rc, message in cases:
        rc, err = export(capsys, *args, "--out", str(tmp_path / "x"))
        assert (rc, err.count("\n")) == (want_rc, 0) and message in err, (args, rc, err)

    shutil.move(launch / "models", tmp_path / "moved")  # the model folder moved: tried where, and the fix
    rc, err = export(capsys, "--checkpoint", str(step), "--out", str(tmp_path / "x"), "--weights", "raw")
    assert rc == 2 and str(launch / "models" / "tiny-sd") in err and "Point --model-path at a copy" in err, err
    moved = str(tmp_path / "moved" / "tiny-sd")
    rc, err = export(
        capsys, "--checkpoint", str(step), "--out", str(tmp_path / "y"), "--weights", "raw", "--model-path", moved
    )
    assert rc == 0, err

    shard = next(step.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    rc, err = export(
        capsys, "--checkpoint", str(step), "--out", str(tmp_path / "z"), "--weights", "raw", "--model-path", moved
    )
    assert rc == 2 and "is damaged" in err and shard.name in err, err  # the checksums see it first
    manifest_path(step, 0).unlink()
    complete_manifest(step, 0)  # a manifest that agrees (the save itself wrote it short): DCP names the file
    rc, err = export(
        capsys, "--checkpoint", str(step), "--out", str(tmp_path / "z"), "--weights", "raw", "--model-path", moved
    )
    assert rc == 1 and "truncated or missing shard file(s)" in err and shard.name in err, err
    (step / "trainer_state.json").write_text('{"step": 3}')
    rc, err = export(capsys, "--checkpoint", str(step), "--out", str(tmp_path / "z"))
    assert rc == 1 and "trainer_state.json is unreadable (KeyError" in err, err


def test_the_hub_is_offline_before_any_command_imports_it(tmp_path, monkeypatch):
    """huggingface_hub reads HF_HUB_OFFLINE once, at import: `sd-train` sets it before importing a
    command (here a stand-in that records what it saw at import), and imports nothing that imports
    huggingface_hub before (checked in a fresh interpreter); an explicit setting is kept."""
    from sd_train import cli

    (tmp_path / "probe_command.py").write_text(
        "import os\nSEEN = os.environ.get('HF_HUB_OFFLINE')\ndef main(argv):\n    return 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setitem(cli.COMMANDS, "probe", ("probe_command", "main", "records HF_HUB_OFFLINE at import"))
    assert cli.main(["probe"]) == 0
    assert sys.modules["probe_command"].SEEN == "1"
    code = "import sys, sd_train.cli, sd_train.entry; print('huggingface_hub' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    cli.offline_hub()
    assert os.environ["HF_HUB_OFFLINE"] == "0"


def test_export_of_raw_and_ema_verifies_the_folder_once_before_any_write(tiny_assets, tmp_path, monkeypatch):
    """Both UNets of one folder are exported after a single pass over its checksums (the second read
    would hash the whole per-rank state again), and a damaged folder is refused before a write."""
    from diffusers import UNet2DConditionModel

    from sd_train import export as export_module

    unet = UNet2DConditionModel.from_pretrained(tiny_assets["model"], subfolder="unet")
    ema = {n: p.detach() + 1 for n, p in unet.named_parameters()}
    step = tmp_path / "checkpoints" / "step_00000004"
    dcp.save({"model": unet.state_dict(), "ema": ema}, checkpoint_id=str(step), no_dist=True)
    config = {"model": {"pretrained_path": str(tiny_assets["model"])}}
    state = {"step": 4, "world_size": 1, "format": "dcp", "ema": {"open": True}, "config": config}
    (step / "trainer_state.json").write_text(json.dumps(state))
    complete_manifest(step, 0)
    calls = []
    real_verify = export_module.verify
    monkeypatch.setattr(export_module, "verify", lambda *a, **k: calls.append(a) or real_verify(*a, **k))

    written = export_module.export_checkpoint(step, str(tiny_assets["model"]), tmp_path / "out", "epsilon")
    assert [p.name for p in written] == ["raw", "ema"] and len(calls) == 1
    exported = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "ema", subfolder="unet")
    assert all(torch.equal(ema[n], p) for n, p in exported.named_parameters())

    shard = next(step.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)  # same size, other bytes: only the hash sees it
    with pytest.raises(export_module.UsageError, match="is damaged"):
        export_module.export_checkpoint(step, str(tiny_assets["model"]), tmp_path / "again", "epsilon")
    assert not (tmp_path / "again").exists()
