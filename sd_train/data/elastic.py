"""Elastic data resume: the rest of the interrupted epochs, spread over another number of slots.

A slot is one (rank, worker). In `data.mode=epoch` the shard order of an epoch is seeded by
(seed, epoch) alone, and every saved worker position records how far its reader got and what its
shuffle buffer held (`sd_train.data.pieces`), so the saved positions of all ranks together name
every sample of the epoch that was not handed out yet:
- the samples held in a shuffle buffer, and those waiting in a bucket buffer (`data.buckets`);
- the rest of the shard each slot was reading;
- the shards each slot had not started.
Slots move on to their next epoch by themselves, so at a checkpoint some may be an epoch ahead of
others: for each epoch from the lowest to the highest a slot was in, the rest is taken over the
slots still in or before it.

`reshard` lays that rest out over the new slots, deterministically from the saved positions, the
seed and the new world size and worker count: pieces in a fixed order (single samples, then shard
rests, then whole shards), split over the new slots like a normal epoch (`split_for_slot`). Each
new worker records its share as a plan (`WorkerPosition.plan`), reads it through its shuffle buffer
and then goes on with the next epochs split the normal way for the new size. The plan is part of
the position, so a run can stop and resume again during it, at the same size (an exact replay) or
at another (the plan's rest is spread again).

With `data.mix=weighted` each source has its own epochs: the same is done per source. Samples that
waited in a bucket buffer go first into their source's lowest epoch; they are decoded again (with
their new slot's seeds), and `good` is lowered by their number so that they are not counted twice.

What is not kept: the order of the samples (and so the crop and flip draws) differs from a straight
run at the new size, and from the old run. Not elastic (the loader falls back to the next epoch):
`data.mode=resampled`, which has no exactly-once promise, a changed seed, shard list or bucket set,
and positions saved before they recorded their reader.

The cumulative counts of the old slots (good, bad input, filtered, per-source and per-bucket counts)
go to worker 0 of new rank 0 (of each rank, when only the worker count changed), so that the sums
over ranks carry on.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

from sd_train.data.bad_input import MAX_BAD_SHARDS
from sd_train.data.batching import BucketBuffers
from sd_train.data.pieces import Piece, as_piece, split_for_slot
from sd_train.data.stream import ShardStream, WorkerPosition

ELASTIC_CHANGES = frozenset({"world_size", "num_workers", "micro_batch_size", "shuffle_buffer"})
"""Identity fields that may differ between a saved position and the run for an elastic resume."""


@dataclass
class Slot:
    """One saved (rank, worker) and its position."""

    rank: int
    worker: int
    position: WorkerPosition


@dataclass
class Resharded:
    """The new positions of this rank's workers, and what happened, in words."""

    positions: list[WorkerPosition]
    message: str


def _stream_epoch(position: WorkerPosition, stream: int, weighted: bool) -> tuple[int, int]:
    """(epoch, raw samples taken in it) of one epoch stream of a saved position."""
    if weighted and position.sources:
        epoch, offset, _ = position.sources[stream]
        return epoch, offset
    return position.epoch, position.offset if not weighted else 0


def _old_pieces(new: ShardStream, slot: Slot, stream: int, epoch: int, old_world: int, old_workers: int) -> list[Piece]:
    """The pieces the saved slot read (or was to read) in `epoch` of `stream`: its plan's, else its
    normal share at the old world size and worker count."""
    for planned, pieces in (slot.position.plan or [[]] * (stream + 1))[stream]:
        if planned == epoch:
            return [as_piece(p) for p in pieces]
    source = stream if new.mix == "weighted" else None
    shards = split_for_slot(new.epoch_order(epoch, source), slot.rank, old_world, slot.worker, old_workers)
    return [(new.shard_position(u), 0, None) for u in shards]


def remainder(pieces: list[Piece], reading: list) -> list[Piece]:
    """What a slot has not handed out of its epoch's `pieces`, given its reader state `reading`
    ([piece, next ordinal, held samples]): the held samples (one piece per shard), the rest of the
    cursor's piece, and the pieces after it."""
    cursor, after, held = int(reading[0]), int(reading[1]), reading[2]
    by_shard: dict[int, list[int]] = defaultdict(list)
    for shard, ordinal in held:
        by_shard[int(shard)].append(int(ordinal))
    rest: list[Piece] = [(shard, 0, tuple(sorted(ords))) for shard, ords in by_shard.items()]
    if cursor < len(pieces):
        shard, start, ordinals = pieces[cursor]
        if ordinals is None:
            rest.append((shard, max(start, after), None))
        elif [o for o in ordinals if o >= after]:
            rest.append((shard, start, tuple(o for o in ordinals if o >= after)))
        rest += pieces[cursor + 1 :]
    return rest


def _epoch_rest(
    new: ShardStream, slots: list[Slot], stream: int, epoch: int, old_world: int, old_workers: int
) -> Optional[list[Piece]]:
    """Every piece of `epoch` (of `stream`) not handed out by the saved slots; None when a slot in
    that epoch has a position without its reader state (saved before positions recorded it)."""
    weighted = new.mix == "weighted"
    rest: list[Piece] = []
    for slot in slots:
        at, taken = _stream_epoch(slot.position, stream, weighted)
        if at > epoch:
            continue
        pieces = _old_pieces(new, slot, stream, epoch, old_world, old_workers)
        reading = slot.position.reading[stream] if slot.position.reading else None
        if at < epoch or (reading is None and taken == 0):
            rest += pieces
        elif reading is None:
            return None
        else:
            rest += remainder(pieces, reading)
    return rest


def _waiting(new: ShardStream, slots: list[Slot], streams: int) -> tuple[list[list[Piece]], int]:
    """(per epoch stream, the samples that waited in the saved bucket buffers as pieces; their number)."""
    out: list[list[Piece]] = [[] for _ in range(streams)]
    count = 0
    if new.buckets is None:
        return out, count
    for slot in slots:
        by_shard: dict[int, list[int]] = defaultdict(list)
        for _, where in BucketBuffers.saved_waiting(slot.position.buckets, new.buckets.names):
            by_shard[where.shard].append(where.ordinal)
            count += 1
        for shard, ordinals in by_shard.items():
            stream = new.source_of(shard) if new.mix == "weighted" else 0
            out[stream].append((shard, 0, tuple(sorted(ordinals))))
    return out, count


def _in_order(pieces: list[Piece]) -> list[Piece]:
    """Single samples, then shard rests, then whole shards (each kind keeps its order), so that the
    split gives every new slot its share of each kind."""
    return sorted(pieces, key=lambda p: 0 if p[2] is not None else 1 if p[1] > 0 else 2)


def _describe(stream: int, epoch: int, pieces: list[Piece], weighted: bool) -> str:
    whole = sum(1 for p in pieces if p[1] == 0 and p[2] is None)
    loose = sum(len(p[2]) for p in pieces if p[2] is not None)
    part = len(pieces) - whole - sum(1 for p in pieces if p[2] is not None)
    where = f"source {stream} epoch {epoch}" if weighted else f"epoch {epoch}"
    return f"{where}: {whole} whole shards, {part} shard rests and {loose} single samples left"


def reshard(states: list[dict], new: ShardStream, world: int, rank: int) -> Optional[Resharded]:
    """This rank's new worker positions from the saved positions `states` (one per saved rank, all
    of them), spreading the rest over `world` ranks of which this is `rank` (the new world; or, when
    only the worker count changed, this rank alone: world 1, rank 0). None when a saved position
    cannot say what it has read (the caller then starts the next epoch)."""
    old_world, old_workers = int(states[0]["world_size"]), max(1, int(states[0]["num_workers"]))
    slots = [
        Slot(int(sd["rank"]), w, WorkerPosition.from_dict(p))
        for sd in sorted(states, key=lambda sd: int(sd["rank"]))
        for w, p in enumerate(sd["workers"])
    ]
    weighted = new.mix == "weighted"
    streams = len(new.sources) if weighted else 1
    waiting, waited = _waiting(new, slots, streams)
    plans: list[list[list]] = [[[] for _ in range(streams)] for _ in range(new.num_workers)]
    starts, told = [], []
    for stream in range(streams):
        epochs = [_stream_epoch(s.position, stream, weighted)[0] for s in slots]
        starts.append(min(epochs))
        for epoch in range(min(epochs), max(epochs) + 1):
            rest = _epoch_rest(new, slots, stream, epoch, old_world, old_workers)
            if rest is None:
                return None
            rest = _in_order((waiting[stream] if epoch == min(epochs) else []) + rest)
            told.append(_describe(stream, epoch, rest, weighted))
            for w in range(new.num_workers):
                share = split_for_slot(rest, rank, world, w, new.num_workers)
                plans[w][stream].append([epoch, [[s, start, None if o is None else list(o)] for s, start, o in share]])
    positions = [
        WorkerPosition(epoch=min(starts), sources=[[e, 0, 0] for e in starts] if weighted else [], plan=plan)
        for plan in plans
    ]
    if rank == 0:
        _carry_counts(positions[0], [s.position for s in slots], waited, new)
    what = f"from {old_world}x{old_workers} to {world}x{new.num_workers} slots (ranks x workers)"
    if world == 1 and old_world == new.world_size > 1:  # only the worker count changed: this rank alone
        what = f"rank {new.rank} from {old_workers} to {new.num_workers} workers"
    message = (
        f"data position: resharded {what}; every sample not handed out yet is read once, in another order "
        f"({'; '.join(told)}), then the next epochs split the normal way"
    )
    return Resharded(positions, message)


def _carry_counts(into: WorkerPosition, old: list[WorkerPosition], waited: int, new: ShardStream) -> None:
    """The old slots' cumulative counts, summed into one new position (see the module doc)."""
    into.good = sum(p.good for p in old) - waited
    for p in old:
        for k, v in p.bad.items():
            into.bad[k] = into.bad.get(k, 0) + v
        for k, v in p.filtered.items():
            into.filtered[k] = into.filtered.get(k, 0) + v
    into.bad_shards = list(dict.fromkeys(s for p in old for s in p.bad_shards))[:MAX_BAD_SHARDS]
    if new.mix == "weighted":
        for i, src in enumerate(into.sources):
            src[2] = sum(p.sources[i][2] for p in old if p.sources)
        if new.buckets is not None:  # the waiting samples are counted again when they are decoded
            for slot_position in old:
                for _, where in BucketBuffers.saved_waiting(slot_position.buckets, new.buckets.names):
                    into.sources[new.source_of(where.shard)][2] -= 1
    if new.buckets is not None:
        states = [p.buckets or {} for p in old]
        into.buckets = {
            "waiting": {},
            "samples": {n: sum(s.get("samples", {}).get(n, 0) for s in states) for n in new.buckets.names},
            "batches": {n: sum(s.get("batches", {}).get(n, 0) for s in states) for n in new.buckets.names},
            "carried": sum(s.get("carried", 0) for s in states),
        }
