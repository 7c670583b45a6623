"""What one worker reads in an epoch, and how far it got: shard pieces, the shuffle buffer, the reader.

A worker's epoch is a list of pieces, each `[shard, start, ordinals]`: the shard's index in the
stream's shard list (`ShardStream.urls`), the first sample ordinal to read (`RawSample.ordinal`),
and either None (every sample from `start` on) or the sorted ordinals to read. A normal epoch is
whole shards, `[shard, 0, None]`, split over the slots by `split_for_slot`; after an elastic resume
(`sd_train.data.elastic`) an epoch may also hold the rest of a shard (`start > 0`) or single samples
that waited in another slot's shuffle or bucket buffer (`ordinals`).

`Reading` follows the reader as the worker goes: the last piece a sample came from and the ordinal
after it (`cursor`), and the samples read but still held in the shuffle buffer. With the epoch's
pieces this names every sample the worker has not emitted yet: the held ones, the rest of the
cursor's piece and the pieces after it. Its state is `[piece, next_ordinal, [[shard, ordinal], ...]]`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from typing import Any, Optional, TypeVar

from sd_train.data.bad_input import BadInputLog
from sd_train.data.tar import RawSample, read_shards

T = TypeVar("T")
Piece = tuple[int, int, Optional[tuple[int, ...]]]


def stable_seed(*parts: Any) -> int:
    """A stable 64-bit seed from a tuple (Python's hash() is salted per process for strings)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def split_for_slot(items: Sequence[T], rank: int, world_size: int, worker: int, num_workers: int) -> list[T]:
    """The share of (rank, worker): `items[rank::world_size][worker::num_workers]`."""
    return list(items[rank::world_size][worker::num_workers])


def as_piece(item: Sequence) -> Piece:
    """A piece from its saved (JSON) form."""
    shard, start, ordinals = item
    return int(shard), int(start), None if ordinals is None else tuple(int(o) for o in ordinals)


def shuffled(items: Iterator[T], size: int, rng: random.Random, buffer: Optional[list[T]] = None) -> Iterator[T]:
    """A shuffle buffer of `size` items; 0 or 1 keeps the order. Drains fully when `items` ends.

    Deterministic given `rng`: the k-th item out depends only on the first k + size - 1 items in,
    so replaying k items reproduces the buffer, the reader position and the RNG state exactly.
    `buffer` (a list the caller keeps) holds the items read and not yet given out, for `Reading`.
    """
    if size <= 1:
        yield from items
        return
    buffer = [] if buffer is None else buffer
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    while buffer:
        i = rng.randrange(len(buffer))
        buffer[i], buffer[-1] = buffer[-1], buffer[i]
        yield buffer.pop()


class Reading:
    """Owns how far one worker's reader got in its epoch's pieces, and its shuffle buffer's contents."""

    def __init__(self) -> None:
        self.cursor = (0, 0)
        self.held: list[RawSample] = []

    def state(self, shard_index: dict[str, int]) -> list:
        held = [[shard_index[raw.shard], raw.ordinal] for raw in self.held]
        return [self.cursor[0], self.cursor[1], held]


def read_pieces(
    pieces: Sequence[Piece], urls: Sequence[str], log: BadInputLog, reading: Reading
) -> Iterator[RawSample]:
    """The raw samples of `pieces` in order (undecoded), moving `reading.cursor` as each is read.
    Whole shards read exactly as `read_shards` reads their list; a piece with `ordinals` stops
    reading its shard after the last one."""
    for i, (shard, start, ordinals) in enumerate(pieces):
        wanted = None if ordinals is None else set(ordinals)
        last = None if not ordinals else ordinals[-1]
        raws = read_shards([urls[shard]], log)
        try:
            for raw in raws:
                if last is not None and raw.ordinal > last:
                    break
                if raw.ordinal < start or (wanted is not None and raw.ordinal not in wanted):
                    continue
                reading.cursor = (i, raw.ordinal + 1)
                yield raw
        finally:
            raws.close()
