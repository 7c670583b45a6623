"""Elastic data resume (sd_train.data.elastic): after a world-size or worker-count change, the keys
handed out before the change and after it hold every sample of each epoch exactly once.

Ranks are emulated in one process (a loader per rank); workers are real DataLoader worker
processes. The old run's loaders read a number of batches each (as ranks do in step), their states
go to every new rank (`load_saved_world`, as the checkpointer hands them over), and the new loaders
read to the end (`max_epochs`). The expected keys are independent of the code under test: the
committed tiny set holds keys 000000000..000000027, re-packed into 12 shards so that 4 x 2 slots
have one each; with buckets, the reference is a straight one-slot run of one epoch.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from sd_train.data.loader import TrainLoader
from tests.support.streams import SPEC, augmented_loader, bucket_loader, keys_of, repack, take

ALL_KEYS = [f"{i:09d}" for i in range(28)]
Make = Callable[..., TrainLoader]


@pytest.fixture(scope="module")
def twelve(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny set in 12 shards of 2 or 3 samples."""
    return repack(SPEC, tmp_path_factory.mktemp("twelve"), 12)


def square(spec: str, **kw) -> TrainLoader:
    return augmented_loader(spec, **({"seed": 0, "batch": 2, "shuffle": 0, "max_epochs": None} | kw))


def before(make: Make, world: int, workers: int, steps: int, **kw) -> tuple[list[str], list[dict]]:
    """Keys handed out by every rank of the old run in `steps` batches each, and the ranks' states."""
    keys, states = [], []
    for rank in range(world):
        loader = make(rank=rank, world=world, workers=workers, **kw)
        keys += keys_of(take(loader, steps))
        states.append(loader.state_dict())
    return keys, states


def after(make: Make, states: list[dict], world: int, workers: int, **kw) -> list[str]:
    """Keys handed out by every rank of the new run, resumed from `states`, to its end. The ranks'
    `samples_seen` carry on: at the end they sum to every sample handed out, before and after."""
    keys, seen = [], 0
    for rank in range(world):
        loader = make(rank=rank, world=world, workers=workers, **kw)
        loader.load_saved_world(states)
        assert loader.reshard_epoch is None  # elastic: no skip to the next epoch
        keys += keys_of(list(loader))
        seen += loader.samples_seen()
    before = sum(sd["samples_seen"] for sd in states)
    assert seen == before + len(keys) - sum(len(w) for sd in states for w in _waiting(sd))
    return keys


def _waiting(state: dict) -> list[list]:
    """The samples waiting in a saved rank's bucket buffers (decoded, counted, not handed out)."""
    return [s for w in state["workers"] for s in (w.get("buckets") or {}).get("waiting", {}).values()]


def epochs_of(states: list[dict]) -> set[int]:
    return {w["epoch"] for sd in states for w in sd["workers"]}


@pytest.mark.parametrize(
    "old,new,steps,shuffle,epochs",
    [
        ((4, 2), (3, 1), 1, 0, 1),  # mid-epoch
        ((4, 2), (3, 1), 1, 4, 1),  # samples held in the shuffle buffers
        ((4, 2), (3, 1), 4, 4, 2),  # some slots already in epoch 1, others still in epoch 0
        ((2, 1), (1, 1), 7, 4, 2),
        ((1, 1), (2, 1), 16, 4, 2),  # one slot, in epoch 1: epoch 1's rest, then epoch 2 split over 2
        ((1, 2), (2, 2), 14, 4, 3),
    ],
)
def test_every_unread_sample_once_after_a_world_size_change(
    twelve: str, old: tuple[int, int], new: tuple[int, int], steps: int, shuffle: int, epochs: int, caplog
) -> None:
    make = lambda **kw: square(twelve, shuffle=shuffle, max_epochs=epochs, **kw)  # noqa: E731
    keys, states = before(make, *old, steps)
    if epochs > 1 and old != (1, 1):  # the change falls where the slots are in different epochs
        assert len(epochs_of(states)) == 2, epochs_of(states)
    with caplog.at_level(logging.WARNING, logger="sd_train.data.loader"):
        keys += after(make, states, *new)
    assert Counter(keys) == Counter(ALL_KEYS * epochs)
    assert f"data position: resharded from {old[0]}x{old[1]} to {new[0]}x{new[1]} slots" in caplog.text


def test_a_worker_count_change_reshards_within_each_rank(twelve: str, caplog) -> None:
    """Same world size, 1 -> 2 workers: each rank spreads its own rest over its new workers, from its
    own state alone (load_state_dict, as a same-size checkpoint hands it over)."""
    make = lambda **kw: square(twelve, shuffle=4, max_epochs=2, **kw)  # noqa: E731
    keys, states = before(make, 2, 1, 7)
    assert len(epochs_of(states)) == 2
    with caplog.at_level(logging.WARNING, logger="sd_train.data.loader"):
        for rank, state in enumerate(states):
            loader = make(rank=rank, world=2, workers=2)
            loader.load_state_dict(state)
            keys += keys_of(list(loader))
    assert Counter(keys) == Counter(ALL_KEYS * 2)
    assert "data position: resharded rank 1 from 1 to 2 workers; every sample not handed out" in caplog.text


def test_a_second_change_during_the_first_ones_rest(twelve: str) -> None:
    """4x2 -> 3x1, a step on each rank (still inside the spread rest), then -> 2x1: still exactly once."""
    make = lambda **kw: square(twelve, shuffle=4, max_epochs=2, **kw)  # noqa: E731
    keys, states = before(make, 4, 2, 4)
    middle = []
    for rank in range(3):
        loader = make(rank=rank, world=3, workers=1)
        loader.load_saved_world(states)
        keys += keys_of(take(loader, 1))
        middle.append(loader.state_dict())
    assert any("plan" in w for sd in middle for w in sd["workers"])  # the second change falls inside the rest
    keys += after(make, middle, 2, 1)
    assert Counter(keys) == Counter(ALL_KEYS * 2)


def assert_resume_in_the_rest_replays_bitwise(make, states: list[dict], head: int) -> None:
    """Rank 1 of 3x1 after a change from `states`: stopped after `head` batches (inside the spread
    rest) and resumed at the same size, it gives the very batches of the uninterrupted run."""
    straight = make(rank=1, world=3, workers=1)
    straight.load_saved_world(states)
    reference = list(straight)
    first = make(rank=1, world=3, workers=1)
    first.load_saved_world(states)
    batches = take(first, head)
    assert "plan" in first.state_dict()["workers"][0]
    second = make(rank=1, world=3, workers=1)
    second.load_state_dict(first.state_dict())
    resumed = batches + list(second)
    assert keys_of(resumed) == keys_of(reference)
    for got, want in zip(resumed, reference, strict=True):
        assert torch.equal(got["pixels"], want["pixels"]) and got["position"] == want["position"]


def test_the_same_size_during_the_rest_replays_bitwise(twelve: str) -> None:
    """After 4x2 -> 3x1, a stop and resume at 3x1 gives the very batches of the uninterrupted run."""
    make = lambda **kw: square(twelve, shuffle=4, max_epochs=2, **kw)  # noqa: E731
    _, states = before(make, 4, 2, 4)
    assert_resume_in_the_rest_replays_bitwise(make, states, head=2)


def test_weighted_mixing_during_the_rest_replays_bitwise(twelve: str) -> None:
    """data.mix=weighted, 2x2 -> 3x1, then a stop and resume at 3x1 inside the spread rest: the
    saved position keeps the plan of each source's current epoch, so the very batches follow."""
    folder = Path(twelve).parent
    spec = f"{folder}/part-{{000000..000005}}.tar@3.0::{folder}/part-{{000006..000011}}.tar@1.0"
    make = lambda **kw: augmented_loader(spec, seed=0, batch=1, shuffle=4, max_epochs=1, mix="weighted", **kw)  # noqa: E731
    states = []
    for rank in range(2):
        loader = make(rank=rank, world=2, workers=2)
        take(loader, 5)
        states.append(loader.state_dict())
    assert_resume_in_the_rest_replays_bitwise(make, states, head=3)


@pytest.mark.parametrize("weights", [(3.0, 1.0), (1.0, 3.0)])
def test_weighted_mixing_keeps_each_source_once_per_its_own_epoch(twelve: str, weights: tuple[float, float]) -> None:
    """data.mix=weighted, 2x2 -> 3x1. Source A = shards 0-5 (keys 0..15), B = shards 6-11 (16..27).
    One sample a batch, so the position after a batch says which source epoch its sample came
    from. Each source's epoch 0 is read exactly once over the change (the faster one's also in
    the epochs it went on to, none twice in an epoch)."""
    folder = Path(twelve).parent
    spec = f"{folder}/part-{{000000..000005}}.tar@{weights[0]}::{folder}/part-{{000006..000011}}.tar@{weights[1]}"
    make = lambda **kw: augmented_loader(spec, seed=0, batch=1, shuffle=4, max_epochs=1, mix="weighted", **kw)  # noqa: E731
    tagged: list[tuple[int, int, str]] = []  # (source, its epoch, key)

    def tag(batches: list[dict]) -> None:
        for b in batches:
            source = int(b["keys"][0] >= ALL_KEYS[16])
            tagged.append((source, b["position"]["sources"][source][0], b["keys"][0]))

    states = []
    for rank in range(2):
        loader = make(rank=rank, world=2, workers=2)
        tag(take(loader, 5))
        states.append(loader.state_dict())
    assert all(w["sources"][0][1] or w["sources"][1][1] for sd in states for w in sd["workers"])  # mid-epoch
    for rank in range(3):
        loader = make(rank=rank, world=3, workers=1)
        loader.load_saved_world(states)
        tag(list(loader))
    for source, keys in ((0, ALL_KEYS[:16]), (1, ALL_KEYS[16:])):
        assert Counter(k for s, e, k in tagged if (s, e) == (source, 0)) == Counter(keys), source
        for epoch in {e for s, e, _ in tagged if s == source}:
            read = [k for s, e, k in tagged if (s, e) == (source, epoch)]
            assert len(read) == len(set(read)), (source, epoch)


@pytest.mark.parametrize("old,new,steps,epochs", [((2, 2), (3, 1), 2, 1), ((3, 1), (1, 2), 2, 2)])
def test_buckets_every_usable_sample_once_with_the_waiting_ones(
    old: tuple[int, int], new: tuple[int, int], steps: int, epochs: int
) -> None:
    """data.buckets on the LAION-like set: the samples waiting in bucket buffers at the change are
    handed out once after it, like every unread one. Reference: a straight one-slot run."""
    usable = keys_of(list(bucket_loader(workers=1, max_epochs=1)))
    assert len(usable) == len(set(usable)) > 20
    make = lambda **kw: bucket_loader(max_epochs=epochs, **kw)  # noqa: E731
    keys, states = before(make, *old, steps)
    waiting = [s for sd in states for w in sd["workers"] for s in w["buckets"]["waiting"].values() if s]
    assert waiting  # the change falls while samples wait in bucket buffers
    if epochs > 1:  # and, over two epochs, where the slots are in different ones
        assert len(epochs_of(states)) == 2
    keys += after(make, states, *new)
    assert Counter(keys) == Counter(usable * epochs)


def test_positions_without_their_reader_and_resampled_mode_start_the_next_epoch(twelve: str) -> None:
    """What cannot be elastic says so and keeps working: a state saved before positions recorded their
    reader, and data.mode=resampled (no exactly-once promise), start every worker at the next epoch."""
    make = lambda **kw: square(twelve, shuffle=4, **kw)  # noqa: E731
    _, states = before(make, 2, 2, 2)
    for sd in states:
        for w in sd["workers"]:
            del w["reading"]
    loader = make(rank=0, world=3, workers=1)
    with pytest.warns(UserWarning, match="starts at the beginning of epoch 1"):
        loader.load_saved_world(states)
    assert loader.reshard_epoch == 1
    resampled = lambda **kw: square(twelve, mode="resampled", **kw)  # noqa: E731
    _, states = before(resampled, 2, 1, 2)
    loader = resampled(rank=0, world=1, workers=1)
    with pytest.warns(UserWarning, match="data.mode=resampled has no exactly-once promise"):
        loader.load_saved_world(states)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(keys_of(take(loader, 3))) == 6
