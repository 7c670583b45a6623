"""The training runs the end-to-end tests share: `train_cmd` (a 1- or 2-rank run of
configs/test.yaml with the settings every run uses, COMMON) and how to read what a run writes
(checkpoints as flat tensors, the keys each step consumed, exported UNets, post-hoc
reconstructions)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from sd_train.tools.posthoc import find_snapshots, plan_targets, reconstruct
from tests.support.launch import REPO, ranks_cmd

TRAIN = str(REPO / "train.py")
# 16 steps x 8 samples = 128 = exactly one epoch of the fixture's train split. Evaluation every 3
# steps: raw and EMA evaluations (steps 12 and 15) fall between training steps inside the window.
COMMON = [
    "max_steps=16",
    "ema.step_start_ema=10",
    "ema.decay=0.5",
    "ema.tolerance=0.3",
    "checkpoint.every_steps=4",
    "checkpoint.keep_last_k=0",
    "eval.every_steps=3",
    "data.log_keys=true",
    "metrics.log_every=4",
    # Post-hoc EMA profiles in every run, so the reference run, the kill chain and the resumes check
    # them with the rest: from step 10 with the plain EMA, snapshots at 10, 12, 14, 16 (4 x 2
    # profiles span the 7 weights w_10..w_16).
    "ema.posthoc.sigma_rels=[0.05,0.1]",
    "ema.posthoc.snapshot_every=2",
    # Langevin noise after every step (sd_train.langevin; std sqrt(2 D lr) = 4.5e-4 per element at
    # lr 1e-3), so every resume and relaunch (the kill chain, HSDP, 2 -> 1 ranks) checks that the
    # noise is a function of the step, bitwise.
    "optim.langevin.diffusion=1e-4",
]


def train_cmd(nproc: int, out: Path, assets: dict, *extra: str) -> list[str]:
    args = ["--config", "configs/test.yaml", *assets["overrides"], *COMMON, f"output_dir={out}", *extra]
    return [sys.executable, TRAIN, *args] if nproc == 1 else ranks_cmd(nproc, TRAIN, *args)


def full_state(step_dir: Path) -> dict[str, torch.Tensor]:
    """A DCP checkpoint (any world size) as one flat dict of plain tensors."""
    out = step_dir.parent / f"{step_dir.name}.pt"
    dcp_to_torch_save(str(step_dir), str(out))
    flat = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, torch.Tensor):
            flat[prefix] = obj

    walk("", torch.load(out, weights_only=False))
    return flat


def assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for part in ("model.", "optim.", "ema.", "posthoc."):
        assert any(k.startswith(part) for k in a), f"no {part} tensors in the checkpoint"
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:5]}"


def keys_by_step(out: Path, rank: int) -> dict[int, list[str]]:
    """step -> sample keys of that step on `rank`. Each launch starts with a `# start` line and
    appends; a step recomputed after a relaunch replaces the earlier launch's lines."""
    steps: dict[int, list[str]] = {}
    prev = None
    for line in (out / "keys" / f"rank{rank}.txt").read_text().splitlines():
        step, key = line.split("\t")
        if step == "# start":
            prev = None
            continue
        step = int(step)
        if step != prev:
            steps[step] = []
            prev = step
        steps[step].append(key)
    return steps


def unet_weights(pipe_dir: Path) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(pipe_dir, subfolder="unet").state_dict()


SIGMAS, DECAYS = [0.05, 0.1, 0.2], [0.5, 0.8]
"""The post-hoc targets the runs reconstruct: profiles of other widths and classic EMA decays."""


def reconstruct_all(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    snaps = find_snapshots(out)
    targets = plan_targets(snaps, SIGMAS, DECAYS, max_fit_error=0.05)
    assert all(t.refused is None for t in targets), [t.refused for t in targets]
    return reconstruct(snaps, targets)
