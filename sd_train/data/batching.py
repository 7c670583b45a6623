"""How one loader worker groups its samples into micro-batches: in arrival order (`InOrder`, the
square path), or by aspect-ratio bucket (`BucketBuffers`, `data.buckets`).

Bucket buffers. Each usable sample waits in its bucket's buffer until the buffer holds a
micro-batch, which the worker then emits: every micro-batch holds one bucket. Nothing is dropped
and nothing repeats: a sample enters one buffer once and leaves it in one micro-batch. A buffer
that is not full at an epoch's end keeps its samples into the next epoch (`carried` counts each
sample once per epoch end it waits through); only `max_epochs` ends a stream, with short batches.

The state is explicit, so that a resume restores the buffers exactly (and an elastic resume can
redistribute them): per bucket, the waiting samples in arrival order, each named by where its bytes
are and where it sits in the stream:

    {"waiting": {"64x16": [[shard, ordinal, key, where], ...], ...},  # every bucket, in the set's order
     "samples": {"64x16": n, ...},   # samples emitted per bucket (cumulative)
     "batches": {"64x16": n, ...},   # micro-batches emitted per bucket (cumulative)
     "carried": n}                   # samples that waited through an epoch end (cumulative)

`shard` is the index in the stream's shard list (`ShardStream.urls`, which the saved fingerprint pins
down), `ordinal` the sample's place in that shard (`RawSample.ordinal`), `key` a check, and `where`
the stream position that seeded its caption draw and augmentation: (epoch, index) in the epoch's
order, or ("mix", draw) with `data.mix=weighted`. A resume reads just those samples again and
decodes them with the same seeds, so the buffers come back bitwise as they were, and nothing the
replay skips is decoded. Rebuilding the buffers from image sizes alone would not do: a sample that
turned out undecodable, or whose caption was missing, never entered one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

Item = tuple[Any, Optional["Waiting"]]  # a decoded sample, and where it came from (bucket mode)


@dataclass(frozen=True)
class Waiting:
    """Where a buffered sample came from: the shard's index in the stream's list, its ordinal in
    the shard, its key, and the stream position (`where`) that seeded its caption and augmentation."""

    shard: int
    ordinal: int
    key: str
    where: tuple

    def to_list(self) -> list:
        return [self.shard, self.ordinal, self.key, list(self.where)]

    @classmethod
    def from_list(cls, item: list) -> Waiting:
        return cls(int(item[0]), int(item[1]), str(item[2]), tuple(item[3]))


class InOrder:
    """The square path: samples in arrival order, `batch_size` at a time; a partial batch waits across
    an epoch's end like any other. Keeps no state of its own: a position is taken right after a
    batch, when nothing waits."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.items: list[Item] = []

    def add(self, bucket: int, sample: Any, where: Optional[Waiting]) -> Optional[tuple[int, list[Item]]]:  # noqa: ARG002
        self.items.append((sample, where))
        if len(self.items) < self.batch_size:
            return None
        batch, self.items = self.items, []
        return 0, batch

    def end_epoch(self, counts: Callable[[Waiting], bool] = lambda w: True) -> None:  # noqa: ARG002
        pass

    def drain(self) -> Iterator[tuple[int, list[Item]]]:
        if self.items:
            batch, self.items = self.items, []
            yield 0, batch

    def state(self) -> None:
        return None


class BucketBuffers:
    """Owns one worker's bucket buffers, its per-bucket counts and the carried count (module doc)."""

    def __init__(self, names: tuple[str, ...], batch_size: int, state: Optional[dict] = None) -> None:
        self.names, self.batch_size = names, batch_size
        self.buffers: list[list[Item]] = [[] for _ in names]
        state = state or {}
        self.samples = [int(state.get("samples", {}).get(n, 0)) for n in names]
        self.batches = [int(state.get("batches", {}).get(n, 0)) for n in names]
        self.carried = int(state.get("carried", 0))

    @staticmethod
    def saved_waiting(state: Optional[dict], names: tuple[str, ...]) -> list[tuple[int, Waiting]]:
        """(bucket, sample) of every waiting sample of a saved state, bucket by bucket, in arrival
        order: what a resume reads and decodes again, then hands to `restore` in this order."""
        waiting = (state or {}).get("waiting", {})
        unknown = sorted(set(waiting) - set(names))
        if unknown:
            raise ValueError(f"data resume: saved buckets {unknown} are not in this run's set {list(names)}")
        return [(names.index(n), Waiting.from_list(item)) for n in names for item in waiting.get(n, [])]

    def restore(self, bucket: int, sample: Any, where: Waiting) -> None:
        """Put back a sample that waited when the state was saved (no emission: it was not full)."""
        self.buffers[bucket].append((sample, where))

    def add(self, bucket: int, sample: Any, where: Optional[Waiting]) -> Optional[tuple[int, list[Item]]]:
        """Buffer a sample; returns (bucket, its micro-batch) when that fills the buffer."""
        self.buffers[bucket].append((sample, where))
        if len(self.buffers[bucket]) < self.batch_size:
            return None
        return self._emit(bucket)

    def _emit(self, bucket: int) -> tuple[int, list[Item]]:
        batch, self.buffers[bucket] = self.buffers[bucket], []
        self.samples[bucket] += len(batch)
        self.batches[bucket] += 1
        return bucket, batch

    def end_epoch(self, counts: Callable[[Waiting], bool] = lambda w: True) -> None:
        """An epoch ended (of the whole stream, or with `data.mix=weighted` of one source, whose
        samples `counts` picks): its samples still waiting are carried into the next."""
        self.carried += sum(1 for buffer in self.buffers for _, where in buffer if where is not None and counts(where))

    def drain(self) -> Iterator[tuple[int, list[Item]]]:
        """The partial buffers as short micro-batches, in bucket order: only at a stream's end."""
        for bucket, buffer in enumerate(self.buffers):
            if buffer:
                yield self._emit(bucket)

    def waiting(self) -> int:
        return sum(len(b) for b in self.buffers)

    def state(self) -> dict:
        return {
            "waiting": {n: [w.to_list() for _, w in b if w is not None] for n, b in zip(self.names, self.buffers)},
            "samples": dict(zip(self.names, self.samples)),
            "batches": dict(zip(self.names, self.batches)),
            "carried": self.carried,
        }
