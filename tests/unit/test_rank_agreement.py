"""Agreements between ranks, with the ranks as threads of this process (tests/support/threaded_ranks.py):
where one rank sees something else than its peers (a lagging view of the checkpoint folder, a short
read of the held-out shards, a failure), every rank must do the same thing, or they meet in
different collectives and wait there until the collective timeout."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

import sd_train.checkpoint as checkpoint
import sd_train.rollback as rollback
from sd_train.checkpoint import Checkpointer
from sd_train.checksums import complete_manifest
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
    for r in range(world_size):
        complete_manifest(folder, r)


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

    listing, check_files = rollback.complete_steps, checkpoint._check_files
    monkeypatch.setattr(rollback, "complete_steps", lambda r: [s for s in listing(r) if not lagging(step_dir(r, s))])
    monkeypatch.setattr(checkpoint, "_check_files", lambda f: "no trainer_state.json" if lagging(f) else check_files(f))

    def resume(rank: int) -> tuple[int, list[Path], int, bool]:
        files, progress, data = Files(), Progress(), Progress()
        ckpt = Checkpointer(
            CheckpointArgs(), str(tmp_path), rank, 2, 10, files, {}, {"train": progress}, {"data": data}, config={}
        )
        loaded = ckpt.load()
        return loaded.step, files.loaded, progress.step

    (step0, tried0, progress0), (step1, tried1, progress1) = run_ranks(2, resume)
    assert step0 == step1 == progress0 == progress1 == 2
    assert tried0 == tried1 == [step_dir(root, 2)], "the tensors of one folder on every rank"


ASSETS = Path(__file__).resolve().parents[1] / "assets"


def test_ranks_that_read_different_validation_sets_stop_together(tmp_path):
    """Rank 1's read of the held-out shard comes up short (a truncated view of it): each rank's
    count sets how many FSDP forwards it makes, so the ranks compare what they read, and every
    rank stops with a message naming both counts, before any forward; none is left waiting."""
    from sd_train.config import TrainConfig
    from sd_train.errors import BadDataError
    from sd_train.evaluation import Validator
    from sd_train.parallel.process_group import DistInfo

    full = ASSETS / "tiny-000000.tar"
    short = tmp_path / "tiny-000000.tar"
    short.write_bytes(full.read_bytes()[: full.stat().st_size // 2])

    def build(rank: int) -> str:
        cfg = TrainConfig()
        cfg.data.val_shards, cfg.data.resolution, cfg.eval.num_val_samples = str(full if rank == 0 else short), 16, 5
        info = DistInfo(rank, 2, rank, torch.device("cpu"), None)
        with pytest.raises(BadDataError) as e:  # before the encoders are ever needed (no model here)
            Validator(cfg, None, None, info)  # type: ignore[arg-type]
        return str(e.value)

    messages = [m.split(": ", 1)[1] for m in run_ranks(2, build)]  # after each rank's own path
    assert messages[0] == messages[1]
    assert messages[0].startswith("the ranks read different validation sets (rank 0: 5 samples"), messages[0]
    assert "rank 1: 3 samples" in messages[0], messages[0]


def test_a_failing_precompute_rank_stops_every_rank(tiny_assets, tmp_path, monkeypatch):
    """Precompute on 2 ranks; rank 1 fails on its first shard with an unexpected error (its temp
    file's name is taken by a folder). Both ranks stop after the shard each is on, with an error
    naming rank 1, the shard and the error, instead of rank 0 encoding on and then waiting in the
    final gather for the collective timeout."""
    import sd_train.tools.precompute as tool
    from sd_train.parallel.process_group import all_gather_object
    from sd_train.tools.precompute import PrecomputeError, precompute

    # Ranks are threads here, and diffusers' model loading patches torch process-wide while it
    # builds a module (on the meta device): one rank loads at a time, as processes need not.
    loading, encoder = threading.Lock(), tool._Encoder

    def one_at_a_time(*args):
        with loading:
            return encoder(*args)

    monkeypatch.setattr(tool, "_Encoder", one_at_a_time)

    out = tmp_path / "latents"
    (out / "train-000001.tar.tmp").mkdir(parents=True)  # rank 1's first shard: W=2 ranks take 0,2,.. and 1,3,..
    src = f"{tiny_assets['data']}/train-{{000000..000007}}.tar"

    def body(rank: int) -> str:
        with pytest.raises(PrecomputeError) as e:
            precompute(str(tiny_assets["model"]), src, str(out), 32, rank=rank, world_size=2, gather=all_gather_object)
        return str(e.value)

    messages = run_ranks(2, body)
    assert messages[0] == messages[1]
    assert "rank 1 on " in messages[0] and "train-000001.tar: IsADirectoryError" in messages[0], messages[0]
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar"], "rank 0 stopped after its first shard"
