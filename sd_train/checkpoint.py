"""Per-rank checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout of `<output_dir>/checkpoints/step_00000100/`:
    .metadata            DCP index (the coordinator writes it last)
    __R_0.distcp         rank R's shards of model, optimizer and EMA
    rank_R.pt            rank R's own state: RNG generators and data-loader position
    trainer_state.json   step, LR schedule, EMA window state, world size, resolved config

A step folder is first written as `.step_00000100.partial` and renamed once every rank is done,
so a folder with the final name is complete by construction; a crash leaves only a `.partial`
folder, which never counts and is cleaned up. We never save into an existing folder (DCP's
FileSystemWriter would overwrite in place and could mix old and new shards).

Loading goes newest-first: a checkpoint that fails to load (a truncated shard, a missing rank file)
is reported by file name and the previous one is tried. If checkpoints exist but none loads, the
run stops: it never silently starts again from step 0.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from sd_train.config import CheckpointArgs
from sd_train.errors import CheckpointLoadError
from sd_train.paths import PARTIAL_SUFFIX, checkpoint_is_complete, complete_steps, partial_dir, step_dir

log = logging.getLogger(__name__)


class Checkpointer:
    """Owns checkpoint cadence, the atomic write, retention and resume.

    `state` hands it the things to save: `model`, `optimizer`, `ema` (ShardedEMA), and two callables
    for the small states: `global_state()` (same on every rank -> trainer_state.json) and
    `rank_state()` (this rank's RNG and data position -> rank_R.pt)."""

    def __init__(self, args: CheckpointArgs, output_dir: str, rank: int, world_size: int, max_steps: int, zero=None):
        self.args = args
        # DeepSpeed (sd_train.zero.ZeroEngine) writes its own per-rank files; FSDP2/DDP go through DCP.
        self.zero = zero
        self.format = "zero" if zero is not None else "dcp"
        self.root = Path(output_dir) / "checkpoints"
        self.rank = rank
        self.world_size = world_size
        self.max_steps = max_steps
        self._pending: Optional[tuple[int, Future]] = None
        # Async saves run their collectives on a group of their own, so the background thread
        # never interleaves with the training loop's collectives on the default group.
        self._pg = dist.new_group(backend="gloo") if args.async_save and dist.is_initialized() else None
        self.fault_hook: Callable[[str, int], None] = lambda phase, step: None  # set by faults.py
        self.loaded_folder: Optional[Path] = None
        self._last_saved_step: Optional[int] = None

    def candidates_exist(self) -> bool:
        return bool(complete_steps(self.root))

    # ---- saving ---------------------------------------------------------------------------------

    def should_save(self, step: int, last_step: bool = False) -> bool:
        return last_step or step % self.args.every_steps == 0

    def save(self, step: int, model, optimizer, ema, global_state: dict, rank_state: dict, force: bool = False) -> bool:
        """Save if the cadence says so (or `force`). Collective: every rank calls it every step."""
        self.poll()
        if not (force or self.should_save(step, last_step=step == self.max_steps)):
            return False
        if step == self._last_saved_step:
            # Already saved at this step (a preemption save right after a cadence save). Decided from
            # memory, not the file system: rank 0 may not have renamed the folder yet when another
            # rank looks, and ranks that disagree here would deadlock in the save's collectives.
            return False
        self.wait()  # one save in flight at a time
        self._last_saved_step = step
        tmp = partial_dir(self.root, step)
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a crash: never write into it
            tmp.mkdir(parents=True)
        dist.barrier()
        torch.save(rank_state, tmp / f"rank_{self.rank}.pt")
        if self.rank == 0:
            with open(tmp / "trainer_state.json", "w") as f:
                json.dump({**global_state, "step": step, "world_size": self.world_size, "format": self.format}, f, indent=1)
        self.fault_hook("after_rank_files", step)
        if self.zero is not None:
            self.zero.save(tmp, ema)
            self.fault_hook("after_shards", step)
            dist.barrier()  # every rank's files are on disk before rank 0 renames the folder
            self._finalize(step)
            return True
        state = self._tensor_state(model, optimizer, ema)
        if self.args.async_save:
            fut = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._pg)
            self._pending = (step, fut)
            self.fault_hook("during_async_save", step)
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            self.fault_hook("after_shards", step)
            self._finalize(step)
        return True

    def _tensor_state(self, model, optimizer, ema) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        return {"model": model_sd, "optim": optim_sd, "ema": ema.tensor_state_dict()}

    def poll(self) -> None:
        """Finish an async save whose background write is done (cheap; called every step)."""
        if self._pending is not None and self._pending[1].done():
            self.wait()

    def wait(self) -> None:
        """Block until the in-flight async save (if any) is written, then finalize it."""
        if self._pending is None:
            return
        step, fut = self._pending
        self._pending = None
        fut.result()
        self._finalize(step)

    def _finalize(self, step: int) -> None:
        """Rank 0 renames the partial folder once DCP's coordinator has written `.metadata` (which it
        does only after every rank reported its shards written), then applies retention."""
        if self.rank != 0:
            return
        tmp = partial_dir(self.root, step)
        if not checkpoint_is_complete(tmp):
            raise RuntimeError(f"checkpoint at step {step}: {tmp} has no .metadata (or zero/) after save; not renaming")
        final = step_dir(self.root, step)
        if final.exists():
            # A folder of this step that failed to load (we resumed from an older one and came
            # back to this step). Keep it for inspection under a name that never counts.
            os.replace(final, final.with_name(f"{final.name}.broken-{int(time.time())}"))
        os.replace(tmp, final)
        log.info("checkpoint saved: %s", step_dir(self.root, step))
        self.fault_hook("before_retention", step)
        self.apply_retention()

    def apply_retention(self) -> None:
        """Keep the newest `keep_last_k` complete checkpoints; drop stale partial folders older than
        the newest complete one. The newest complete checkpoint is never deleted."""
        steps = complete_steps(self.root)
        if not steps:
            return
        newest = steps[-1]
        if self.args.keep_last_k >= 2:
            for s in steps[: -self.args.keep_last_k]:
                shutil.rmtree(step_dir(self.root, s), ignore_errors=True)
        for entry in self.root.iterdir():
            if entry.name.endswith(PARTIAL_SUFFIX):
                m = re.search(r"step_(\d{8})", entry.name)
                if m and int(m.group(1)) <= newest and (self._pending is None or int(m.group(1)) != self._pending[0]):
                    shutil.rmtree(entry, ignore_errors=True)

    # ---- loading --------------------------------------------------------------------------------

    def candidates(self) -> list[Path]:
        """Folders to try, newest first, per `checkpoint.resume` / `checkpoint.load_step`."""
        if self.args.resume == "none":
            return []
        if self.args.resume != "auto":
            return [Path(self.args.resume)]
        if self.args.load_step is not None:
            return [step_dir(self.root, self.args.load_step)]
        return [step_dir(self.root, s) for s in reversed(complete_steps(self.root))]

    def load(self, model, optimizer, ema, load_global: Callable[[dict], None]) -> Optional[tuple[dict, dict]]:
        """Load the newest loadable checkpoint. Returns (global_state, rank_state or None), or None
        when there is nothing to resume. rank_state is None when the world size changed (the
        caller then restarts RNG and data position; see README)."""
        folders = self.candidates()
        if not folders:
            return None
        errors = []
        for folder in folders:
            try:
                result = self._load_one(folder, model, optimizer, ema, load_global)
            except _LoadFailed as e:
                errors.append(f"{folder}: {e}")
                log.warning("checkpoint %s could not be loaded (%s); trying the previous one", folder, e)
                if self.rank == 0:
                    print(f"WARNING: checkpoint {folder} could not be loaded: {e}. Trying the previous one.", flush=True)
                continue
            self.loaded_folder = folder
            self._last_saved_step = int(result[0]["step"])  # never re-save into the folder we came from
            if errors and self.rank == 0:
                print(f"WARNING: resumed from older checkpoint {folder} after: {'; '.join(errors)}", flush=True)
            return result
        raise CheckpointLoadError(
            "checkpoints exist but none could be loaded, refusing to start from step 0:\n  " + "\n  ".join(errors)
            + "\nFix or remove the broken folders, or set checkpoint.resume=none with a new output_dir"
        )

    def _load_one(self, folder: Path, model, optimizer, ema, load_global) -> tuple[dict, Optional[dict]]:
        # Each rank checks what it will read; the ranks agree before any collective load, so one
        # rank's broken file makes all of them move on together.
        problem = _check_files(folder, self.rank)
        saved_world = None
        global_state: dict = {}
        if problem is None:
            try:
                with open(folder / "trainer_state.json") as f:
                    global_state = json.load(f)
                saved_world = int(global_state["world_size"])
            except (OSError, ValueError, KeyError) as e:
                problem = f"trainer_state.json unreadable: {e}"
        if problem is None:
            _check_compatible(folder, global_state, self.format, self.world_size)
            if self.zero is not None:
                problem = self.zero.missing_files(folder)
        rank_state = None
        if problem is None and saved_world == self.world_size:
            try:
                rank_state = torch.load(folder / f"rank_{self.rank}.pt", weights_only=False)
            except Exception as e:  # truncated or corrupt pickle: report which file
                problem = f"rank_{self.rank}.pt unreadable: {type(e).__name__}: {e}"
        _agree(problem)
        ema.load_meta_state_dict(global_state["ema"])
        if self.zero is not None:
            try:
                self.zero.load(folder, ema)
                problem = None
            except Exception as e:  # a truncated file on one rank: every rank must move on together
                problem = f"{type(e).__name__}: {str(e)[:300]}"
            _agree(problem)
            load_global(global_state)
            return global_state, rank_state
        try:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd, "ema": ema.tensor_state_dict()}
            dcp.load(state, checkpoint_id=str(folder))
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        except (Exception, CheckpointException) as e:  # DCP raises CheckpointException (a BaseException) on every rank
            raise _LoadFailed(_name_broken_file(folder, e)) from e
        load_global(global_state)
        return global_state, rank_state


class _LoadFailed(Exception):
    pass


def _check_files(folder: Path, rank: int) -> Optional[str]:
    if not (folder / "trainer_state.json").is_file():
        return "no trainer_state.json"
    if not checkpoint_is_complete(folder):
        return "no .metadata or zero/ (incomplete checkpoint)"
    return None


def _check_compatible(folder: Path, global_state: dict, fmt: str, world_size: int) -> None:
    """Refuse, without trying older folders (they would fail the same way), a checkpoint this run
    cannot read: written by the other backend, or by DeepSpeed on another world size."""
    saved = global_state.get("format", "dcp")
    if saved != fmt:
        how = {"dcp": "dist.strategy=fsdp2 (or ddp)", "zero": "dist.strategy=deepspeed"}
        raise CheckpointLoadError(
            f"{folder} was written with {how.get(saved, saved)} but this run uses {how[fmt]}: resume it with "
            f"{how.get(saved, saved)}, or export it (`sd-train export --checkpoint {folder} --weights raw`) and "
            "start a new run from the export with model.pretrained_path"
        )
    saved_world = int(global_state["world_size"])
    if fmt == "zero" and saved_world != world_size:
        raise CheckpointLoadError(
            f"{folder} holds DeepSpeed ZeRO partitions of {saved_world} ranks and this run has {world_size}: DeepSpeed "
            f"checkpoints resume on the same world size. Relaunch with {saved_world} processes, or export it "
            f"(`sd-train export --checkpoint {folder}`) and start a new run from the export with model.pretrained_path. "
            "FSDP2 checkpoints (dist.strategy=fsdp2) reshard to any world size"
        )


def _agree(problem: Optional[str]) -> None:
    """All ranks learn every rank's problem; any problem fails the folder everywhere."""
    problems = [problem]
    if dist.is_initialized() and dist.get_world_size() > 1:
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
    bad = [f"rank {r}: {p}" for r, p in enumerate(problems) if p]
    if bad:
        raise _LoadFailed("; ".join(bad))


def _name_broken_file(folder: Path, err: Exception) -> str:
    """DCP's errors do not always name the file; find shard files that are shorter than the
    metadata says, so the warning points at the culprit."""
    text = f"{type(err).__name__}: {str(err)[:300]}"
    try:
        md = dcp.FileSystemReader(str(folder)).read_metadata()
        need: dict[str, int] = {}
        for info in (md.storage_data or {}).values():
            name = info.relative_path
            need[name] = max(need.get(name, 0), info.offset + info.length)
        short = [n for n, size in need.items() if not (folder / n).is_file() or (folder / n).stat().st_size < size]
        if short:
            return f"truncated or missing shard file(s) {[str(folder / n) for n in sorted(short)]} ({text})"
    except Exception:  # the metadata itself is unreadable: the original error says enough
        pass
    return text
