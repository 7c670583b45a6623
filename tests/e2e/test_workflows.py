"""Workflows around training, each a real single-process run: exporting a checkpoint, a local sweep,
wandb without a key, and a training run on a corrupted data set."""

import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import torch

from tests.support.launch import run
from tests.support.reference import assert_logged_val_matches_export
from tests.support.runs import train_cmd, unet_weights

FAST = [
    "eval.every_steps=0",
    "export_at_end=false",
    "max_steps=4",
    "ema.step_start_ema=2",
    "ema.tolerance=0.3",
    "checkpoint.every_steps=2",
]


def test_export_command_matches_training_export(straight_run, tmp_path):
    """`sd-train export --checkpoint RUN_DIR` takes the run's newest complete checkpoint, says which,
    reads the 2-rank DCP checkpoint in one process, no process group, and writes the same EMA UNet
    the run exported at its end."""
    out = tmp_path / "pipe"
    proc = run(
        [sys.executable, "-m", "sd_train", "export", "--checkpoint", str(straight_run), "--out", str(out)],
        timeout=120,
    )
    root = straight_run / "checkpoints"
    assert (
        f"exporting ema weights from the newest complete checkpoint of {root}: step_00000016 (of step_00000004, "
        "step_00000008, step_00000012, step_00000016)" in proc.stdout
    ), proc.stdout
    assert "Traceback" not in proc.stderr and "torch.distributed is disabled" not in proc.stderr
    a, b = unet_weights(straight_run / "export" / "ema"), unet_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(out, local_files_only=True)


def test_logged_ema_val_loss_is_the_exported_ema(straight_run):
    """What a user reads (val/loss_ema in metrics.jsonl, 2-rank FSDP2) is the held-out loss of the
    EMA pipeline the run exported, scored by a plain UNet in one process."""
    assert_logged_val_matches_export(straight_run, 16)


def test_plan_mosaic_window_runs_short_window_refused(tiny_assets):
    """decay 0.9999 over the last 50,000 of 1.4M steps: 0.67% pre-window, accepted. The same decay
    over a 1,000-step window: refused, saying 90.5%."""
    ok = run(
        [
            sys.executable,
            "train.py",
            "--config",
            "configs/test.yaml",
            *tiny_assets["overrides"],
            "--plan",
            "ema.decay=0.9999",
            "max_steps=1400000",
            "ema.step_start_ema=1350000",
            "ema.tolerance=0.01",
        ],
        timeout=60,
    )
    assert "pre-window share      0.67%" in ok.stdout and "config OK" in ok.stdout
    bad = run(
        [
            sys.executable,
            "train.py",
            "--config",
            "configs/test.yaml",
            *tiny_assets["overrides"],
            "ema.decay=0.9999",
            "max_steps=1400000",
            "ema.step_start_ema=1399000",
            "ema.tolerance=0.01",
        ],
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert "90.5% of the final EMA would come from pre-window weights" in bad.stderr


def test_local_sweep_two_runs(tiny_assets, tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        "name: tiny\nbase_config: configs/test.yaml\nmethod: grid\nparameters:\n  optim.lr: [1.0e-3, 5.0e-4]\n"
    )
    run(
        [
            sys.executable,
            "-m",
            "sd_train",
            "sweep",
            str(sweep),
            "--local",
            "--out",
            str(tmp_path / "runs"),
            "--",
            *tiny_assets["overrides"],
            *FAST,
        ],
        timeout=300,
    )
    folders = sorted(p for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert len(folders) == 2
    for f in folders:
        assert (f / "checkpoints" / "step_00000004" / ".metadata").is_file()
        assert "tiny" in (f / "config.yaml").read_text()  # the sweep's wandb group


def test_wandb_without_key_warns_once_and_trains(tiny_assets, tmp_path):
    out = tmp_path / "nokey"
    proc = run(
        train_cmd(1, out, tiny_assets, *FAST, "metrics.wandb=true", "data.log_keys=false"),
        timeout=300,
        WANDB_MODE="",
        WANDB_API_KEY="",
        WANDB_DIR=str(tmp_path),
        HOME=str(tmp_path),
    )
    assert proc.stderr.count("wandb disabled for this run") == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in r for r in rows)


def _corrupt_copy(assets: dict, dst: Path) -> tuple[dict, list[str]]:
    """Copy the fixture's train shards and break the first three this single rank reads in epoch 0:
    2 undecodable images and 1 missing caption in the first, the second truncated, the third
    deleted (still named by the pattern). A short run then reads all three and nothing twice."""
    from sd_train.config import load_config
    from sd_train.data.loader import build_train_loader

    dst.mkdir()
    for t in sorted(assets["data"].glob("train-*.tar")):
        shutil.copy(t, dst / t.name)
    cfg = load_config(
        "configs/test.yaml", [*assets["overrides"], f"data.train_shards={dst}/train-{{000000..000007}}.tar"]
    )
    first, second, third = [Path(u) for u in build_train_loader(cfg, 0, 1).dataset.worker_shards(0, 0)[:3]]
    with tarfile.open(first) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    pngs = [m.name for m, _ in members if m.name.endswith(".png")]
    broken_png, dropped_txt = set(pngs[:2]), pngs[2].replace(".png", ".txt")
    with tarfile.open(first, "w") as tf:
        for m, data in members:
            if m.name == dropped_txt:
                continue
            if m.name in broken_png:
                data = b"not a png"
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    second.write_bytes(second.read_bytes()[:700])
    third.unlink()
    return {"undecodable": 2, "missing_caption": 1, "truncated": 1, "unreadable_shard": 1}, [
        first.name,
        second.name,
        third.name,
    ]


def test_corrupted_data_trains_and_threshold_stops(tiny_assets, tmp_path):
    bad = tmp_path / "bad"
    expected, names = _corrupt_copy(tiny_assets, bad)
    overrides = [
        *tiny_assets["overrides"],
        f"data.train_shards={bad}/train-{{000000..000007}}.tar",
        "data.max_bad_fraction=0.5",
        "eval.every_steps=0",
        "export_at_end=false",
        "max_steps=6",
        "checkpoint.every_steps=6",
        "ema.step_start_ema=4",
        "ema.tolerance=0.3",
    ]
    out = tmp_path / "ok"
    run([sys.executable, "train.py", "--config", "configs/test.yaml", *overrides, f"output_dir={out}"], timeout=300)
    summary = json.loads((out / "data_summary.json").read_text())
    assert summary["step"] == 6, "the run trains to the end"
    for kind, n in expected.items():
        assert summary[f"data/bad_{kind}"] == n, kind
    assert summary["data/bad_empty_caption"] == 0 and summary["data/bad_missing_image"] == 0
    assert all(any(n in s for s in summary["data/bad_shards"]) for n in names)

    stop = run(
        [
            sys.executable,
            "train.py",
            "--config",
            "configs/test.yaml",
            *overrides,
            "data.max_bad_fraction=0.01",
            "data.min_samples_for_bad_check=8",
            f"output_dir={tmp_path / 'stop'}",
        ],
        timeout=300,
        check=False,
    )
    assert stop.returncode == 1
    assert names[0] in stop.stderr and "data.max_bad_fraction" in stop.stderr
