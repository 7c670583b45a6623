"""The Checkpointer in one process (a 1-rank gloo group, the FSDP2 strategy on a small module):
retention, stale `.partial` cleanup, newest-first fallback past a broken folder, that a load
restores everything registered, rollbacks and their requeue, and that a crafted checkpoint runs
no code. Tensors are compared with torch.equal."""

from __future__ import annotations

import datetime
import json
import pickle
import random
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from sd_train import dcp_io
from sd_train.checkpoint import Checkpointer
from sd_train.checksums import complete_manifest, manifest_path
from sd_train.config import CheckpointArgs, DistArgs, EMAArgs, load_config
from sd_train.dcp_io import UnsafeCheckpointError
from sd_train.ema.plan import plan_from_config
from sd_train.ema.posthoc import load_snapshot_profile
from sd_train.ema.sharded import ShardedEMA
from sd_train.errors import CheckpointLoadError, ConfigError, UsageError
from sd_train.export import load_checkpoint_unet
from sd_train.parallel.fsdp import FSDPStrategy
from sd_train.paths import (
    MODEL_SUBFOLDERS,
    SNAPSHOT_META,
    check_model_folder,
    complete_steps,
    partial_dir,
    snapshot_steps,
    step_dir,
)
from sd_train.preflight import check_checkpoint_folders
from sd_train.rng import load_rng_state_dict, rng_state_dict
from sd_train.rollback import read_rollbacks


class Counter:
    """A registered state: a number and a list, so a load can be told apart from the default."""

    def __init__(self) -> None:
        self.value, self.history = 0, []

    def state_dict(self) -> dict:
        return {"value": self.value, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.history = state["value"], list(state["history"])


class Run:
    """Everything a Checkpointer is handed: strategy (module + SGD), EMA, global and rank states."""

    def __init__(self, info, out, hidden: int = 5, clock=time.monotonic, **ckpt):
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(6, hidden), torch.nn.Linear(hidden, 3))
        self.strategy = FSDPStrategy(DistArgs(strategy="fsdp2"), info, 0.0, lambda m: [m[0]])
        self.strategy.wrap(module, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
        self.ema = ShardedEMA(
            self.strategy.module,
            plan_from_config(EMAArgs(decay=0.5, step_start_ema=2, tolerance=0.9), 10),
            self.strategy.ema_layout(),
        )
        self.train, self.data = Counter(), Counter()
        args = CheckpointArgs(**{"every_steps": 1, **ckpt})
        self.ckpt = Checkpointer(
            args,
            str(out),
            0,
            1,
            10,
            self.strategy,
            {"ema": self.ema},
            {"train": self.train},
            {"data": self.data},
            config={"note": "test"},
            clock=clock,
        )

    def step(self, step: int, clock_due: bool = False) -> bool:
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        self.strategy.model(x).square().mean().backward()
        self.ckpt.wait_staged()  # as the loop does: an async save's copy is done before the weights change
        self.strategy.step()
        self.strategy.optimizer.zero_grad()
        self.ema.update(step)
        self.train.value, self.data.value = step, 100 + step
        self.data.history.append(step)
        return self.ckpt.save(step, clock_due=clock_due)

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: p.full_tensor().clone() for n, p in self.strategy.module.named_parameters()}

    def ema_weights(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.ema.full_tensors().items()}


def test_retention_keeps_newest_k_and_cleans_stale_partials(info, tmp_path):
    run = Run(info, tmp_path, keep_last_k=2)
    root = tmp_path / "checkpoints"
    for s in (1, 2):
        run.step(s)
    stale, newer = partial_dir(root, 1), partial_dir(root, 9)
    stale.mkdir()
    newer.mkdir()
    for s in (3, 4):
        run.step(s)
    assert complete_steps(root) == [3, 4]
    assert not stale.exists(), "a partial folder older than the newest complete checkpoint is cleaned up"
    assert newer.exists(), "a partial folder newer than every complete one is left alone"
    state = json.loads((step_dir(root, 4) / "trainer_state.json").read_text())
    assert (state["step"], state["world_size"], state["format"], state["train"]["value"]) == (4, 1, "dcp", 4)
    assert state["config"] == {"note": "test"} and state["ema"]["open"]
    assert not run.ckpt.save(4, force=True), "never re-saves into the folder of a step already saved"


def test_load_restores_every_registered_state(info, tmp_path):
    a = Run(info, tmp_path, keep_last_k=0)
    for s in range(1, 6):
        a.step(s)
    weights, ema, momentum = (
        a.weights(),
        a.ema_weights(),
        {k: v["momentum_buffer"].full_tensor().clone() for k, v in a.strategy.optimizer.state_dict()["state"].items()},
    )
    b = Run(info, tmp_path, keep_last_k=0)
    loaded = b.ckpt.load()
    assert (loaded.step, loaded.saved_world_size, loaded.folder) == (5, 1, step_dir(tmp_path / "checkpoints", 5))
    assert all(torch.equal(weights[n], t) for n, t in b.weights().items())
    assert b.ema.is_open and b.ema.num_updates == a.ema.num_updates
    assert all(torch.equal(ema[n], t) for n, t in b.ema_weights().items())
    got = {k: v["momentum_buffer"].full_tensor() for k, v in b.strategy.optimizer.state_dict()["state"].items()}
    assert got.keys() == momentum.keys() and all(torch.equal(momentum[k], got[k]) for k in got)
    assert (b.train.value, b.data.value, b.data.history) == (5, 105, [1, 2, 3, 4, 5])


def test_broken_newest_falls_back_then_refuses(info, tmp_path, capsys):
    a = Run(info, tmp_path, keep_last_k=0)
    for s in range(1, 4):
        a.step(s)
        if s == 2:
            at_two = a.weights()
    root = tmp_path / "checkpoints"
    shard = next(step_dir(root, 3).glob("__0_*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    b = Run(info, tmp_path, keep_last_k=0)
    loaded = b.ckpt.load()
    assert loaded.step == 2
    out = capsys.readouterr().out
    assert "could not be loaded" in out and str(shard) in out, "the warning names the truncated file"
    assert all(torch.equal(at_two[n], t) for n, t in b.weights().items())
    assert b.train.value == 2

    for folder in (step_dir(root, 1), step_dir(root, 2)):
        (folder / "rank_0.pt").write_bytes(b"")
    with pytest.raises(CheckpointLoadError, match="none could be loaded, refusing to start from step 0"):
        Run(info, tmp_path, keep_last_k=0).ckpt.load()


def test_trainer_state_missing_an_entry_falls_back_like_any_broken_checkpoint(info, tmp_path, capsys):
    """A trainer_state.json that parses but lacks what a load reads (the EMA's or the trainer's
    entry, or holds it malformed), or a rank file that lacks a registered state: the folder is
    reported and the previous one loads, as for a truncated shard; with none left, the refusal. No
    KeyError, and no state touched by the broken folder."""
    a = Run(info, tmp_path, keep_last_k=0)
    for s in range(1, 6):
        a.step(s)
        if s == 1:
            at_one = (a.weights(), a.ema_weights())
    root = tmp_path / "checkpoints"

    def rehash(step: int) -> None:  # written so by the save itself: the checksums pass, the contents do not
        manifest_path(step_dir(root, step), 0).unlink()
        complete_manifest(step_dir(root, step), 0)

    def edit(step: int, change) -> None:
        path = step_dir(root, step) / "trainer_state.json"
        state = json.loads(path.read_text())
        change(state)
        path.write_text(json.dumps(state))
        rehash(step)

    edit(5, lambda st: st.pop("ema"))
    edit(4, lambda st: st.pop("train"))
    edit(3, lambda st: st.update(ema={}))  # present, but without its fields
    torch.save({}, step_dir(root, 2) / "rank_0.pt")
    rehash(2)
    b = Run(info, tmp_path, keep_last_k=0)
    assert b.ckpt.load().step == 1
    out = capsys.readouterr().out
    assert "trainer_state.json lacks ['ema']" in out and "trainer_state.json lacks ['train']" in out
    assert "ema state malformed (KeyError" in out and "rank_0.pt lacks ['data']" in out
    assert (b.train.value, b.data.value) == (1, 101)
    assert all(torch.equal(at_one[0][n], t) for n, t in b.weights().items())
    assert not b.ema.is_open, "step 1 is before the EMA window (it opens at 2)"
    edit(1, lambda st: st.pop("step"))
    with pytest.raises(CheckpointLoadError, match=r"none could be loaded(.|\n)*lacks \['step'\]"):
        Run(info, tmp_path, keep_last_k=0).ckpt.load()


def test_retention_deletes_off_the_training_thread(info, tmp_path, monkeypatch):
    """Retention renames a dropped folder at once (from then on it never counts as a checkpoint)
    and deletes it on a background thread: the save returns while the deletion is still held up,
    and the deletion is finished by `close`."""
    rmtree, release, calls = shutil.rmtree, threading.Event(), []

    def slow_rmtree(path, *args, **kwargs):
        calls.append((threading.current_thread().name, Path(path).name))
        if threading.current_thread() is not threading.main_thread():
            release.wait(60)  # a slow disk; on the training thread this would be the loop's wait
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", slow_rmtree)
    run = Run(info, tmp_path, keep_last_k=2)
    root = tmp_path / "checkpoints"
    for s in (1, 2, 3):
        assert run.step(s)
    assert complete_steps(root) == [2, 3], "step 1 stopped counting when its save returned"
    assert [name for name in (p.name for p in root.iterdir()) if name.endswith(".deleting")], "still being deleted"
    assert calls and all(thread != "MainThread" for thread, _ in calls), calls
    release.set()
    run.ckpt.close()
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000003"]


def test_every_process_group_gets_the_configured_timeout(info, tmp_path):
    """dist.timeout_s (600 s in the fixture's DistArgs, against torch's 1800 s default for gloo)
    reaches groups created after the default one: the async-save gloo group, and the groups of
    each dimension of a 2-D (HSDP) device mesh."""
    from torch.distributed.device_mesh import DeviceMesh

    def timeout(group) -> datetime.timedelta:
        return group._get_backend(torch.device("cpu")).options._timeout  # what gloo waits for

    want = datetime.timedelta(seconds=DistArgs().timeout_s)
    assert want != datetime.timedelta(minutes=30)
    run = Run(info, tmp_path, async_save=True)
    assert timeout(run.ckpt._pg) == want
    mesh = DeviceMesh("cpu", torch.arange(1).view(1, 1), mesh_dim_names=("replicate", "shard"))
    assert [timeout(mesh.get_group(d)) for d in ("replicate", "shard")] == [want, want]


def test_init_from_takes_weights_and_optimizer_only_and_refuses_other_shapes(info, tmp_path):
    a = Run(info, tmp_path / "a", keep_last_k=0)
    for s in range(1, 5):
        a.step(s)
    weights = a.weights()
    b = Run(info, tmp_path / "b", keep_last_k=0)
    b.ckpt.init_from(step_dir(tmp_path / "a" / "checkpoints", 4))
    assert all(torch.equal(weights[n], t) for n, t in b.weights().items())
    steps = [v["momentum_buffer"] is not None for v in b.strategy.optimizer.state_dict()["state"].values()]
    assert steps and all(steps), "the optimizer state came along"
    assert not b.ema.is_open and (b.train.value, b.data.value) == (0, 0), "EMA, progress and data start fresh"
    with pytest.raises(
        CheckpointLoadError, match=r"3 UNet tensors do not match.*0.weight: here \(4, 6\), saved \(5, 6\)"
    ):
        Run(info, tmp_path / "c", hidden=4, keep_last_k=0).ckpt.init_from(step_dir(tmp_path / "a" / "checkpoints", 4))


def test_every_minutes_follows_rank_0s_clock_beside_every_steps(info, tmp_path):
    """A fake clock, 25 s per step, checkpoint.every_minutes=1 and every_steps=4: a save once 60 s
    have passed since the last one began (steps 3 and 7), besides steps 4 and 8 and the last (10).
    Only rank 0 votes. Each save's figures: blocked and total time (the clock moves 2 s inside a
    synchronous save: blocked for all of it) and the bytes of the one rank's files."""
    now = [0.0]
    run = Run(info, tmp_path, clock=lambda: now[0], every_steps=4, every_minutes=1.0, keep_last_k=0)

    def slow_write(phase: str, step: int) -> None:
        if phase == "after_shards":
            now[0] += 2.0

    run.ckpt.fault_hook = slow_write
    saved = []
    for step in range(1, 11):
        now[0] += 25.0
        vote = run.ckpt.clock_vote()
        if run.step(step, clock_due=vote > 0):
            saved.append(step)
    assert saved == [3, 4, 7, 8, 10]
    figures = run.ckpt.take_figures()
    assert [f["checkpoint/step"] for f in figures] == saved and run.ckpt.take_figures() == []
    assert all(f["checkpoint/blocked_s"] == f["checkpoint/save_s"] == 2.0 for f in figures)
    for f in figures:
        folder = step_dir(tmp_path / "checkpoints", f["checkpoint/step"])
        assert f["checkpoint/bytes_per_rank"] == sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    now[0] += 3600.0
    run.ckpt.rank = 1
    assert run.ckpt.clock_vote() == 0.0, "other ranks' clocks never vote"
    run.ckpt.rank = 0
    assert run.ckpt.clock_vote() == 1.0
    off = Run(info, tmp_path / "off", clock=lambda: now[0], every_minutes=0.0)
    now[0] += 3600.0
    assert off.ckpt.clock_vote() == 0.0, "every_minutes=0 is off"


def test_async_save_stages_into_buffers_kept_for_the_run_and_writes_the_saved_step(info, tmp_path):
    """checkpoint.async_save: the loop waits for staging before the next optimizer step, not for the
    write; every checkpoint, reloaded, equals the live weights, EMA and momentum of its step bitwise
    although the weights moved on while it was written; the second save copies into the CPU
    buffers the first one made (the stager keeps one per live storage)."""
    a = Run(info, tmp_path, keep_last_k=0, async_save=True)
    live, buffers = {}, []
    for s in range(1, 5):
        a.step(s)
        live[s] = (a.weights(), a.ema_weights())
        if s in (2, 3):
            a.ckpt.wait_staged()
            # The stager's cache (torch internals): live storage -> its CPU buffer.
            cache = a.strategy._stager._state_dict_stager._cached_storage_mapping
            buffers.append(sorted(buf.data_ptr() for _, buf in cache.items()))
    a.ckpt.wait()
    assert buffers[0] and buffers[0] == buffers[1], "the second save reused the first one's buffers"
    figures = a.ckpt.take_figures()
    assert [f["checkpoint/step"] for f in figures] == [1, 2, 3, 4]
    assert all(0 <= f["checkpoint/blocked_s"] and 0 < f["checkpoint/save_s"] for f in figures)
    for s in range(1, 5):
        # Read into another output_dir: load_step=s here would roll this run back to s.
        b = Run(info, tmp_path / f"read{s}", keep_last_k=0, resume=str(step_dir(tmp_path / "checkpoints", s)))
        assert b.ckpt.load().step == s
        weights, ema = live[s]
        assert all(torch.equal(weights[n], t) for n, t in b.weights().items()), s
        assert all(torch.equal(ema[n], t) for n, t in b.ema_weights().items()), s
    a.ckpt.close()


def _snapshot(root, step: int) -> None:
    """A folder that counts as a complete post-hoc snapshot (sd_train.paths.snapshot_is_complete)."""
    folder = step_dir(root, step)
    folder.mkdir(parents=True)
    (folder / SNAPSHOT_META).write_text("{}")
    (folder / ".metadata").write_bytes(b"")


def test_rollback_moves_the_old_branch_aside_and_a_requeue_continues_the_new_one(info, tmp_path, capsys):
    """load_step=3 after steps 1-6: the new branch starts at 3, steps 4-6, the snapshots after 3 and
    a broken step-4 folder move to abandoned-00000003-*/ (never deleted), and the rollback is
    recorded. The branch trains on (other weights than the old branch), retention deletes step 3,
    and a requeue of the same command (load_step=3 again) passes preflight and continues the
    branch from its step 5 instead of rolling back again."""
    root, live = tmp_path / "checkpoints", {}
    a = Run(info, tmp_path, keep_last_k=0)
    for s in range(1, 7):
        a.step(s)
        live[s] = a.weights()
    for s in (2, 4, 6):
        _snapshot(tmp_path / "posthoc", s)
    (root / "step_00000004.broken-1700000000").mkdir()
    b = Run(info, tmp_path, keep_last_k=2, load_step=3)
    assert b.ckpt.load().step == 3
    assert all(torch.equal(live[3][n], t) for n, t in b.weights().items())
    (abandoned,) = tmp_path.glob("abandoned-00000003-*")
    assert complete_steps(root) == [1, 2, 3] and complete_steps(abandoned / "checkpoints") == [4, 5, 6]
    assert (abandoned / "checkpoints" / "step_00000004.broken-1700000000").is_dir()
    assert snapshot_steps(tmp_path / "posthoc") == [2], "sd-train posthoc sees the live branch only"
    assert snapshot_steps(abandoned / "posthoc") == [4, 6]
    (record,) = read_rollbacks(tmp_path)
    assert (record["step"], record["abandoned"]) == (3, abandoned.name)
    said = capsys.readouterr().out
    assert "kept for inspection" in said and "rollback to" in said and "continues the new branch" in said

    with torch.no_grad():  # the new branch takes other weights than the old one did
        next(b.strategy.module.parameters()).add_(1.0)
    for s in (4, 5):
        b.step(s)
    branch = b.weights()
    assert not torch.equal(branch["0.weight"], live[5]["0.weight"])
    assert complete_steps(root) == [4, 5], "retention of the branch deleted step 3"

    cfg = load_config("configs/test.yaml", [f"output_dir={tmp_path}", "checkpoint.load_step=3"])
    check_checkpoint_folders(cfg)  # the requeue passes preflight though step 3 is gone
    c = Run(info, tmp_path, keep_last_k=2, load_step=3)
    assert c.ckpt.load().step == 5
    assert all(torch.equal(branch[n], t) for n, t in c.weights().items())
    assert len(read_rollbacks(tmp_path)) == 1 and len(list(tmp_path.glob("abandoned-*"))) == 1


class _WritesAFile:
    """What a crafted checkpoint holds: unpickling it calls open(path, "w"), i.e. runs code."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(info, tmp_path, capsys):
    """A step folder whose .metadata pickle would write a file, and one whose rank_0.pt would: both
    are refused by name, the resume falls back to the clean step 1, and no file is written. The
    post-hoc snapshot reader (sd-train posthoc) refuses the same .metadata."""
    a = Run(info, tmp_path, keep_last_k=0)
    for s in (1, 2, 3):
        a.step(s)
        if s == 1:
            at_one = a.weights()
    root, pwned = tmp_path / "checkpoints", tmp_path / "pwned"
    (step_dir(root, 3) / ".metadata").write_bytes(pickle.dumps(_WritesAFile(pwned)))
    torch.save({"data": _WritesAFile(pwned)}, step_dir(root, 2) / "rank_0.pt")
    for s in (2, 3):  # whoever crafted them rewrote the checksum manifests too: those pass
        manifest_path(step_dir(root, s), 0).unlink()
        complete_manifest(step_dir(root, s), 0)
    b = Run(info, tmp_path, keep_last_k=0)
    assert b.ckpt.load().step == 1
    said = capsys.readouterr().out
    assert "names io.open, which is not part of DCP's metadata" in said
    assert "rank_0.pt unreadable: UnpicklingError: Weights only load failed" in said
    assert all(torch.equal(at_one[n], t) for n, t in b.weights().items())
    assert not pwned.exists()

    snapshot = tmp_path / "posthoc" / "step_00000003"
    snapshot.mkdir(parents=True)
    (snapshot / SNAPSHOT_META).write_text("{}")
    (snapshot / ".metadata").write_bytes(pickle.dumps(_WritesAFile(pwned)))
    with pytest.raises(UnsafeCheckpointError, match="io.open"):
        load_snapshot_profile(snapshot, 0)
    assert not pwned.exists()


def test_a_crafted_non_tensor_entry_is_refused_and_runs_nothing(tmp_path):
    """DCP stores non-tensor entries (the optimizer's lr, betas) as pickles inside the shard, behind
    a .metadata that is plain DCP metadata: the load planner reads them weights-only."""
    pwned = tmp_path / "pwned"
    dcp.save({"lr": _WritesAFile(pwned)}, checkpoint_id=str(tmp_path / "step"), no_dist=True)
    assert not pwned.exists(), "saving records the call; only unpickling would make it"
    dcp_io.read_metadata(tmp_path / "step")  # the metadata itself passes
    with pytest.raises(BaseException, match="Weights only load failed"):
        dcp_io.load({"lr": 0.0}, tmp_path / "step", no_dist=True)
    assert not pwned.exists()


def test_rng_state_loads_weights_only_and_restores_every_generator(tmp_path):
    """rank_R.pt's RNG state is plain data (weights_only=True reads it) and restores the Python,
    numpy and torch generators exactly, a cached Gaussian included."""
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # leave a cached Gaussian in both
    torch.save({"rng": rng_state_dict()}, tmp_path / "rank_0.pt")
    want = (random.gauss(0, 1), random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    load_rng_state_dict(torch.load(tmp_path / "rank_0.pt", weights_only=True)["rng"])
    got = (random.gauss(0, 1), random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    assert got[:3] == want[:3] and torch.equal(got[3], want[3])


def test_a_flipped_bit_is_caught_by_the_checksums_and_the_resume_falls_back(info, tmp_path, capsys):
    """One bit flipped inside a weight stored in step 3's shard (DCP alone loads that silently): the
    checksum manifest names the file, and the resume falls back to step 2, bitwise; sd-train export
    refuses the damaged step by name."""
    a = Run(info, tmp_path, keep_last_k=0)
    live = {}
    for s in (1, 2, 3):
        a.step(s)
        live[s] = a.weights()
    shard = step_dir(tmp_path / "checkpoints", 3) / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    at = data.find(live[3]["0.weight"].detach().numpy().tobytes())
    assert at > 0, "the weight's bytes are stored as they are"
    data[at + 9] ^= 0x04  # a mantissa bit of the weight's third value
    shard.write_bytes(bytes(data))
    b = Run(info, tmp_path, keep_last_k=0)
    assert b.ckpt.load().step == 2
    said = capsys.readouterr().out
    assert f"checksum mismatch in {shard}: xxh3_64" in said and "resumed from older checkpoint" in said
    assert all(torch.equal(live[2][n], t) for n, t in b.weights().items())
    with pytest.raises(UsageError, match=rf"is damaged: checksum mismatch in {re.escape(str(shard))}"):
        load_checkpoint_unet(shard.parent, "raw")  # sd-train export refuses it too


def test_which_step_folders_count_as_complete(tmp_path):
    """A checkpoint needs trainer_state.json and its tensors (DCP's .metadata, or DeepSpeed's zero/);
    a snapshot needs snapshot.json and .metadata; other names and partial folders never count."""
    files = {
        1: ["trainer_state.json"],
        2: [".metadata"],
        3: ["trainer_state.json", ".metadata"],
        4: ["trainer_state.json", "zero/"],
        5: [],
        6: ["zero/"],
    }
    for step, names in files.items():
        for name in names:
            path = step_dir(tmp_path / "ckpt", step) / name.rstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir() if name.endswith("/") else path.write_text("{}")
    for odd in ("notes", partial_dir(tmp_path / "ckpt", 7).name):
        (tmp_path / "ckpt" / odd).mkdir()
        (tmp_path / "ckpt" / odd / "trainer_state.json").write_text("{}")
        (tmp_path / "ckpt" / odd / ".metadata").write_text("")
    assert complete_steps(tmp_path / "ckpt") == [3, 4] and complete_steps(tmp_path / "none") == []
    for step, names in {1: [SNAPSHOT_META], 2: [".metadata"], 3: [SNAPSHOT_META, ".metadata"]}.items():
        step_dir(tmp_path / "posthoc", step).mkdir(parents=True)
        for name in names:
            (step_dir(tmp_path / "posthoc", step) / name).write_text("{}")
    (tmp_path / "posthoc" / "notes").mkdir()
    (tmp_path / "posthoc" / "notes" / SNAPSHOT_META).write_text("{}")
    assert snapshot_steps(tmp_path / "posthoc") == [3] and snapshot_steps(tmp_path / "none") == []


def test_model_folder_check_names_the_field_and_what_is_missing(tmp_path):
    fix = "Run `make tiny-sd` for the demo model"
    with pytest.raises(ConfigError) as e:
        check_model_folder(str(tmp_path / "nope"))
    assert str(e.value) == (
        f"model.pretrained_path={str(tmp_path / 'nope')!r}: no such folder. {fix}, or point it at a local "
        "diffusers Stable Diffusion folder"
    )
    for name in MODEL_SUBFOLDERS[:-1]:
        (tmp_path / name).mkdir()
    with pytest.raises(ConfigError) as e:
        check_model_folder(str(tmp_path))
    assert str(e.value) == (
        f"model.pretrained_path={str(tmp_path)!r} lacks {[MODEL_SUBFOLDERS[-1]]}: it must be a diffusers Stable "
        f"Diffusion folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/). {fix}"
    )
    (tmp_path / MODEL_SUBFOLDERS[-1]).mkdir()
    check_model_folder(str(tmp_path))


def test_a_named_folder_without_its_trainer_state_is_refused_naming_what_is_missing(info, tmp_path):
    """checkpoint.resume=PATH at a folder that lost trainer_state.json: refused, saying so (a
    relaunch never lists such a folder: it is not complete); nothing is loaded, so the run that
    asked for it knows nothing of it."""
    a = Run(info, tmp_path, keep_last_k=0)
    a.step(1)
    folder = step_dir(tmp_path / "checkpoints", 1)
    (folder / "trainer_state.json").unlink()
    b = Run(info, tmp_path / "other", keep_last_k=0, resume=str(folder))
    assert b.ckpt.loaded_folder is None
    with pytest.raises(CheckpointLoadError, match=f"{folder}: rank 0: no trainer_state.json\\n"):
        b.ckpt.load()
    assert b.ckpt.loaded_folder is None and b.train.value == 0


def test_an_async_saves_time_ends_when_its_files_are_written(info, tmp_path):
    """checkpoint/save_s of an async save runs from the save's start to its files on disk, not to
    the step at which the loop finalizes it (it polls once per step: a slow step must not count)."""
    now = [0.0]
    a = Run(info, tmp_path, keep_last_k=0, async_save=True, clock=lambda: now[0])
    a.step(1)
    flight = a.ckpt._pending
    flight.save.written.result()
    for _ in range(500):  # the writer thread runs the done-callbacks just after the result is set
        if flight.written_at is not None:
            break
        time.sleep(0.01)
    now[0] += 1000.0  # the loop reaches the save's end much later
    a.ckpt.wait()
    (figures,) = a.ckpt.take_figures()
    assert figures["checkpoint/save_s"] < 1000.0 <= figures["checkpoint/blocked_s"] + 1000.0, figures
    assert a.ckpt.loaded_folder is None  # saving never marks a folder as loaded
    a.ckpt.close()


def test_a_checkpoint_of_the_other_backend_or_a_zero_world_is_refused_with_the_way_out(tmp_path):
    """A resume that cannot work names what wrote the folder, what this run is, and the way out:
    the other backend's folder (relaunch with it, or export and start from the export), DeepSpeed
    partitions of another world size (relaunch with that many, or export; FSDP2 reshards)."""
    from sd_train.paths import incompatibility

    f = tmp_path / "step_00000004"
    assert incompatibility(f, {"format": "dcp", "world_size": 2}, "dcp", 3) is None  # FSDP2 reshards
    assert incompatibility(f, {"world_size": 2}, "dcp", 2) is None  # written before the format was kept
    assert incompatibility(f, {"format": "zero", "world_size": 2}, "zero", 2) is None
    assert incompatibility(f, {"format": "zero", "world_size": 2}, "dcp", 2) == (
        f"{f} was written with dist.strategy=deepspeed but this run uses dist.strategy=fsdp2 (or ddp): resume it "
        f"with dist.strategy=deepspeed, or export it (`sd-train export --checkpoint {f} --weights raw`) and start a "
        "new run from the export with model.pretrained_path"
    )
    assert incompatibility(f, {"format": "dcp", "world_size": 2}, "zero", 2) == (
        f"{f} was written with dist.strategy=fsdp2 (or ddp) but this run uses dist.strategy=deepspeed: resume it "
        f"with dist.strategy=fsdp2 (or ddp), or export it (`sd-train export --checkpoint {f} --weights raw`) and "
        "start a new run from the export with model.pretrained_path"
    )
    unknown = incompatibility(f, {"format": "orbax", "world_size": 2}, "dcp", 2)  # a format of another tool
    assert unknown.startswith(f"{f} was written with orbax but") and "resume it with orbax, or export" in unknown
    assert incompatibility(f, {"format": "zero", "world_size": 2}, "zero", 4) == (
        f"{f} holds DeepSpeed ZeRO partitions of 2 ranks and this run has 4: DeepSpeed checkpoints resume on the "
        f"same world size. Relaunch with 2 processes, or export it (`sd-train export --checkpoint {f}`) and start "
        "a new run from the export with model.pretrained_path. FSDP2 checkpoints (dist.strategy=fsdp2) reshard to "
        "any world size"
    )
