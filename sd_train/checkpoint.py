"""Per-rank checkpoints, written atomically, with newest-first fallback on resume.

Layout of `<output_dir>/checkpoints/step_00000100/` (names in sd_train.paths):
    trainer_state.json   the registered global states (step, LR schedule, EMA window, resolved
                         config), the world size and the tensor format
    rank_R.pt            rank R's registered states: RNG generators and data-loader position
    tensors              the Strategy's: DCP's `.metadata` + `__R_0.distcp` (FSDP2/DDP), or
                         DeepSpeed's `zero/` + `ema_rank_R.pt`

A step folder is first written as `.step_00000100.partial` and renamed once every rank is done,
so a folder with the final name is complete by construction; a crash leaves only a `.partial`
folder, which never counts and is cleaned up. We never save into an existing folder (DCP's
FileSystemWriter would overwrite in place and could mix old and new shards).

Saving is due every `checkpoint.every_steps` steps, at the last step, and (with
`checkpoint.every_minutes`) once that much wall time has passed on rank 0's clock; the ranks learn
rank 0's vote (`clock_vote`) in the loop's per-step all-reduce. Each finished save leaves its
figures for the loop to log (`take_figures`): the time it blocked the loop, its total time and the
bytes per rank.

Loading goes newest-first: a checkpoint that fails to load (a truncated shard, a missing rank file,
a trainer_state.json that lacks an entry) is reported by file name and the previous one is tried.
Rank 0 lists the folders to try, for every rank, so a rank with a lagging view of a network file
system cannot load another step; each rank checks the files it reads, and the ranks agree on each
folder. If checkpoints exist but none loads, the run stops: it never silently starts again from
step 0.

Retention renames a dropped folder to a name that never counts and deletes it on a background
thread, so the other ranks never wait in a collective for rank 0's rmtree.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from sd_train import dcp_io
from sd_train.background_writer import BackgroundWriter
from sd_train.checksums import complete_manifest, file_rank, verify
from sd_train.config import CheckpointArgs
from sd_train.ema.contracts import Shadow
from sd_train.errors import CheckpointLoadError
from sd_train.parallel.strategy import AsyncSave
from sd_train.paths import (
    checkpoint_is_complete,
    complete_steps,
    incompatibility,
    partial_dir,
    partial_step,
    step_dir,
)
from sd_train.rollback import ResumePlan, broken_note, describe_rollback, resume_plan, start_branch

log = logging.getLogger(__name__)
T = TypeVar("T")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Loaded:
    """What a resume found: the folder, and the world size that wrote it."""

    folder: Path
    step: int
    saved_world_size: int


@dataclass
class _InFlight:
    """An async save between `save` and its rename: what the loop has been blocked by so far."""

    step: int
    save: AsyncSave
    started: float
    blocked: float
    written_at: Optional[float] = None  # set by the writer thread when the files are done
    staging_waited: bool = False


class Checkpointer:
    """Owns checkpoint cadence, the atomic write, retention and resume of everything registered.

    Registered once at construction: the Strategy (model, optimizer and their tensor I/O), the
    `shadows` of the weights by checkpoint key (sd_train.ema.contracts.Shadow: the EMA under "ema",
    the post-hoc profiles under "posthoc"; tensors through the Strategy, small state in
    trainer_state.json), `global_states` (the same on every rank: trainer progress, LR schedule),
    `rank_states` (this rank's: RNG, data position) and the resolved config. `save(step)` then
    needs nothing else.

    On a world-size change a rank's own `rank_R.pt` has no counterpart; each rank state is then
    handed every saved rank's state, by rank, through `load_state_dict_from_other_world(states)`."""

    def __init__(
        self,
        args: CheckpointArgs,
        output_dir: str,
        rank: int,
        world_size: int,
        max_steps: int,
        strategy,
        shadows: dict[str, Shadow],
        global_states: dict[str, Stateful],
        rank_states: dict[str, Stateful],
        config: dict,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.args = args
        self.strategy = strategy
        self.shadows = dict(shadows)
        self.global_states = global_states
        self.rank_states = rank_states
        self.config = config
        self.root = Path(output_dir) / "checkpoints"
        self.rank = rank
        self.world_size = world_size
        self.max_steps = max_steps
        self._pending: Optional[_InFlight] = None
        # Seconds, for the time cadence and the save figures; a fake one in the tests.
        self._clock = clock
        self._last_save_time = clock()
        self._figures: list[dict[str, float]] = []
        # Async saves run their collectives on a group of their own, so the background thread
        # never interleaves with the training loop's collectives on the default group. It gets
        # dist.timeout_s like every group (sd_train.parallel.process_group.timeout_for_later_groups).
        # `auto` is decided by the startup memory plan; one left unresolved saves synchronously.
        self._pg = dist.new_group(backend="gloo") if args.async_save is True and dist.is_initialized() else None
        # Folders retention drops are deleted off the training thread: an rmtree of a multi-GB
        # step folder on rank 0 held every other rank in the next collective (see _discard).
        self._deleter = BackgroundWriter()
        self.fault_hook: Callable[[str, int], None] = lambda phase, step: None  # set by the trainer (faults)
        self.loaded_folder: Optional[Path] = None
        self._last_saved_step: Optional[int] = None

    # ---- saving ---------------------------------------------------------------------------------

    def should_save(self, step: int, last_step: bool = False, clock_due: bool = False) -> bool:
        return last_step or clock_due or step % self.args.every_steps == 0

    def clock_vote(self) -> float:
        """1.0 on rank 0 once `checkpoint.every_minutes` have passed since the last save began (or
        the start), else 0.0; always 0.0 on the other ranks, whose clocks do not count. Summed over
        the ranks (the loop folds it into the step's all-reduce), it is rank 0's decision on every
        rank, which the loop hands to `save(step, clock_due=...)`."""
        if self.rank != 0 or self.args.every_minutes <= 0:
            return 0.0
        return 1.0 if self._clock() - self._last_save_time >= 60.0 * self.args.every_minutes else 0.0

    def _global_state(self, step: int) -> dict[str, Any]:
        state = {name: obj.state_dict() for name, obj in self.global_states.items()}
        state.update({name: shadow.meta_state_dict() for name, shadow in self.shadows.items()}, config=self.config)
        return {
            **state,
            "step": step,
            "world_size": self.world_size,
            "format": self.strategy.checkpoint_format,
            "shadows": list(self.shadows),  # what was written: a missing entry is then damage, not a setting
        }

    def save(self, step: int, force: bool = False, clock_due: bool = False) -> bool:
        """Save if the cadence says so (or `force`, or `clock_due`: the agreed `clock_vote`).
        Collective: every rank calls it every step, with the same arguments."""
        self.poll()
        if not (force or self.should_save(step, last_step=step == self.max_steps, clock_due=clock_due)):
            return False
        if step == self._last_saved_step:
            # Already saved at this step (a preemption save right after a cadence save). Decided from
            # memory, not the file system: rank 0 may not have renamed the folder yet when another
            # rank looks, and ranks that disagree here would deadlock in the save's collectives.
            return False
        self.wait()  # one save in flight at a time
        started = self._last_save_time = self._clock()
        self._last_saved_step = step
        tmp = partial_dir(self.root, step)
        if self.rank == 0:
            if tmp.exists():
                self._discard(tmp)  # left by a crash: never write into it
            tmp.mkdir(parents=True)
        dist.barrier()
        torch.save({name: obj.state_dict() for name, obj in self.rank_states.items()}, tmp / f"rank_{self.rank}.pt")
        if self.rank == 0:
            with open(tmp / "trainer_state.json", "w") as f:
                json.dump(self._global_state(step), f, indent=1)
        self.fault_hook("after_rank_files", step)
        # Each rank's checksum manifest, written once its files are (sd_train.checksums).
        pending = self.strategy.save(
            tmp, self.shadows, process_group=self._pg, on_written=lambda: complete_manifest(tmp, self.rank)
        )
        if pending is not None:
            flight = _InFlight(step, pending, started, blocked=self._clock() - started)
            pending.written.add_done_callback(lambda _: setattr(flight, "written_at", self._clock()))
            self._pending = flight
            self.fault_hook("during_async_save", step)
            return True
        self.fault_hook("after_shards", step)
        if not self.strategy.writes_completion_marker:
            dist.barrier()  # every rank's files are on disk before rank 0 renames the folder
        size = self._finalize(step)
        elapsed = self._clock() - started
        self._figures.append(_figures(step, blocked=elapsed, total=elapsed, size=size))
        return True

    def poll(self) -> None:
        """Finish an async save whose background write is done (cheap; called every step)."""
        if self._pending is not None and self._pending.save.written.done():
            self.wait()

    def wait_staged(self) -> None:
        """Block until the in-flight async save has copied the tensors off the live state. The
        loop calls it before every optimizer step, the first thing that changes them; the time
        spent here counts as the save's blocked time. The write itself is never waited for here."""
        flight = self._pending
        if flight is None or flight.staging_waited:
            return
        t = self._clock()
        flight.save.staged.result()
        flight.blocked += self._clock() - t
        flight.staging_waited = True

    def wait(self) -> None:
        """Block until the in-flight async save (if any) is written, then finalize it. The loop
        is blocked meanwhile, so the wait counts as the save's blocked time."""
        flight = self._pending
        if flight is None:
            return
        self._pending = None
        t = self._clock()
        flight.save.written.result()
        flight.blocked += self._clock() - t
        size = self._finalize(flight.step)
        written_at = flight.written_at if flight.written_at is not None else self._clock()
        self._figures.append(_figures(flight.step, flight.blocked, written_at - flight.started, size))

    def take_figures(self) -> list[dict[str, float]]:
        """The figures of the saves finished since the last call, for the loop to log: the
        saved step, `checkpoint/blocked_s` (the time the loop waited: the whole save when
        synchronous; when async, the call itself plus the wait for staging before the next
        optimizer step, plus any wait for the write), `checkpoint/save_s` (from the start to the
        files being written) and, on rank 0, `checkpoint/bytes_per_rank` (the largest of any
        rank's files in the step folder, read from the file system after the rename). Times are
        this rank's; the loop logs rank 0's."""
        figures, self._figures = self._figures, []
        return figures

    def close(self) -> None:
        """Finish the in-flight save, release the staging buffers and wait for the deletions
        (end of the run)."""
        self.wait()
        self.strategy.close()
        self._deleter.close()

    def _finalize(self, step: int) -> Optional[int]:
        """Rank 0 renames the partial folder once it is complete (DCP's coordinator writes
        `.metadata` only after every rank reported its shards written), then applies retention.
        Returns the bytes of the largest rank's files there (rank 0; None on the others)."""
        if self.rank != 0:
            return None
        tmp = partial_dir(self.root, step)
        if not checkpoint_is_complete(tmp):
            raise RuntimeError(f"checkpoint at step {step}: {tmp} has no .metadata (or zero/) after save; not renaming")
        complete_manifest(tmp, 0)  # rank 0's files now include .metadata
        final = step_dir(self.root, step)
        if final.exists():
            # A folder of this step that failed to load (we resumed from an older one and came
            # back to this step). Keep it for inspection under a name that never counts.
            os.replace(final, final.with_name(f"{final.name}.broken-{int(time.time())}"))
        os.replace(tmp, final)
        log.debug("checkpoint saved: %s", final)
        size = max(rank_bytes(final).values(), default=0)
        self.fault_hook("before_retention", step)
        self.apply_retention()
        return size

    def apply_retention(self) -> None:
        """Keep the newest `keep_last_k` complete checkpoints; drop stale partial folders older than
        the newest complete one. The newest complete checkpoint is never deleted."""
        steps = complete_steps(self.root)
        if not steps:
            return
        newest = steps[-1]
        if self.args.keep_last_k >= 2:
            for s in steps[: -self.args.keep_last_k]:
                self._discard(step_dir(self.root, s))
        in_flight = self._pending.step if self._pending is not None else None
        for entry in self.root.iterdir():
            s = partial_step(entry.name)
            if s is not None and s <= newest and s != in_flight:
                self._discard(entry)
            elif entry.name.endswith(DISCARDED_SUFFIX):  # a deletion cut short by a crash
                self._deleter.submit(shutil.rmtree, entry, True)

    def _discard(self, folder: Path) -> None:
        """Delete `folder` off the training thread. It is first renamed to a name that never counts
        (`.NAME.<n>.deleting`: a metadata operation, as quick as the rename that completes a
        save), so from this moment nothing takes it for a checkpoint; the deletion itself runs on
        the background thread, and one cut short by a crash is finished by a later retention."""
        trash = folder.with_name(f".{folder.name}.{time.time_ns()}{DISCARDED_SUFFIX}")
        try:
            os.replace(folder, trash)
        except OSError:
            trash = folder  # not renamable: deleted where it is, still off the training thread
        self._deleter.submit(shutil.rmtree, trash, True)

    # ---- loading --------------------------------------------------------------------------------

    def plan(self) -> ResumePlan:
        """Folders to try, newest first, per `checkpoint.resume` / `checkpoint.load_step`, and the
        named checkpoint a rollback branches from (sd_train.rollback)."""
        return resume_plan(self.root.parent, self.args.resume, self.args.load_step)

    def candidates(self) -> list[Path]:
        return self.plan().candidates

    def load(self) -> Optional[Loaded]:
        """Load the newest loadable checkpoint into everything registered, or return None when there
        is nothing to resume. Rank 0 plans the folders to try, for every rank (`_rank0s`); each rank
        then checks the files it reads itself, and the ranks agree on each folder. After a rollback
        (a named checkpoint, not a relaunch of the same command), the old branch's later
        checkpoints and snapshots are moved aside."""
        plan = _rank0s(self.plan, self.rank)
        folders = plan.candidates
        if not folders:
            return None
        note = broken_note(self.root.parent)
        if note:
            log.warning(note)
        errors = []
        for folder in folders:
            try:
                loaded = self._load_one(folder)
            except _LoadFailed as e:
                errors.append(f"{folder}: {e}")
                log.warning(f"checkpoint {folder} could not be loaded: {e}. Trying the previous one.")
                continue
            self.loaded_folder = folder
            self._last_saved_step = loaded.step  # never re-save into the folder we came from
            if errors:
                log.warning(f"resumed from older checkpoint {folder} after: {'; '.join(errors)}")
            if plan.branch_from is not None and self.rank == 0:
                log.info(
                    describe_rollback(start_branch(self.root.parent, plan.branch_from, loaded.step), self.root.parent)
                )
            return loaded
        raise CheckpointLoadError(
            "checkpoints exist but none could be loaded, refusing to start from step 0:\n  "
            + "\n  ".join(errors)
            + "\nFix or remove the broken folders, or set checkpoint.resume=none with a new output_dir"
        )

    def _read_small_files(self, folder: Path) -> tuple[dict, list[dict], Optional[str]]:
        """(trainer state, the rank states this rank reads, problem): its own rank file, or on
        another world size every saved rank's file, by rank (the data position spreads the rest of
        the epoch over the new ranks from all of them)."""
        problem = _check_files(folder)
        global_state: dict = {}
        if problem is None:
            try:
                with open(folder / "trainer_state.json") as f:
                    global_state = json.load(f)
                problem = self._lacks(global_state)
            except (OSError, ValueError) as e:
                problem = f"trainer_state.json unreadable: {e}"
        if problem is not None:
            return global_state, [], problem
        _check_compatible(folder, global_state, self.strategy.checkpoint_format, self.world_size)
        problem = self.strategy.missing_files(folder)
        saved_world = int(global_state["world_size"])
        if problem is None:  # every byte as written, before anything is read from the folder
            problem = verify(folder, saved_world, self.rank, self.world_size)
        ranks = [self.rank] if saved_world == self.world_size else list(range(saved_world))
        rank_states: list[dict] = []
        for rank in ranks if problem is None else []:
            rank_file = folder / f"rank_{rank}.pt"
            try:
                # Tensors, numbers and lists only (sd_train.rng): nothing in a checkpoint runs code.
                rank_states.append(torch.load(rank_file, weights_only=True))
            except Exception as e:  # truncated or corrupt pickle: report which file
                problem = f"{rank_file.name} unreadable: {type(e).__name__}: {e}"
                break
        for rank, state in zip(ranks, rank_states):
            lacking = [n for n in self.rank_states if not isinstance(state, dict) or n not in state]
            if lacking:
                problem = f"rank_{rank}.pt lacks {lacking}"
                break
        return global_state, rank_states, problem

    def _written_shadows(self, state: dict) -> list[str]:
        """The shadows a trainer_state.json was written with: its own list, or (written before it
        kept one) those of ours it holds."""
        written = state.get("shadows")
        return list(written) if isinstance(written, list) else [k for k in self.shadows if k in state]

    def _lacks(self, state: Any) -> Optional[str]:
        """What a trainer_state.json lacks of what a load reads (None when nothing): a file that
        parses but misses an entry is as broken as one that does not parse, and falls back the
        same way, before any state is touched."""
        if not isinstance(state, dict):
            return "trainer_state.json is not a JSON object"
        kinds = {"step": int, "world_size": int, **dict.fromkeys(self.global_states, dict)}
        kinds.update(dict.fromkeys((n for n in self.shadows if n in self._written_shadows(state)), dict))
        lacking = [k for k, kind in kinds.items() if not isinstance(state.get(k), kind)]
        return f"trainer_state.json lacks {lacking} (or holds them in another form)" if lacking else None

    def _load_meta(self, folder: Path, global_state: dict) -> Optional[str]:
        """Restore each shadow's small state; a problem (a malformed entry) to agree on, or
        CheckpointLoadError when the checkpoint was written with other shadow settings."""
        written = self._written_shadows(global_state)
        for name, shadow in self.shadows.items():
            if name not in written:
                raise CheckpointLoadError(
                    f"{folder} was written without {name} state (ema.{name} was off) and this run has it on: "
                    f"resume with ema.{name} off, or start a new run"
                )
            try:
                shadow.load_meta_state_dict(global_state[name])
            except ValueError as e:
                raise CheckpointLoadError(f"{folder}: {e}") from e
            except (KeyError, TypeError) as e:
                return f"trainer_state.json: {name} state malformed ({type(e).__name__}: {e})"
        return None

    def _load_one(self, folder: Path) -> Loaded:
        # Each rank checks what it will read; the ranks agree before any collective load, so one
        # rank's broken file makes all of them move on together.
        global_state, rank_states, problem = self._read_small_files(folder)
        _agree(problem)
        _agree(self._load_meta(folder, global_state))
        try:
            self.strategy.load(folder, self.shadows)
            problem = None
        except (Exception, CheckpointException) as e:  # DCP raises CheckpointException (a BaseException)
            problem = self.strategy.describe_load_error(folder, e)
        _agree(problem)  # a truncated file on one rank: every rank must move on together
        for name, obj in self.global_states.items():
            obj.load_state_dict(global_state[name])
        saved_world = int(global_state["world_size"])
        for name, obj in self.rank_states.items():
            if saved_world == self.world_size:
                obj.load_state_dict(rank_states[0][name])
            else:
                obj.load_state_dict_from_other_world([state[name] for state in rank_states])
        return Loaded(folder, int(global_state["step"]), saved_world)

    def init_from(self, folder: Path) -> None:
        """Start this run from another run's UNet weights and optimizer state (checkpoint.init_from):
        everything else registered stays fresh. Refused, naming the tensors, when the shapes differ."""
        folder = Path(folder)
        with open(folder / "trainer_state.json") as f:
            saved = json.load(f)
        _check_compatible(folder, saved, self.strategy.checkpoint_format, self.world_size)
        try:
            stored = dcp_io.read_metadata(folder).state_dict_metadata
        except Exception as e:  # noqa: BLE001 -- an unreadable or refused .metadata: say which and why
            raise CheckpointLoadError(f"checkpoint.init_from={folder}: .metadata unreadable: {e}") from e
        mismatched = []
        for name, p in self.strategy.module.named_parameters():
            meta = stored.get(f"model.{name}")
            if meta is None or tuple(meta.size) != tuple(p.shape):
                mismatched.append(f"{name}: here {tuple(p.shape)}, saved {tuple(meta.size) if meta else 'missing'}")
        if mismatched:
            raise CheckpointLoadError(
                f"checkpoint.init_from={folder}: {len(mismatched)} UNet tensors do not match this run's model "
                f"(e.g. {'; '.join(mismatched[:3])}): use the same model config as the run that wrote it"
            )
        try:
            self.strategy.load_model_and_optimizer(folder)
        except (Exception, CheckpointException) as e:
            raise CheckpointLoadError(
                f"checkpoint.init_from={folder}: {self.strategy.describe_load_error(folder, e)}"
            ) from e
        log.info(
            f"initialised from {folder} (step {saved['step']} of that run): UNet weights and optimizer state; "
            "step, LR schedule, data position and EMA start fresh"
        )


DISCARDED_SUFFIX = ".deleting"


class _LoadFailed(Exception):
    pass


def _figures(step: int, blocked: float, total: float, size: Optional[int]) -> dict[str, float]:
    figures = {"checkpoint/step": step, "checkpoint/blocked_s": blocked, "checkpoint/save_s": total}
    return figures if size is None else {**figures, "checkpoint/bytes_per_rank": size}


def rank_bytes(folder: Path) -> dict[int, int]:
    """Bytes of the files of `folder` (recursively) by the rank that wrote them."""
    sizes: dict[int, int] = {}
    for path in folder.rglob("*"):
        if path.is_file():
            rank = file_rank(path.name)
            sizes[rank] = sizes.get(rank, 0) + path.stat().st_size
    return sizes


def _check_files(folder: Path) -> Optional[str]:
    if not (folder / "trainer_state.json").is_file():
        return "no trainer_state.json"
    if not checkpoint_is_complete(folder):
        return "no .metadata or zero/ (incomplete checkpoint)"
    return None


def _check_compatible(folder: Path, global_state: dict, fmt: str, world_size: int) -> None:
    """Refuse, without trying older folders (they would fail the same way), a checkpoint this run
    cannot read (preflight refuses it before the launch writes anything; this is the backstop)."""
    problem = incompatibility(folder, global_state, fmt, world_size)
    if problem is not None:
        raise CheckpointLoadError(problem)


def _rank0s(decide: Callable[[], T], rank: int) -> T:
    """Rank 0's answer to `decide()`, on every rank. What a rank finds in a shared folder depends
    on its view of it: on a network file system a rank's listing can lag behind rank 0's, and ranks
    that listed the checkpoints themselves could try, and load, different steps."""
    answer = [decide() if rank == 0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(answer, src=0)
    return answer[0]  # type: ignore[return-value]


def _agree(problem: Optional[str]) -> None:
    """All ranks learn every rank's problem; any problem fails the folder everywhere."""
    problems = [problem]
    if dist.is_initialized() and dist.get_world_size() > 1:
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
    bad = [f"rank {r}: {p}" for r, p in enumerate(problems) if p]
    if bad:
        raise _LoadFailed("; ".join(bad))
