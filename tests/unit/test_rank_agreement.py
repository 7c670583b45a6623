"""Agreements between ranks, with the ranks as threads of this process (tests/support/threaded_ranks.py):
where one rank sees something else than its peers (a lagging view of the checkpoint folder, a short
read of the held-out shards, a failure), every rank must do the same thing, or they meet in
different collectives and wait there until the collective timeout."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch

import sd_train.checkpoint as checkpoint
from sd_train.checkpoint import Checkpointer
from sd_train.config import CheckpointArgs
from sd_train.paths import step_dir
from tests.support.threaded_ranks import run_ranks


class Progress:
    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


class Files:
    """The tensor side of a Strategy for a checkpointer that loads nothing collective: it records
    which folder each rank was told to load."""

    checkpoint_format = "dcp"
    writes_completion_marker = False

    def __init__(self) -> None:
        self.loaded: list[Path] = []

    def missing_files(self, folder: Path) -> None:
        return None

    def load(self, folder: Path, shadows: dict) -> None:
        self.loaded.append(folder)

    def describe_load_error(self, folder: Path, e: BaseException) -> str:
        return str(e)


def write_checkpoint(root: Path, step: int, world_size: int) -> None:
    folder = step_dir(root, step)
    folder.mkdir(parents=True)
    state = {"train": {"step": step}, "step": step, "world_size": world_size, "format": "dcp", "shadows": []}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    (folder / ".metadata").write_bytes(b"")
    for r in range(world_size):
        torch.save({"data": {"step": step}}, folder / f"rank_{r}.pt")


def test_ranks_resume_the_folder_rank_0_lists_whatever_their_own_view(tmp_path, monkeypatch):
    """Rank 1's view of the shared folder lags (a network file system): it does not see step 3
    yet, in its listing or when it looks at the folder. Rank 0 decides which folders to try, so
    both try step 3, rank 1 reports it missing, and both load step 2 together; had each rank listed
    the folder itself, rank 0 would load step 3 and rank 1 step 2."""
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        write_checkpoint(root, step, world_size=2)

    def lagging(path: Path) -> bool:
        return threading.current_thread().name == "rank1" and Path(path).name == "step_00000003"

    listing, check_files = checkpoint.complete_steps, checkpoint._check_files
    monkeypatch.setattr(checkpoint, "complete_steps", lambda r: [s for s in listing(r) if not lagging(step_dir(r, s))])
    monkeypatch.setattr(checkpoint, "_check_files", lambda f: "no trainer_state.json" if lagging(f) else check_files(f))

    def resume(rank: int) -> tuple[int, list[Path], int, bool]:
        files, progress, data = Files(), Progress(), Progress()
        ckpt = Checkpointer(
            CheckpointArgs(), str(tmp_path), rank, 2, 10, files, {}, {"train": progress}, {"data": data}, config={}
        )
        exist = ckpt.candidates_exist()
        loaded = ckpt.load()
        return loaded.step, files.loaded, progress.step, exist

    (step0, tried0, progress0, _), (step1, tried1, progress1, exist1) = run_ranks(2, resume)
    assert step0 == step1 == progress0 == progress1 == 2
    assert tried0 == tried1 == [step_dir(root, 2)], "the tensors of one folder on every rank"
    assert exist1, "rank 0 says whether checkpoints exist"
