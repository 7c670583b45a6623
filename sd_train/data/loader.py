"""The training loader (`TrainLoader`) over one rank's `ShardStream`, its resumable state, and
the validation samples. The stream itself: `sd_train.data.stream`.

Position = per worker (epoch, offset): raw samples emitted from the shuffle buffer in that epoch.
Every batch carries its worker's position and cumulative counts after the batch; `TrainLoader`
keeps the latest per worker as seen by the main process (batches the DataLoader or the device
stager holds ahead do not count) and takes batches in a fixed worker rotation of its own, so the
order survives a restart.
`load_state_dict` makes each worker replay its current epoch up to its offset without decoding,
then go on: the batches after a resume are exactly those of an uninterrupted run. With
`data.buckets` a position also holds the worker's bucket buffers (`sd_train.data.batching`): the
samples waiting in them are read back and decoded again, and nothing else is.

Changed world_size or num_workers (or micro_batch_size, shuffle_buffer) in `data.mode=epoch`: the
resume is elastic (`sd_train.data.elastic`): every position also records how far its reader got
and what its shuffle buffer holds, so the saved positions of all ranks (`load_saved_world`; of
this rank alone when only the worker count changed) name every sample not handed out yet; that
rest is spread over the new slots, each sample read once, and the next epochs are split the
normal way for the new size. Only the order differs from a straight run.

Changed seed, mode or shard list (or, with buckets, the bucket set), `data.mode=resampled`, or
positions that do not record their reader: the saved offsets mean nothing any more. The loader then
warns once and starts every worker at the beginning of the next epoch (highest saved epoch + 1):
the rest of the interrupted epoch is skipped, and no sample is seen twice within an epoch. Ranks
must agree on that epoch: the trainer should all-reduce (MAX) `TrainLoader.reshard_epoch` (None
when no change, or an elastic one) and pass it to `start_at_epoch`.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import signal
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader

from sd_train.data.bad_input import (
    BAD_CATEGORIES,
    MAX_BAD_SHARDS,
    BadInputLog,
    BadSample,
)
from sd_train.data.buckets import bucket_set, downsampling_factor, pixel_factor
from sd_train.data.decode import (
    CaptionSource,
    DecodedSample,
    ImageTransform,
    decode_image_sample,
    stack_geometry,
    stack_pixels,
)
from sd_train.data.elastic import ELASTIC_CHANGES, reshard
from sd_train.data.filters import MetadataFilter
from sd_train.data.precomputed import check_precomputed, decode_precomputed_sample
from sd_train.data.prefetch import NO_STAGING, Stager
from sd_train.data.sources import check_epoch_shard_count, expand_sources
from sd_train.data.stream import Decoder, ShardStream, WorkerPosition
from sd_train.data.tar import read_shards
from sd_train.data.workers import worker_start_method

STATE_VERSION = 1
log = logging.getLogger(__name__)
_Commit = tuple[int, WorkerPosition, int]  # (worker, its position after a batch, next worker in the rotation)


def select_decoder(precomputed: bool) -> Decoder:
    """The per-sample decode function for a shard layout: images + captions, or the latents and
    text embeddings `sd-train precompute` writes. The stream, replay and counting are the same."""
    return decode_precomputed_sample if precomputed else decode_image_sample


def _ignore_termination(worker_id: int) -> None:  # noqa: ARG001
    """Loader workers ignore SIGTERM/SIGINT. A preemption signal reaches the whole process group;
    the main process handles it (agree, save, exit 0) and shuts its workers down itself. A worker
    killed first would make the main process crash in its next collective instead."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _served_worker_init(rank_pid: int, worker_id: int) -> None:
    """`_ignore_termination`, and a watch on the rank for workers started from the forkserver. Their
    parent is the server, not the rank, so torch's own check (the parent's pid changed) never fires,
    and the server outlives a killed rank while its workers hold its pipe: a rank killed with
    SIGKILL left its server and 8 workers (1.4 GB) running. The watch ends the worker once the
    rank is gone."""
    _ignore_termination(worker_id)
    threading.Thread(target=_exit_when_gone, args=(rank_pid,), daemon=True, name="rank-watch").start()


def _exit_when_gone(pid: int, every_s: float = 1.0) -> None:
    while True:
        time.sleep(every_s)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:  # a pid reused by another user's process: ours is gone
            os._exit(0)


def worker_context(method: str) -> multiprocessing.context.BaseContext:
    """The multiprocessing context of the loader's workers (sd_train.data.workers says which). The
    forkserver preloads this module (and so torch and the data modules), so each worker forks from
    a process that holds those and nothing else; it starts on the first iterator, once per process."""
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload([__name__])
    return ctx


class TrainLoader:
    """Owns the DataLoader over one rank's ShardStream, the latest position of each worker as seen
    by the main process, and the worker rotation that fixes the batch order.

    Iterating continues from the recorded positions (a second `iter()` does not restart). Fresh
    worker processes are started per iterator (persistent_workers=False): a persistent worker's
    own position is ahead of the main process by its prefetched batches, so it cannot resume.
    """

    def __init__(
        self,
        dataset: ShardStream,
        num_workers: int,
        prefetch_factor: int = 4,
        pin_memory: bool = False,
        stager: Stager = NO_STAGING,
        worker_start: str = "fork",
    ) -> None:
        if max(1, num_workers) != dataset.num_workers:
            raise ValueError(f"num_workers={num_workers} but the stream was planned for {dataset.num_workers}")
        self.dataset = dataset
        self.num_workers = num_workers
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.stager = stager
        """Copies batches to the device one ahead (sd_train.data.prefetch); NO_STAGING yields them as read."""
        self.worker_start = worker_start
        """`fork` or `forkserver` (sd_train.data.workers)."""
        self._positions = [WorkerPosition() for _ in range(dataset.num_workers)]
        self._next_worker = 0
        self.reshard_epoch: Optional[int] = None
        """Set by load_state_dict when the saved state could not be resumed exactly (see module doc)."""

    def _dataloader(self) -> DataLoader:
        self.dataset.start = {w: WorkerPosition.from_dict(p.to_dict()) for w, p in enumerate(self._positions)}
        extra: dict[str, Any] = {}
        if self.num_workers > 0:
            extra = {
                "prefetch_factor": self.prefetch_factor,
                "persistent_workers": False,
                "worker_init_fn": (
                    functools.partial(_served_worker_init, os.getpid())
                    if self.worker_start == "forkserver"
                    else _ignore_termination
                ),
                "multiprocessing_context": worker_context(self.worker_start),
            }
        # A private generator: without one, creating the iterator draws a base seed from the global
        # torch RNG, which would shift the training noise of a resumed run against a straight one.
        # The stream's own randomness is seeded explicitly and does not use this seed.
        gen = torch.Generator().manual_seed(0)
        return DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=gen,
            **extra,
        )

    def __iter__(self) -> Iterator[dict]:
        """Batches in worker rotation order; each one's position is recorded as it is handed out."""
        items = iter(self._dataloader())
        try:
            yield from self._hand_out(self._in_rotation(items))
        finally:
            # Stop the workers now, also when one raised (e.g. BadDataError): they ignore SIGTERM
            # (see _ignore_termination), so workers left to the garbage collector would keep the
            # process from exiting while a traceback still holds their iterator.
            shutdown = getattr(items, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _in_rotation(self, items: Iterator[dict]) -> Iterator[tuple[Optional[dict], _Commit]]:
        """(batch, or None for a worker's end marker; the position to record when it is handed out)."""
        n = self.dataset.num_workers
        pending: dict[int, deque] = {w: deque() for w in range(n)}
        live = list(range(n))
        cursor = self._next_worker
        for item in items:
            pending[item["worker"]].append(item)
            # Hand out batches only in our own rotation: the DataLoader's order restarts at worker
            # 0 on every iterator, ours continues from `_next_worker` across a resume.
            while live and pending[cursor]:
                worker = cursor
                batch = pending[worker].popleft()
                after = live[(live.index(worker) + 1) % len(live)]
                if batch["end"]:
                    live.remove(worker)
                cursor = after if live else 0
                yield (None if batch["end"] else batch), (worker, WorkerPosition.from_dict(batch["position"]), cursor)

    def _hand_out(self, rotation: Iterator[tuple[Optional[dict], _Commit]]) -> Iterator[dict]:
        """Stage each batch as it arrives (sd_train.data.prefetch) and hand it out `lookahead`
        batches later. Positions are recorded in rotation order, each when the batch it belongs
        to (or the next one, for an end marker) is handed out: a staged batch is not consumed."""
        queue: deque[tuple[Optional[dict], _Commit]] = deque()
        staged = 0
        for batch, commit in rotation:
            queue.append((None if batch is None else self.stager.stage(batch), commit))
            staged += batch is not None
            if staged > self.stager.lookahead:
                staged -= 1
                yield self._next_from(queue)
        for _ in range(staged):
            yield self._next_from(queue)
        while queue:  # end markers after the last batch
            self._record(queue.popleft()[1])

    def _next_from(self, queue: deque) -> dict:
        while True:
            batch, commit = queue.popleft()
            self._record(commit)
            if batch is not None:
                return self.stager.ready(batch)

    def _record(self, commit: _Commit) -> None:
        worker, position, cursor = commit
        self._positions[worker] = position
        self._next_worker = cursor

    # -------------------------------------------------------------- progress and bad input

    def samples_seen(self) -> int:
        """Good samples handed to the trainer by this rank."""
        return sum(p.good for p in self._positions)

    def bad_counts(self) -> dict[str, int]:
        """Bad input of this rank by category (sum over workers). All-reduce before judging."""
        return {k: sum(p.bad[k] for p in self._positions) for k in BAD_CATEGORIES}

    def filtered_counts(self) -> dict[str, int]:
        """Samples of this rank rejected by `data.filters`, per rule, then by the bucket misfit reasons
        (sum over workers). Not bad input."""
        rules = self.dataset.filter_names
        counts = dict.fromkeys(rules, 0)
        for p in self._positions:
            for rule, n in p.filtered.items():
                counts[rule] = counts.get(rule, 0) + n
        return counts

    def source_counts(self) -> list[tuple[int, int]]:
        """`data.mix=weighted`: per source, (good samples handed out, highest epoch started) over
        this rank's workers; empty for a concatenated stream. Sum the first, max the second over ranks."""
        if self.dataset.mix != "weighted":
            return []
        out = []
        for i in range(len(self.dataset.sources)):
            states = [p.sources[i] if p.sources else [p.epoch, 0, 0] for p in self._positions]
            out.append((sum(st[2] for st in states), max(st[0] for st in states)))
        return out

    def bucket_counts(self) -> dict[str, tuple[int, int]]:
        """`data.buckets`: per bucket, (samples, micro-batches) this rank's workers emitted; empty on
        the square path. Sum over ranks."""
        if self.dataset.buckets is None:
            return {}
        states = [p.buckets or {} for p in self._positions]
        return {
            name: (
                sum(s.get("samples", {}).get(name, 0) for s in states),
                sum(s.get("batches", {}).get(name, 0) for s in states),
            )
            for name in self.dataset.buckets.names
        }

    def bucket_carried(self) -> int:
        """`data.buckets`: samples of this rank that waited in a bucket buffer through an epoch end."""
        return sum((p.buckets or {}).get("carried", 0) for p in self._positions)

    def samples_read(self) -> int:
        """Good + bad input read by this rank: the denominator of the bad-input share."""
        return self.samples_seen() + sum(self.bad_counts().values())

    def bad_shards(self) -> list[str]:
        """Shards where this rank met bad input (first MAX_BAD_SHARDS)."""
        names = dict.fromkeys(s for p in self._positions for s in p.bad_shards)
        return list(names)[:MAX_BAD_SHARDS]

    # -------------------------------------------------------------- state

    def _identity(self) -> dict[str, Any]:
        d = self.dataset
        ident = {
            "world_size": d.world_size,
            "num_workers": d.num_workers,
            "seed": d.seed,
            "mode": d.mode,
            "shuffle_buffer": d.shuffle_buffer,
            "shards": d.fingerprint(),
        }
        if d.buckets is not None:  # the buffers' state holds per-bucket lists, filled to this batch size
            ident |= {"buckets": ",".join(d.buckets.names), "micro_batch_size": d.batch_size}
        return ident

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, one per rank (save it under the rank's name):

        identity: version, rank, world_size, num_workers (>= 1), seed, mode, shuffle_buffer, shards
        (fingerprint of shard base names); order: next_worker (the rotation), workers (per worker:
        epoch, offset, good, bad {category: n}, bad_shards, filtered, sources, and with `data.buckets`
        the bucket buffers' state `buckets`, as sd_train.data.batching documents it); summary, not read
        back: samples_seen, samples_read, bad, bad_shards, filtered, sources (this rank's sums;
        `data.mix=weighted`), bucket_counts {bucket: [samples, micro-batches]} and bucket_carried
        (`data.buckets`). With buckets the identity also holds the bucket names (`buckets`) and
        micro_batch_size, and `good` counts samples decoded, including those still waiting.
        """
        return {
            "version": STATE_VERSION,
            "rank": self.dataset.rank,
            **self._identity(),
            "next_worker": self._next_worker,
            "workers": [p.to_dict() for p in self._positions],
            "samples_seen": self.samples_seen(),
            "samples_read": self.samples_read(),
            "bad": self.bad_counts(),
            "bad_shards": self.bad_shards(),
            "filtered": self.filtered_counts(),
            "sources": [{"samples": n, "epoch": e} for n, e in self.source_counts()],
            **self._bucket_summary(),
        }

    def _bucket_summary(self) -> dict[str, Any]:
        if self.dataset.buckets is None:
            return {}
        counts = {name: list(c) for name, c in self.bucket_counts().items()}
        return {"bucket_counts": counts, "bucket_carried": self.bucket_carried()}

    def _changes(self, sd: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Identity fields of a saved state that differ from this loader's: {field: (saved, here)}."""
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {sd.get('version')!r}; this code reads version {STATE_VERSION}")
        ident = self._identity()
        # A bucketed state in a square run has buckets the square identity does not name: a change too.
        ident |= {k: None for k in ("buckets", "micro_batch_size") if k in sd and k not in ident}
        return {k: (sd.get(k), v) for k, v in ident.items() if sd.get(k) != v}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Resume exactly where `sd` (this rank's saved state) was taken. With only the worker count
        changed (or micro_batch_size, shuffle_buffer), the rest of this rank's epoch is spread over
        its new workers (`sd_train.data.elastic`); with anything else changed, every worker starts
        the next epoch (warns). A changed world size needs every saved rank: `load_saved_world`."""
        changed = self._changes(sd)
        if "world_size" not in changed and sd["rank"] != self.dataset.rank:
            raise ValueError(
                f"data state of rank {sd['rank']} loaded into rank {self.dataset.rank}: load each rank's own file"
            )
        if not changed:
            self._positions = [WorkerPosition.from_dict(w) for w in sd["workers"]]
            self._next_worker = int(sd["next_worker"])
            self.reshard_epoch = None
            return
        if "world_size" not in changed and self._elastic(changed) and self._reshard([sd], world=1, rank=0):
            return
        self._start_next_epoch([sd], changed)

    def load_saved_world(self, states: list[dict[str, Any]]) -> None:
        """Resume from the states of every rank of a run of another world size (by rank): the rest of
        the interrupted epochs is spread over the new ranks and workers, each sample once
        (`sd_train.data.elastic`); when that cannot be done (resampled mode, a changed seed or shard
        list), every worker starts the next epoch (warns)."""
        changed = self._changes(states[0])
        if "world_size" not in changed:
            mine = [sd for sd in states if sd["rank"] == self.dataset.rank]
            self.load_state_dict(mine[0] if mine else states[0])
            return
        if len(states) != int(states[0]["world_size"]):
            raise ValueError(f"data resume needs the state of each of the {states[0]['world_size']} saved ranks")
        if self._elastic(changed) and self._reshard(states, self.dataset.world_size, self.dataset.rank):
            return
        self._start_next_epoch(states, changed)

    def _elastic(self, changed: dict[str, tuple[Any, Any]]) -> bool:
        return self.dataset.mode == "epoch" and set(changed) <= ELASTIC_CHANGES

    def _reshard(self, states: list[dict[str, Any]], world: int, rank: int) -> bool:
        done = reshard(states, self.dataset, world, rank)
        if done is None:
            return False
        self._positions, self._next_worker, self.reshard_epoch = done.positions, 0, None
        log.warning(done.message)
        return True

    def _start_next_epoch(self, states: list[dict[str, Any]], changed: dict[str, tuple[Any, Any]]) -> None:
        epoch = max(WorkerPosition.from_dict(w).latest_epoch() for sd in states for w in sd["workers"]) + 1
        what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        why = (
            "data.mode=resampled has no exactly-once promise to keep"
            if self.dataset.mode == "resampled"
            else "the saved positions do not apply"
        )
        warnings.warn(
            f"data resume: {what}; {why}, so every worker of rank {self.dataset.rank} starts at the beginning of "
            f"epoch {epoch} (the rest of the interrupted epoch is skipped; bad-input counts restart at 0)",
            stacklevel=3,
        )
        self.reshard_epoch = epoch
        self.start_at_epoch(epoch)

    def start_at_epoch(self, epoch: int) -> None:
        """Put every worker at the start of `epoch` (after a reshard, with the epoch agreed by all ranks)."""
        self._positions = [WorkerPosition(epoch=epoch) for _ in range(self.dataset.num_workers)]
        self._next_worker = 0


def build_train_loader(
    cfg: Any,
    rank: int,
    world_size: int,
    max_epochs: Optional[int] = None,
    tokenize: Optional[Callable[[list[str]], dict[str, torch.Tensor]]] = None,
    stager: Stager = NO_STAGING,
    rank_param_bytes: int = 0,
) -> TrainLoader:
    """The training loader of `rank` from `cfg` (a TrainConfig): `cfg.data.*`, `cfg.seed`, `cfg.micro_batch_size`.
    `tokenize`: add the captions' token ids (the model's `CaptionTokenizer`: `input_ids`, and
    `input_ids_2` for SDXL) to image batches, in the workers.
    `stager`: copy batches to the device one ahead (sd_train.data.prefetch). `rank_param_bytes`:
    the UNet parameter bytes this rank holds, for `data.worker_start=auto`."""
    d = cfg.data
    if d.precomputed:
        check_precomputed(d.train_shards, cfg)  # ConfigError naming the field, before any worker starts
    buckets, per_latent = None, 1
    if d.buckets != "none":  # torch-free reads of the model folder's configs (preflight made them already)
        buckets = bucket_set(d, pixel_factor(cfg.model.pretrained_path))
        per_latent = downsampling_factor(cfg.model.pretrained_path, "vae")
    sources = expand_sources(d.train_shards, d.allow_pipe)
    if d.mode == "epoch":  # the check config validation makes, for callers that skip it
        for src in sources:
            check_epoch_shard_count("data.train_shards", src, world_size, max(1, d.num_workers))
    stream = ShardStream(
        sources,
        rank=rank,
        world_size=world_size,
        num_workers=d.num_workers,
        seed=cfg.seed,
        batch_size=cfg.micro_batch_size,
        transform=ImageTransform(d.resolution, d.center_crop, d.random_flip, buckets),
        mode=d.mode,
        shuffle_buffer=d.shuffle_buffer,
        max_epochs=max_epochs,
        decoder=select_decoder(d.precomputed),
        sample_filter=MetadataFilter.from_config(d.filters, d.filter_missing),
        captions=CaptionSource.from_config(d.caption_key),
        mix=d.mix,
        tokenize=None if d.precomputed else tokenize,
        pixels_per_latent=per_latent,
    )
    start = worker_start_method(d.worker_start, rank_param_bytes)
    return TrainLoader(stream, d.num_workers, pin_memory=torch.cuda.is_available(), stager=stager, worker_start=start)


def val_samples(
    spec: str, n: int, resolution: int, caption_key: str = "txt", allow_pipe: bool = False
) -> tuple[torch.Tensor, list[str], list[str]]:
    """(uint8 [N,3,R,R], captions, keys) of `val_batch`."""
    batch = val_batch(spec, n, resolution, caption_key, allow_pipe)
    return batch["pixels"], batch["captions"], batch["keys"]


def val_batch(spec: str, n: int, resolution: int, caption_key: str = "txt", allow_pipe: bool = False) -> dict[str, Any]:
    """The first `n` good samples of the shards in `spec`, in shard order, center-cropped; the
    caption is the first present, non-blank field of `caption_key` (no draw: a fixed set). `pipe:`
    URLs only with `allow_pipe` (`data.allow_pipe`).

    Returns one batch as the training stream packs it: `pixels` uint8 [N,3,R,R], `captions`,
    `keys` and the geometry rows (`original_size`, `crop_top_left`, `target_size`). Warns when the
    shards hold fewer than `n`.
    """
    tf = ImageTransform(resolution, center_crop=True, random_flip=False)
    decode = select_decoder(False)
    captions = CaptionSource.from_config(caption_key)
    urls = [u for s in expand_sources(spec, allow_pipe) for u in s.urls]
    log = BadInputLog()
    kept: list[DecodedSample] = []
    for raw in read_shards(urls, log):
        if len(kept) >= n:
            break
        try:
            kept.append(decode(captions.resolve(raw, None), tf, None))
        except BadSample as e:
            log.add(e.category, raw.shard)
    if len(kept) < n:
        warnings.warn(
            f"val_samples: {spec!r} holds {len(kept)} good samples, fewer than the {n} asked for", stacklevel=2
        )
    if log.total():
        bad = {k: v for k, v in log.counts.items() if v}
        warnings.warn(f"val_samples: skipped bad input {bad} in {log.shards}", stacklevel=2)
    return {
        "pixels": stack_pixels(kept, resolution),
        "captions": [s.caption for s in kept],
        "keys": [s.key for s in kept],
        **stack_geometry(kept),
    }
