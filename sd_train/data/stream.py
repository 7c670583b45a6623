"""The training data stream (`ShardStream`): per-rank, per-worker, deterministic and exactly resumable.

The stream of a rank is a pure function of (seed, rank, world_size, num_workers, worker id) and the
shard list, so a position is just a pair of numbers per worker and a resume is a replay.

Shards. `epoch` mode with `data.mix=concat`: each epoch the full shard list (all sources
concatenated; mixing weights are ignored, since exactly-once over the union cannot honour them) is permuted by an RNG seeded with (seed, epoch),
the same on every rank; rank r takes `shards[r::world_size]`, worker w takes `[w::num_workers]` of
that. Every sample is seen exactly once per epoch across ranks x workers; this needs at least
world_size x num_workers shards (else ValueError). `resampled` mode: each worker draws shards with
replacement (a source by its weight, then a shard uniformly) with an RNG seeded by (seed, rank,
worker, round); a round is ceil(shards / (world_size x num_workers)) draws and plays the role of
an epoch. Endless and the same for the same seed, but NOT exactly-once: shards repeat and some
are not drawn. `epoch` mode with `data.mix=weighted`: every source has its own epochs, each
permuted and split over ranks x workers as above (so each needs world_size x num_workers shards);
each raw sample of a worker is taken from a source drawn by weight with an RNG seeded by (seed,
rank, worker, draw number). A source is read exactly once per its own epoch and starts its next
epoch by itself when it runs out; shares follow the weights. Each worker moves on to its next epoch (round) by itself when its shards run out,
so a rank never runs dry and ranks never wait on each other; `max_epochs` stops after N.

Pipeline in each worker: raw tar members grouped by key (undecoded) -> shuffle buffer (RNG seeded
by (seed, world_size, rank, num_workers, worker, epoch); drained at each epoch end) -> position
count -> metadata filters (`data.filters`, from the json only; a rejected sample advances the
position but is never decoded) -> decode + caption check (bad samples are counted and skipped, but still advance the
position) -> resize/crop/flip, with an RNG seeded by the sample's position -> `micro_batch_size`
samples stacked as uint8 in the worker (measured 3x faster than moving float samples, with
`bench/bench_loader.py`). With `data.precomputed` the decode reads stored latents instead
(`sd_train.data.precomputed`), and a batch carries `latent_mean`/`latent_std`/`text_embeds` instead of `pixels`; everything else is the same.

With `data.buckets` the decode picks each image's bucket from its header (a misfit is counted in
`filtered` under its reason, undecoded), and the samples wait in per-bucket buffers until one holds
a micro-batch (`sd_train.data.batching`, which also documents their state); a precomputed sample's
bucket is its stored shape. A batch then carries `bucket` (its name) and `origins` (each sample's
stream position, the `where` of its seeds).

How positions are kept, resumed and resharded: `sd_train.data.loader`.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional

from torch.utils.data import IterableDataset, get_worker_info

from sd_train.data.bad_input import BAD_CATEGORIES, BadInputLog, BadSample
from sd_train.data.batching import BucketBuffers, InOrder, Item, Waiting
from sd_train.data.buckets import Misfit
from sd_train.data.decode import (
    CaptionSource,
    DecodedSample,
    ImageTransform,
    decode_image_sample,
    stack_geometry,
    stack_pixels,
)
from sd_train.data.filters import MetadataFilter
from sd_train.data.pieces import Piece, Reading, as_piece, read_pieces, shuffled, split_for_slot
from sd_train.data.pieces import stable_seed as _seed
from sd_train.data.precomputed import PrecomputedSample, array_shapes, stack_precomputed
from sd_train.data.sources import Source
from sd_train.data.tar import RawSample, read_shards
from sd_train.errors import BadDataError

EMPTY_EPOCHS = 3  # epochs in a row without a usable sample before a worker gives up (BadDataError)
Mode = Literal["epoch", "resampled"]
Mix = Literal["concat", "weighted"]


Sample = DecodedSample | PrecomputedSample
Decoder = Callable[[RawSample, ImageTransform, Optional[random.Random]], Sample]


class BatchFill:
    """One batch being filled, from samples grouped by the shapes they stack with: decoded images
    share one group (resized to the resolution), precomputed samples carry the shapes they were
    written with, which may disagree (`mismatched_shape` in sd_train.data.bad_input). The first
    group to reach the batch size is the batch, and the samples of the other groups are bad input.
    So an odd sample costs itself only, wherever it falls in the batch, and which samples lose is
    decided by the data alone: a resume, which starts at a batch boundary, repeats it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.groups: dict[Any, list[tuple[Sample, str, int]]] = {}

    def __bool__(self) -> bool:
        return bool(self.groups)

    def add(self, sample: Sample, shard: str, source: int = 0) -> bool:
        """Add a usable sample (from `shard`, of mixing `source`); True once its group is full."""
        key = array_shapes(sample) if isinstance(sample, PrecomputedSample) else None
        group = self.groups.setdefault(key, [])
        group.append((sample, shard, source))
        return len(group) >= self.size

    def take(self, log: BadInputLog) -> tuple[list[Sample], list[int]]:
        """(the batch: the full group, or at the end of the stream the largest; the sources of
        the samples left out, each counted `mismatched_shape` in `log`). Starts the next batch."""
        batch = max(self.groups.values(), key=len)
        rejected = []
        for group in self.groups.values():
            if group is not batch:
                for _, shard, source in group:
                    log.add("mismatched_shape", shard)
                    rejected.append(source)
        self.groups = {}
        return [sample for sample, _, _ in batch], rejected


@dataclass
class WorkerPosition:
    """One worker's resumable state: epoch, raw samples emitted in it, and cumulative counts
    (`filtered`: samples rejected by `data.filters`, by rule text)."""

    epoch: int = 0
    offset: int = 0
    good: int = 0
    bad: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_CATEGORIES, 0))
    bad_shards: list[str] = field(default_factory=list)
    filtered: dict[str, int] = field(default_factory=dict)
    sources: list[list[int]] = field(default_factory=list)
    """`data.mix=weighted` only: per source [epoch, raw samples taken in it, good samples in all];
    then `offset` counts the worker's mixing draws and `epoch` is the lowest source epoch."""
    buckets: Optional[dict] = None
    """`data.buckets` only: the bucket buffers' state (waiting samples, per-bucket counts, carried),
    as `sd_train.data.batching` documents it; None on the square path (and then left out of `to_dict`)."""
    reading: Optional[list] = None
    """Per epoch stream (one; with `data.mix=weighted` one per source): how far its reader got in
    the current epoch, as `sd_train.data.pieces.Reading` documents it. What an elastic resume reads."""
    plan: Optional[list] = None
    """After an elastic resume (`sd_train.data.elastic`), per epoch stream: `[[epoch, pieces], ...]`,
    the pieces this worker reads in those epochs instead of its normal share; None otherwise."""

    @classmethod
    def from_dict(cls, d: dict) -> WorkerPosition:
        bad = dict.fromkeys(BAD_CATEGORIES, 0) | {k: int(v) for k, v in d.get("bad", {}).items()}
        filtered = {k: int(v) for k, v in d.get("filtered", {}).items()}
        sources = [[int(x) for x in src] for src in d.get("sources", [])]
        return cls(
            int(d["epoch"]),
            int(d["offset"]),
            int(d.get("good", 0)),
            bad,
            list(d.get("bad_shards", [])),
            filtered,
            sources,
            d.get("buckets"),
            d.get("reading"),
            d.get("plan"),
        )

    def to_dict(self) -> dict:
        """Plain JSON-able dict (what batches carry and the loader saves); no `buckets`, `reading` or
        `plan` key where they are None."""
        d = asdict(self)
        for key in ("buckets", "reading", "plan"):
            if d[key] is None:
                del d[key]
        return d

    def latest_epoch(self) -> int:
        """The highest epoch any of this worker's sources has started."""
        return max([self.epoch] + [src[0] for src in self.sources])


def plan_left(plans: list[Optional[list]], epochs: list[int]) -> Optional[list]:
    """Per epoch stream, the elastic plan's epochs from the stream's current one on; None once every
    stream is past its plan (the position then holds no plan)."""
    left = [[[e, p] for e, p in plan or [] if e >= epoch] for plan, epoch in zip(plans, epochs)]
    return left if any(left) else None


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
        sample_filter: Optional[MetadataFilter] = None,
        captions: Optional[CaptionSource] = None,
        mix: Mix = "concat",
        tokenize: Optional[Callable[[list[str]], Any]] = None,
        pixels_per_latent: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside world_size={world_size}")
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if mode not in ("epoch", "resampled"):
            raise ValueError(f"mode={mode!r}: use 'epoch' or 'resampled'")
        if mix not in ("concat", "weighted") or (mix == "weighted" and mode != "epoch"):
            raise ValueError(f"mix={mix!r}: use 'concat' or, in mode=epoch, 'weighted'")
        self.sources = [s for s in sources if s.urls]
        self.urls = [u for s in self.sources for u in s.urls]
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers = max(1, num_workers)  # num_workers=0 reads in-process as worker 0 of 1
        self.batch_size, self.transform, self.mode = batch_size, transform, mode
        self.shuffle_buffer, self.max_epochs = shuffle_buffer, max_epochs
        self.decoder = decoder or decode_image_sample
        self.sample_filter = sample_filter or MetadataFilter()
        self.captions = captions or CaptionSource()
        self.mix = mix if len(self.sources) > 1 else "concat"  # one source: the same stream either way
        # Captions -> token ids [B, L] in the worker (image shards), so the training process does
        # not tokenize; precomputed shards carry embeddings instead.
        self.tokenize = tokenize
        self.buckets = transform.buckets
        """`data.buckets` (the transform's BucketSet, which the decoder assigns from), or None: square."""
        self.pixels_per_latent = pixels_per_latent
        """Pixels per stored latent pixel (the VAE factor): how a precomputed sample's shape names its bucket."""
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
        self._shard_index = {u: i for i, u in reversed(list(enumerate(self.urls)))}
        self._source_of = [i for i, s in enumerate(self.sources) for _ in s.urls]
        short = [src.pattern for src in self.sources if len(src.urls) < slots]
        if self.mix == "weighted" and short:
            raise ValueError(
                f"data.mix=weighted: sources {short} have fewer than world_size x num_workers = {slots} shards; "
                "each source's epoch gives every worker a shard of it"
            )
        if mode == "epoch" and self.mix == "concat" and len({s.weight for s in self.sources}) > 1:
            warnings.warn(
                "data.mode=epoch with data.mix=concat reads every shard once per epoch: source weights are "
                "ignored (data.mix=weighted interleaves the sources by weight)",
                stacklevel=2,
            )

    @property
    def filter_names(self) -> tuple[str, ...]:
        """The keys of the `filtered` counts: the `data.filters` rules, then the bucket misfit reasons."""
        return self.sample_filter.names + (self.buckets.filter_reasons() if self.buckets is not None else ())

    def shard_position(self, url: str) -> int:
        """The index of shard `url` in `urls` (its first, if listed twice)."""
        return self._shard_index[url]

    def source_of(self, shard: int) -> int:
        """The source that the shard at index `shard` of `urls` belongs to."""
        return self._source_of[shard]

    def fingerprint(self) -> str:
        """Identifies what the order depends on: shard names in order (and weights, when resampled).

        Base names only, so moving the data set (NFS -> local disk) keeps an exact resume, while an
        added, removed or reordered shard is caught.
        """
        names = [[os.path.basename(u) for u in s.urls] for s in self.sources]
        weights = [s.weight for s in self.sources] if self.mode == "resampled" or self.mix == "weighted" else []
        parts = (names, weights) if self.mix == "concat" else (names, weights, self.mix)
        return hashlib.blake2b(repr(parts).encode(), digest_size=8).hexdigest()

    # -------------------------------------------------------------- shard plan

    def epoch_order(self, epoch: int, source: Optional[int] = None) -> list[str]:
        """Epoch mode: the shards of `epoch` (of one `source`'s own epoch with `data.mix=weighted`)
        in the order that is split over the slots. Seeded by (seed, epoch) alone: the same on every
        rank and at every world size."""
        if source is None:
            perm = list(self.urls)
            random.Random(_seed("perm", self.seed, epoch)).shuffle(perm)
        else:
            perm = list(self.sources[source].urls)
            random.Random(_seed("perm", self.seed, "source", source, epoch)).shuffle(perm)
        return perm

    def worker_shards(self, worker: int, epoch: int) -> list[str]:
        """The shards `worker` of this rank reads in `epoch`, in order."""
        if self.mode == "epoch":
            return split_for_slot(self.epoch_order(epoch), self.rank, self.world_size, worker, self.num_workers)
        rng = random.Random(_seed("resample", self.seed, self.rank, worker, epoch))
        draws = max(1, math.ceil(len(self.urls) / (self.world_size * self.num_workers)))
        weights = [s.weight for s in self.sources]
        picked = rng.choices(self.sources, weights=weights, k=draws)
        return [rng.choice(s.urls) for s in picked]

    def source_shards(self, source: int, worker: int, epoch: int) -> list[str]:
        """`data.mix=weighted`: the shards of `source` that `worker` of this rank reads in that
        source's `epoch`: the source's own permutation, split over ranks x workers like epoch mode."""
        return split_for_slot(self.epoch_order(epoch, source), self.rank, self.world_size, worker, self.num_workers)

    def epoch_pieces(
        self, worker: int, epoch: int, source: Optional[int] = None, plan: Optional[list] = None
    ) -> tuple[list[Piece], bool]:
        """(the pieces `worker` reads in `epoch` (of `source`), whether they come from `plan`): an
        elastic resume's plan names them for its epochs (`sd_train.data.elastic`), else whole shards."""
        for planned, pieces in plan or []:
            if planned == epoch:
                return [as_piece(p) for p in pieces], True
        shards = self.worker_shards(worker, epoch) if source is None else self.source_shards(source, worker, epoch)
        return [(self._shard_index[u], 0, None) for u in shards], False

    def _stream_key(self, worker: int) -> tuple:
        return (self.seed, self.world_size, self.rank, self.num_workers, worker)

    def epoch_samples(
        self, worker: int, epoch: int, log: BadInputLog, reading: Optional[Reading] = None,
        pieces: Optional[list] = None,
    ) -> Iterator[RawSample]:  # fmt: skip
        """Raw samples of `worker` in `epoch`, after the shuffle buffer (undecoded); `reading`
        follows the reader, `pieces` (default: this worker's whole shards) are what it reads."""
        rng = random.Random(_seed("shuffle", *self._stream_key(worker), epoch))
        return self._read(self.epoch_pieces(worker, epoch)[0] if pieces is None else pieces, log, reading, rng)

    def source_epoch_samples(
        self, source: int, worker: int, epoch: int, log: BadInputLog, reading: Optional[Reading] = None,
        pieces: Optional[list] = None,
    ) -> Iterator[RawSample]:  # fmt: skip
        """`data.mix=weighted`: raw samples of `source` for `worker` in that source's `epoch`."""
        rng = random.Random(_seed("shuffle", *self._stream_key(worker), "source", source, epoch))
        return self._read(self.epoch_pieces(worker, epoch, source)[0] if pieces is None else pieces, log, reading, rng)

    def _read(self, pieces: list[Piece], log: BadInputLog, reading: Optional[Reading], rng: random.Random) -> Iterator:
        reading = Reading() if reading is None else reading
        return shuffled(read_pieces(pieces, self.urls, log, reading), self.shuffle_buffer, rng, reading.held)

    # -------------------------------------------------------------- worker loop

    def __iter__(self) -> Iterator[dict]:
        """This worker's batches from its `start` position (runs inside the DataLoader worker)."""
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.num_workers:
            raise RuntimeError(f"ShardStream planned for {self.num_workers} workers runs in {info.num_workers}")
        start = self.start.get(worker, WorkerPosition())
        return self._mixed_batches(worker, start) if self.mix == "weighted" else self._batches(worker, start)

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
        filtered = dict(start.filtered)  # the replay judges nothing, so nothing is counted twice
        epoch, skip, good = start.epoch, start.offset, start.good
        batches = self._batcher(worker, start)
        fill = BatchFill(self.batch_size) if self.buckets is None else None  # the square path's shape check
        empty = 0  # epochs in a row that gave no usable sample
        plan, reading = (start.plan or [None])[0], Reading()

        def position(offset: int) -> WorkerPosition:
            counts = (dict(log.counts), list(log.shards), dict(filtered))
            reads = [reading.state(self._shard_index)]
            plans = plan_left([plan], [epoch])
            return WorkerPosition(epoch, offset, good, *counts, buckets=batches.state(), reading=reads, plan=plans)

        while self.max_epochs is None or epoch < self.max_epochs:
            reading = Reading()
            pieces, planned = self.epoch_pieces(worker, epoch, plan=plan)
            samples = self.epoch_samples(worker, epoch, log, reading, pieces)
            offset = self._replay(samples, skip, log) if skip else 0
            skip, good_before = 0, good
            for raw in samples:
                index, offset = offset, offset + 1
                sample = self._usable(raw, worker, log, filtered, epoch, index)
                bucket = self._bucket_of(sample, raw, log)
                if bucket is None:
                    continue
                good += 1
                full, rejected = self._add(batches, fill, log, bucket, sample, raw, self._waiting(raw, (epoch, index)))
                good -= len(rejected)
                if full is not None:
                    yield self._pack(full, worker, position(offset))
            if good > good_before or not planned:  # an elastic resume may leave a worker an epoch without work
                empty = 0 if good > good_before else empty + 1
            if empty >= EMPTY_EPOCHS:
                self._nothing_usable(worker, log, filtered)
            if self.max_epochs is None or epoch + 1 < self.max_epochs:
                batches.end_epoch()
            epoch += 1
        reading = Reading()
        fulls, rejected = self._drain(batches, fill, log)
        good -= len(rejected)
        for full in fulls:  # only with max_epochs: the last, short batches
            yield self._pack(full, worker, position(0))
        yield {"worker": worker, "end": True, "position": position(0).to_dict()}

    def _batcher(self, worker: int, start: WorkerPosition) -> InOrder | BucketBuffers:
        """In order (square), or bucket buffers restored from `start`."""
        if self.buckets is None:
            return InOrder(self.batch_size)
        buffers = BucketBuffers(self.buckets.names, self.batch_size, start.buckets)
        self._restore(buffers, start, worker)
        return buffers

    def _restore(self, buffers: BucketBuffers, start: WorkerPosition, worker: int) -> None:
        """Put back the samples that waited in the buffers at `start`: each read again from its shard
        by ordinal (one pass per shard, up to the last one needed) and decoded with its own seeds;
        nothing else is decoded. One that cannot be read back as it was is skipped with a warning."""
        assert self.buckets is not None
        wanted = BucketBuffers.saved_waiting(start.buckets, self.buckets.names)
        found: dict[tuple[int, int], RawSample] = {}
        quiet = BadInputLog(muted=True)  # all of it was counted before the checkpoint
        for shard in sorted({w.shard for _, w in wanted}):
            need = {w.ordinal for _, w in wanted if w.shard == shard}
            raws = read_shards([self.urls[shard]], quiet)
            for raw in raws:
                if raw.ordinal in need:
                    found[(shard, raw.ordinal)] = raw
                    need.discard(raw.ordinal)
                    if not need:
                        break
            raws.close()
        for bucket, where in wanted:
            raw = found.get((where.shard, where.ordinal))
            ok = raw is not None and raw.key == where.key
            sample = self._usable(raw, worker, quiet, {}, *where.where) if ok else None
            if self._bucket_of(sample, raw, quiet) != bucket:
                warnings.warn(
                    f"data resume: the sample {where.key!r} waiting in bucket {self.buckets.names[bucket]} could not be "
                    f"read back as it was (shard {self.urls[where.shard]}); it is skipped. Did the shards change?",
                    stacklevel=2,
                )
                continue
            buffers.restore(bucket, sample, where)

    def _bucket_of(
        self, sample: Optional[DecodedSample | PrecomputedSample], raw: Optional[RawSample], log: BadInputLog
    ) -> Optional[int]:
        """The bucket index of a usable sample (0 on the square path); None for no sample, or for a
        precomputed one whose stored shape is no bucket of the run (bad input: undecodable)."""
        if sample is None or self.buckets is None:
            return None if sample is None else 0
        if isinstance(sample, PrecomputedSample):
            h, w = sample.latent_mean.shape[-2:]
            size = (h * self.pixels_per_latent, w * self.pixels_per_latent)
        else:
            size = sample.geometry.target_size
        bucket = self.buckets.index(size)
        if bucket is None and raw is not None:
            log.add("undecodable", raw.shard)
        return bucket

    def _waiting(self, raw: RawSample, where: tuple) -> Optional[Waiting]:
        """Where a sample came from, for the bucket buffers' state (nothing on the square path)."""
        return None if self.buckets is None else Waiting(self._shard_index[raw.shard], raw.ordinal, raw.key, where)

    def _add(
        self,
        batches: InOrder | BucketBuffers,
        fill: Optional[BatchFill],
        log: BadInputLog,
        bucket: int,
        sample: Sample,
        raw: RawSample,
        waiting: Optional[Waiting],
        source: int = 0,
    ) -> tuple[Optional[tuple[int, list[Item]]], list[int]]:
        """Add a usable sample to the batcher: (a full batch or None, the mixing sources of the
        samples left out as `mismatched_shape`). On the square path the samples pass through `fill`
        first, which hands the batcher only a batch's worth of samples that stack together."""
        if fill is None:
            return batches.add(bucket, sample, waiting), []
        if not fill.add(sample, raw.shard, source):
            return None, []
        batch, rejected = fill.take(log)
        full = None
        for s in batch:  # the batcher is empty here: the last one fills it
            full = batches.add(0, s, None)
        return full, rejected

    def _drain(
        self, batches: InOrder | BucketBuffers, fill: Optional[BatchFill], log: BadInputLog
    ) -> tuple[list[tuple[int, list[Item]]], list[int]]:
        """At the end of the stream: (the last, short batches, the sources left out as in `_add`)."""
        rejected: list[int] = []
        if fill:
            batch, rejected = fill.take(log)
            for s in batch:  # fewer than a batch: it waits in the batcher, which drains it
                batches.add(0, s, None)
        return list(batches.drain()), rejected

    def _usable(
        self, raw: RawSample, worker: int, log: BadInputLog, filtered: dict[str, int], *where: Any
    ) -> Optional[Sample]:
        """Filter, caption, decode one raw sample; None (counted) when filtered or bad. `where` (the
        sample's place in the stream) seeds its caption draw and augmentation."""
        rule = self.sample_filter.rejecting_rule(raw)  # from the json alone: no decode
        if rule is not None:
            filtered[rule] = filtered.get(rule, 0) + 1
            return None
        key = self._stream_key(worker)
        raw = self.captions.resolve(
            raw, random.Random(_seed("caption", *key, *where)) if self.captions.uses_rng else None
        )
        rng = random.Random(_seed("augment", *key, *where)) if self.transform.uses_rng else None
        try:
            return self.decoder(raw, self.transform, rng)
        except BadSample as e:
            log.add(e.category, raw.shard)
            return None
        except Misfit as e:  # data.buckets with data.bucket_misfits=filter: judged from the header
            filtered[e.reason] = filtered.get(e.reason, 0) + 1
            return None

    def _nothing_usable(self, worker: int, log: BadInputLog, filtered: dict[str, int]) -> None:
        """Raise instead of spinning forever: a worker that reads epoch after epoch and keeps nothing
        has filters that reject everything, or nothing but bad input."""
        bad = {k: v for k, v in log.counts.items() if v}
        raise BadDataError(
            f"worker {worker} of rank {self.rank} kept no sample in {EMPTY_EPOCHS} epochs in a row "
            f"(filtered so far: {filtered or 'none'}; bad input so far: {bad or 'none'}; shards with bad input: "
            f"{log.shards[:5]}). Check data.filters / data.filter_missing against the shards' .json, and the shards"
        )

    def _mixed_batches(self, worker: int, start: WorkerPosition) -> Iterator[dict]:
        """`data.mix=weighted`: each draw picks a source by weight (an RNG seeded by the draw's
        number, so no state to save) and takes that source's next raw sample. Each source runs
        through its own epochs, exactly once each, and starts its next epoch by itself when it runs
        out. A resume replays each source's current epoch to its offset, without decoding. With
        `max_epochs`, the worker ends once every source has run out `max_epochs` times."""
        log = BadInputLog(dict(start.bad), list(start.bad_shards))
        filtered, good, draw = dict(start.filtered), start.good, start.offset
        state = [list(src) for src in start.sources] or [[start.epoch, 0, 0] for _ in self.sources]
        plans, readings = start.plan or [None] * len(self.sources), [Reading() for _ in self.sources]
        streams = []
        for source, (epoch, offset, _) in enumerate(state):
            pieces = self.epoch_pieces(worker, epoch, source, plans[source])[0]
            samples = self.source_epoch_samples(source, worker, epoch, log, readings[source], pieces)
            if offset:
                self._replay(samples, offset, log)
            streams.append(samples)
        choices, weights = range(len(self.sources)), [src.weight for src in self.sources]
        batches = self._batcher(worker, start)
        fill = BatchFill(self.batch_size) if self.buckets is None else None  # the square path's shape check
        kept_at = [src[0] for src in state]  # source epochs when a sample was last kept

        def position() -> WorkerPosition:
            lowest = min(src[0] for src in state)
            counts = (dict(log.counts), list(log.shards), dict(filtered))
            reads = [r.state(self._shard_index) for r in readings]
            plan = plan_left(plans, [src[0] for src in state])
            return WorkerPosition(lowest, draw, good, *counts, [list(x) for x in state], batches.state(), reads, plan)

        def drop(rejected: list[int]) -> None:
            """Uncount the samples `_add` left out as mismatched_shape (by their sources)."""
            nonlocal good
            good -= len(rejected)
            for src in rejected:
                state[src][2] -= 1

        while self.max_epochs is None or min(src[0] for src in state) < self.max_epochs:
            source = random.Random(_seed("mix", *self._stream_key(worker), draw)).choices(choices, weights)[0]
            raw = next(streams[source], None)
            while raw is None:  # this source's epoch is over: it starts its next one by itself
                batches.end_epoch(lambda w, ended=source: self._source_of[w.shard] == ended)
                state[source][0], state[source][1] = state[source][0] + 1, 0
                readings[source] = Reading()
                pieces, planned = self.epoch_pieces(worker, state[source][0], source, plans[source])
                epoch = state[source][0]
                streams[source] = self.source_epoch_samples(source, worker, epoch, log, readings[source], pieces)
                raw = next(streams[source], None)
                if raw is None and not planned:  # an elastic plan may leave a worker an epoch without work
                    raise BadDataError(
                        f"data.mix=weighted: source {self.sources[source].pattern!r} gave worker {worker} of rank "
                        f"{self.rank} no readable sample in a whole epoch (shards: {log.shards[:5]})"
                    )
            where = ("mix", draw)
            draw, state[source][1] = draw + 1, state[source][1] + 1
            sample = self._usable(raw, worker, log, filtered, *where)
            bucket = self._bucket_of(sample, raw, log)
            if bucket is None:
                if all(st[0] - k >= EMPTY_EPOCHS for st, k in zip(state, kept_at)):
                    self._nothing_usable(worker, log, filtered)
                continue
            good, state[source][2] = good + 1, state[source][2] + 1
            kept_at = [src[0] for src in state]
            full, rejected = self._add(batches, fill, log, bucket, sample, raw, self._waiting(raw, where), source)
            drop(rejected)
            if full is not None:
                yield self._pack(full, worker, position())
        fulls, rejected = self._drain(batches, fill, log)
        drop(rejected)
        for full in fulls:
            yield self._pack(full, worker, position())
        yield {"worker": worker, "end": True, "position": position().to_dict()}

    def _pack(self, full: tuple[int, list[Item]], worker: int, position: WorkerPosition) -> dict:
        bucket, items = full
        batch: list[Sample] = [sample for sample, _ in items]
        if isinstance(batch[0], PrecomputedSample):
            arrays = stack_precomputed(batch)  # type: ignore[arg-type]  # one decoder per stream
        else:
            size = batch[0].geometry.target_size  # type: ignore[union-attr]  # one size per batch
            arrays = {"pixels": stack_pixels(batch, size), **stack_geometry(batch)}  # type: ignore[arg-type]
            if self.tokenize is not None:  # token ids per text encoder, under their batch keys
                arrays.update(self.tokenize([s.caption for s in batch]))
        if self.buckets is not None:
            arrays |= {"bucket": self.buckets.names[bucket], "origins": [list(w.where) for _, w in items if w]}
        return {
            **arrays,
            "captions": [s.caption for s in batch],
            "keys": [s.key for s in batch],
            "worker": worker,
            "end": False,
            "position": position.to_dict(),
        }
