"""The training data stream: per-rank, per-worker, deterministic and exactly resumable.

The stream of a rank is a pure function of (seed, rank, world_size, num_workers, worker id) and the
shard list, so a position is just a pair of numbers per worker and a resume is a replay.

Shards. `epoch` mode: each epoch the full shard list (all sources concatenated; mixing weights are
ignored, since exactly-once cannot honour them) is permuted by an RNG seeded with (seed, epoch),
the same on every rank; rank r takes `shards[r::world_size]`, worker w takes `[w::num_workers]` of
that. Every sample is seen exactly once per epoch across ranks x workers; this needs at least
world_size x num_workers shards (else ValueError). `resampled` mode: each worker draws shards with
replacement (a source by its weight, then a shard uniformly) with an RNG seeded by (seed, rank,
worker, round); a round is ceil(shards / (world_size x num_workers)) draws and plays the role of
an epoch. Endless and the same for the same seed, but NOT exactly-once: shards repeat and some
are not drawn. Each worker moves on to its next epoch (round) by itself when its shards run out,
so a rank never runs dry and ranks never wait on each other; `max_epochs` stops after N.

Pipeline in each worker: raw tar members grouped by key (undecoded) -> shuffle buffer (RNG seeded
by (seed, world_size, rank, num_workers, worker, epoch); drained at each epoch end) -> position
count -> decode + caption check (bad samples are counted and skipped, but still advance the
position) -> resize/crop/flip, with an RNG seeded by the sample's position -> `micro_batch_size`
samples stacked as uint8 in the worker (3x faster than moving float samples; see FINDINGS). With
`data.precomputed` the decode reads stored latents instead (`sd_train.precompute`), and a batch
carries `latent_mean`/`latent_std`/`text_embeds` instead of `pixels`; everything else is the same.

Position = per worker (epoch, offset): raw samples emitted from the shuffle buffer in that epoch.
Every batch carries its worker's position and cumulative counts after the batch; `TrainLoader`
keeps the latest per worker as seen by the main process (prefetched batches do not count) and
takes batches in a fixed worker rotation of its own, so the order survives a restart.
`load_state_dict` makes each worker replay its current epoch up to its offset without decoding,
then go on: the batches after a resume are exactly those of an uninterrupted run.

Changed world_size, num_workers, seed, mode, shuffle_buffer or shard list: the saved offsets mean
nothing any more. The loader then warns once and starts every worker at the beginning of the next
epoch (highest saved epoch + 1): the rest of the interrupted epoch is skipped, and no sample is
seen twice within an epoch. Ranks must agree on that epoch: the trainer should all-reduce (MAX)
`TrainLoader.reshard_epoch` (None when no change) and pass it to `start_at_epoch`.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import signal
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sd_train.samples import (
    BAD_CATEGORIES,
    MAX_BAD_SHARDS,
    BadInputLog,
    BadSample,
    Decoder,
    DecodedSample,
    ImageTransform,
    PrecomputedSample,
    RawSample,
    check_bad_fraction,
    read_shards,
    select_decoder,
    shuffled,
)
from sd_train.shards import Source, expand_sources

__all__ = [
    "ShardStream",
    "TrainLoader",
    "WorkerPosition",
    "build_train_loader",
    "check_bad_fraction",
    "pixels_to_float",
    "val_samples",
]

Mode = Literal["epoch", "resampled"]
STATE_VERSION = 1


def _seed(*parts: Any) -> int:
    # A stable 64-bit seed from a tuple (Python's hash() is salted per process for strings).
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def pixels_to_float(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B,3,H,W] in 0..255 -> `dtype` in [-1, 1], the range the SD VAE expects. Do it on device."""
    return pixels.to(dtype).div_(127.5).sub_(1.0)


def stack_pixels(samples: list[DecodedSample], resolution: int) -> torch.Tensor:
    """HWC uint8 samples -> one contiguous uint8 [B,3,R,R] tensor (a single copy per sample)."""
    pixels = torch.empty((len(samples), 3, resolution, resolution), dtype=torch.uint8)
    for i, s in enumerate(samples):
        pixels[i].copy_(torch.from_numpy(s.pixels).permute(2, 0, 1))
    return pixels


def stack_precomputed(samples: list[PrecomputedSample]) -> dict[str, Any]:
    """Precomputed samples -> float tensors latent_mean/latent_std [B,4,h,w] and text_embeds
    [B,77,D] in their stored dtype. The posterior is sampled on device by the trainer, from its
    checkpointed global RNG, never here (a worker's RNG is not part of the resumable state)."""
    return {
        name: torch.from_numpy(np.stack([getattr(s, name) for s in samples]))
        for name in ("latent_mean", "latent_std", "text_embeds")
    }


@dataclass
class WorkerPosition:
    """One worker's resumable state: epoch, raw samples emitted in it, and cumulative counts."""

    epoch: int = 0
    offset: int = 0
    good: int = 0
    bad: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_CATEGORIES, 0))
    bad_shards: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> WorkerPosition:
        bad = dict.fromkeys(BAD_CATEGORIES, 0) | {k: int(v) for k, v in d.get("bad", {}).items()}
        return cls(int(d["epoch"]), int(d["offset"]), int(d.get("good", 0)), bad, list(d.get("bad_shards", [])))


class ShardStream(IterableDataset):
    """One rank's training stream. Owns the shard plan, the per-worker pipeline settings, and the
    positions each worker starts from on its next iterator (`start`, set by TrainLoader)."""

    def __init__(
        self,
        sources: list[Source],
        *,
        rank: int,
        world_size: int,
        num_workers: int,
        seed: int,
        batch_size: int,
        transform: ImageTransform,
        mode: Mode = "epoch",
        shuffle_buffer: int = 0,
        max_epochs: Optional[int] = None,
        decoder: Optional[Decoder] = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside world_size={world_size}")
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if mode not in ("epoch", "resampled"):
            raise ValueError(f"mode={mode!r}: use 'epoch' or 'resampled'")
        self.sources = [s for s in sources if s.urls]
        self.urls = [u for s in self.sources for u in s.urls]
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers = max(1, num_workers)  # num_workers=0 reads in-process as worker 0 of 1
        self.batch_size, self.transform, self.mode = batch_size, transform, mode
        self.shuffle_buffer, self.max_epochs = shuffle_buffer, max_epochs
        self.decoder = decoder or select_decoder(False)
        self.start: dict[int, WorkerPosition] = {}
        slots = world_size * self.num_workers
        if not self.urls:
            raise ValueError(f"no shards in {[s.pattern for s in sources]}")
        if mode == "epoch" and len(self.urls) < slots:
            raise ValueError(
                f"{len(self.urls)} shards is fewer than world_size x num_workers = {world_size} x {self.num_workers} "
                f"= {slots}; in epoch mode every worker needs at least one shard. Write more shards, lower "
                "num_workers, or use mode=resampled"
            )
        if mode == "epoch" and len({s.weight for s in self.sources}) > 1:
            warnings.warn("data.mode=epoch reads every shard once per epoch: source weights are ignored", stacklevel=2)

    def fingerprint(self) -> str:
        """Identifies what the order depends on: shard names in order (and weights, when resampled).

        Base names only, so moving the data set (NFS -> local disk) keeps an exact resume, while an
        added, removed or reordered shard is caught.
        """
        names = [[os.path.basename(u) for u in s.urls] for s in self.sources]
        weights = [s.weight for s in self.sources] if self.mode == "resampled" else []
        return hashlib.blake2b(repr((names, weights)).encode(), digest_size=8).hexdigest()

    # -------------------------------------------------------------- shard plan

    def worker_shards(self, worker: int, epoch: int) -> list[str]:
        """The shards `worker` of this rank reads in `epoch`, in order."""
        if self.mode == "epoch":
            perm = list(self.urls)
            random.Random(_seed("perm", self.seed, epoch)).shuffle(perm)
            return perm[self.rank :: self.world_size][worker :: self.num_workers]
        rng = random.Random(_seed("resample", self.seed, self.rank, worker, epoch))
        draws = max(1, math.ceil(len(self.urls) / (self.world_size * self.num_workers)))
        weights = [s.weight for s in self.sources]
        picked = rng.choices(self.sources, weights=weights, k=draws)
        return [rng.choice(s.urls) for s in picked]

    def _stream_key(self, worker: int) -> tuple:
        return (self.seed, self.world_size, self.rank, self.num_workers, worker)

    def epoch_samples(self, worker: int, epoch: int, log: BadInputLog) -> Iterator[RawSample]:
        """Raw samples of `worker` in `epoch`, after the shuffle buffer (undecoded)."""
        rng = random.Random(_seed("shuffle", *self._stream_key(worker), epoch))
        return shuffled(read_shards(self.worker_shards(worker, epoch), log), self.shuffle_buffer, rng)

    # -------------------------------------------------------------- worker loop

    def __iter__(self) -> Iterator[dict]:
        """This worker's batches from its `start` position (runs inside the DataLoader worker)."""
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.num_workers:
            raise RuntimeError(f"ShardStream planned for {self.num_workers} workers runs in {info.num_workers}")
        return self._batches(worker, self.start.get(worker, WorkerPosition()))

    def _replay(self, samples: Iterator[RawSample], offset: int, log: BadInputLog) -> int:
        """Consume `offset` raw samples without decoding; returns how many there were."""
        log.muted = True  # already counted before the checkpoint
        done = 0
        try:
            for _ in range(offset):
                next(samples)
                done += 1
        except StopIteration:
            warnings.warn(f"data resume: epoch ended after {done} of {offset} replayed samples; did the shards change?")
        finally:
            log.muted = False
        return done

    def _batches(self, worker: int, start: WorkerPosition) -> Iterator[dict]:
        """Epoch after epoch: replay to the start offset, then decode, batch and yield; an `end`
        marker after `max_epochs` tells TrainLoader to drop this worker from its rotation."""
        log = BadInputLog(dict(start.bad), list(start.bad_shards))
        epoch, skip, good = start.epoch, start.offset, start.good
        batch: list[DecodedSample | PrecomputedSample] = []
        while self.max_epochs is None or epoch < self.max_epochs:
            samples = self.epoch_samples(worker, epoch, log)
            offset = self._replay(samples, skip, log) if skip else 0
            skip = 0
            for raw in samples:
                rng = None
                if self.transform.uses_rng:
                    rng = random.Random(_seed("augment", *self._stream_key(worker), epoch, offset))
                offset += 1
                try:
                    batch.append(self.decoder(raw, self.transform, rng))
                except BadSample as e:
                    log.add(e.category, raw.shard)
                    continue
                good += 1
                if len(batch) == self.batch_size:
                    yield self._pack(batch, worker, WorkerPosition(epoch, offset, good, dict(log.counts), list(log.shards)))
                    batch = []
            epoch += 1
        end = WorkerPosition(epoch, 0, good, dict(log.counts), list(log.shards))
        if batch:  # only with max_epochs: the last, short batch
            yield self._pack(batch, worker, end)
        yield {"worker": worker, "end": True, "position": asdict(end)}

    def _pack(self, batch: list[DecodedSample | PrecomputedSample], worker: int, position: WorkerPosition) -> dict:
        if isinstance(batch[0], PrecomputedSample):
            arrays = stack_precomputed(batch)  # type: ignore[arg-type]  # one decoder per stream
        else:
            arrays = {"pixels": stack_pixels(batch, self.transform.resolution)}  # type: ignore[arg-type]
        return {
            **arrays,
            "captions": [s.caption for s in batch],
            "keys": [s.key for s in batch],
            "worker": worker,
            "end": False,
            "position": asdict(position),
        }


def _ignore_termination(worker_id: int) -> None:  # noqa: ARG001
    """Loader workers ignore SIGTERM/SIGINT. A preemption signal reaches the whole process group;
    the main process handles it (agree, save, exit 0) and shuts its workers down itself. A worker
    killed first would make the main process crash in its next collective instead."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TrainLoader:
    """Owns the DataLoader over one rank's ShardStream, the latest position of each worker as seen
    by the main process, and the worker rotation that fixes the batch order.

    Iterating continues from the recorded positions (a second `iter()` does not restart). Fresh
    worker processes are started per iterator (persistent_workers=False): a persistent worker's
    own position is ahead of the main process by its prefetched batches, so it cannot resume.
    """

    def __init__(self, dataset: ShardStream, num_workers: int, prefetch_factor: int = 4, pin_memory: bool = False) -> None:
        if max(1, num_workers) != dataset.num_workers:
            raise ValueError(f"num_workers={num_workers} but the stream was planned for {dataset.num_workers}")
        self.dataset = dataset
        self.num_workers = num_workers
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self._positions = [WorkerPosition() for _ in range(dataset.num_workers)]
        self._next_worker = 0
        self.reshard_epoch: Optional[int] = None
        """Set by load_state_dict when the saved state could not be resumed exactly (see module doc)."""

    def _dataloader(self) -> DataLoader:
        self.dataset.start = {w: WorkerPosition.from_dict(asdict(p)) for w, p in enumerate(self._positions)}
        extra: dict[str, Any] = {}
        if self.num_workers > 0:
            extra = {"prefetch_factor": self.prefetch_factor, "persistent_workers": False}
        if self.num_workers > 0:
            extra["worker_init_fn"] = _ignore_termination
        # A private generator: without one, creating the iterator draws a base seed from the global
        # torch RNG, which would shift the training noise of a resumed run against a straight one.
        # The stream's own randomness is seeded explicitly and does not use this seed.
        gen = torch.Generator().manual_seed(0)
        return DataLoader(
            self.dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory, generator=gen, **extra
        )

    def __iter__(self) -> Iterator[dict]:
        """Batches in worker rotation order; each one's position is recorded as it is handed out."""
        n = self.dataset.num_workers
        pending: dict[int, deque] = {w: deque() for w in range(n)}
        live = list(range(n))
        for item in self._dataloader():
            pending[item["worker"]].append(item)
            # Hand out batches only in our own rotation: the DataLoader's order restarts at worker
            # 0 on every iterator, ours continues from `_next_worker` across a resume.
            while live and pending[self._next_worker]:
                worker = self._next_worker
                batch = pending[worker].popleft()
                after = live[(live.index(worker) + 1) % len(live)]
                if batch["end"]:
                    live.remove(worker)
                self._next_worker = after if live else 0
                self._positions[worker] = WorkerPosition.from_dict(batch["position"])
                if not batch["end"]:
                    yield batch

    # -------------------------------------------------------------- progress and bad input

    def samples_seen(self) -> int:
        """Good samples handed to the trainer by this rank."""
        return sum(p.good for p in self._positions)

    def bad_counts(self) -> dict[str, int]:
        """Bad input of this rank by category (sum over workers). All-reduce before judging."""
        return {k: sum(p.bad[k] for p in self._positions) for k in BAD_CATEGORIES}

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
        return {
            "world_size": d.world_size,
            "num_workers": d.num_workers,
            "seed": d.seed,
            "mode": d.mode,
            "shuffle_buffer": d.shuffle_buffer,
            "shards": d.fingerprint(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, one per rank (save it under the rank's name):

        identity: version, rank, world_size, num_workers (>= 1), seed, mode, shuffle_buffer, shards
        (fingerprint of shard base names); order: next_worker (the rotation), workers (per worker:
        epoch, offset, good, bad {category: n}, bad_shards); summary, not read back: samples_seen,
        samples_read, bad, bad_shards (this rank's sums).
        """
        return {
            "version": STATE_VERSION,
            "rank": self.dataset.rank,
            **self._identity(),
            "next_worker": self._next_worker,
            "workers": [asdict(p) for p in self._positions],
            "samples_seen": self.samples_seen(),
            "samples_read": self.samples_read(),
            "bad": self.bad_counts(),
            "bad_shards": self.bad_shards(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Resume exactly where `sd` was taken, or, if the stream changed, at the next epoch (warns)."""
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {sd.get('version')!r}; this code reads version {STATE_VERSION}")
        ident = self._identity()
        changed = {k: (sd.get(k), v) for k, v in ident.items() if sd.get(k) != v}
        if not changed:
            if sd["rank"] != self.dataset.rank:
                raise ValueError(
                    f"data state of rank {sd['rank']} loaded into rank {self.dataset.rank}: load each rank's own file"
                )
            self._positions = [WorkerPosition.from_dict(w) for w in sd["workers"]]
            self._next_worker = int(sd["next_worker"])
            self.reshard_epoch = None
            return
        epoch = max(int(w["epoch"]) for w in sd["workers"]) + 1
        what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        warnings.warn(
            f"data resume: {what}; the saved positions do not apply, so every worker of rank "
            f"{self.dataset.rank} starts at the beginning of epoch {epoch} (the rest of the interrupted "
            "epoch is skipped; bad-input counts restart at 0)",
            stacklevel=2,
        )
        self.reshard_epoch = epoch
        self.start_at_epoch(epoch)

    def start_at_epoch(self, epoch: int) -> None:
        """Put every worker at the start of `epoch` (after a reshard, with the epoch agreed by all ranks)."""
        self._positions = [WorkerPosition(epoch=epoch) for _ in range(self.dataset.num_workers)]
        self._next_worker = 0


def build_train_loader(cfg: Any, rank: int, world_size: int, max_epochs: Optional[int] = None) -> TrainLoader:
    """The training loader of `rank` from `cfg` (a TrainConfig): `cfg.data.*`, `cfg.seed`, `cfg.micro_batch_size`."""
    d = cfg.data
    if d.precomputed:
        from sd_train.precompute import check_precomputed  # local: only precomputed runs need it

        check_precomputed(d.train_shards, cfg)  # ConfigError naming the field, before any worker starts
    stream = ShardStream(
        expand_sources(d.train_shards),
        rank=rank,
        world_size=world_size,
        num_workers=d.num_workers,
        seed=cfg.seed,
        batch_size=cfg.micro_batch_size,
        transform=ImageTransform(d.resolution, d.center_crop, d.random_flip),
        mode=d.mode,
        shuffle_buffer=d.shuffle_buffer,
        max_epochs=max_epochs,
        decoder=select_decoder(d.precomputed),
    )
    return TrainLoader(stream, d.num_workers, pin_memory=torch.cuda.is_available())


def val_samples(spec: str, n: int, resolution: int) -> tuple[torch.Tensor, list[str], list[str]]:
    """The first `n` good samples of the shards in `spec`, in shard order, center-cropped.

    Returns (uint8 [N,3,R,R], captions, keys). Warns when the shards hold fewer than `n`.
    """
    tf = ImageTransform(resolution, center_crop=True, random_flip=False)
    decode = select_decoder(False)
    urls = [u for s in expand_sources(spec) for u in s.urls]
    log = BadInputLog()
    kept: list[DecodedSample] = []
    for raw in read_shards(urls, log):
        if len(kept) >= n:
            break
        try:
            kept.append(decode(raw, tf, None))
        except BadSample as e:
            log.add(e.category, raw.shard)
    if len(kept) < n:
        warnings.warn(f"val_samples: {spec!r} holds {len(kept)} good samples, fewer than the {n} asked for", stacklevel=2)
    if log.total():
        bad = {k: v for k, v in log.counts.items() if v}
        warnings.warn(f"val_samples: skipped bad input {bad} in {log.shards}", stacklevel=2)
    return stack_pixels(kept, resolution), [s.caption for s in kept], [s.key for s in kept]
