"""Helpers shared by the data tests: build a loader over a shard spec, read a number of batches
from it, and their keys."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any, Optional

from sd_train.data.buckets import BucketSet, generate_buckets
from sd_train.data.decode import ImageTransform
from sd_train.data.loader import TrainLoader
from sd_train.data.sources import expand_sources
from sd_train.data.stream import ShardStream

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SPEC = str(ASSETS / "tiny-{000000..000005}.tar")
"""The committed tiny set: 28 samples in 6 shards, keys 000000000..000000027 (tests/assets/make_assets.py)."""
LAION_SPEC = str(ASSETS / "laion" / "laion-{000000..000005}.tar")
"""The committed LAION-like set: 36 samples of web-like sizes in 6 shards, keys 000000200..000000235."""


def laion_buckets(misfits: str = "filter") -> BucketSet:
    """The buckets of a 32 px run with a pixel factor of 4 (the LAION-like set's scale), 1:4 to 4:1:
    16x64, 20x48, 24x40, 28x36, 32x32 and their transposes."""
    return BucketSet.of(generate_buckets(32, 4, 4.0), 4.0, misfits)  # type: ignore[arg-type]


def bucket_loader(
    *,
    rank: int = 0,
    world: int = 1,
    workers: int = 2,
    seed: int = 0,
    batch: int = 3,
    shuffle: int = 4,
    max_epochs: Optional[int] = None,
    misfits: str = "filter",
    spec: str = LAION_SPEC,
    **stream_options: Any,
) -> TrainLoader:
    """A TrainLoader over the LAION-like set in `laion_buckets`, random crops and flips (so a resume
    must replay each waiting sample's augment RNG)."""
    stream = ShardStream(
        expand_sources(spec), rank=rank, world_size=world, num_workers=workers, seed=seed, batch_size=batch,
        transform=ImageTransform(32, center_crop=False, random_flip=True, buckets=laion_buckets(misfits)),
        shuffle_buffer=shuffle, max_epochs=max_epochs, **stream_options,
    )  # fmt: skip
    return TrainLoader(stream, workers)


def augmented_loader(
    spec: str,
    *,
    rank: int,
    world: int,
    workers: int,
    seed: int,
    batch: int,
    shuffle: int,
    max_epochs: Optional[int],
    **stream_options: Any,
) -> TrainLoader:
    """A TrainLoader over `spec` at 16 px with random crops (the test assets are not all square)
    and flips, so a resume must replay the augment RNG. `stream_options` go to ShardStream."""
    stream = ShardStream(
        expand_sources(spec),
        rank=rank,
        world_size=world,
        num_workers=workers,
        seed=seed,
        batch_size=batch,
        transform=ImageTransform(16, center_crop=False, random_flip=True),
        shuffle_buffer=shuffle,
        max_epochs=max_epochs,
        **stream_options,
    )
    return TrainLoader(stream, workers)


def make_loader(
    spec: str = SPEC,
    *,
    rank: int = 0,
    world: int = 1,
    workers: int = 2,
    seed: int = 0,
    batch: int = 3,
    shuffle: int = 4,
    mode: str = "epoch",
    max_epochs: Optional[int] = None,
) -> TrainLoader:
    """`augmented_loader` over the committed tiny set with the data tests' defaults."""
    return augmented_loader(
        spec, rank=rank, world=world, workers=workers, seed=seed, batch=batch, shuffle=shuffle,
        max_epochs=max_epochs, mode=mode,
    )  # fmt: skip


def take(loader: TrainLoader, n: int) -> list[dict]:
    it = iter(loader)
    try:
        return list(islice(it, n))
    finally:
        it.close()  # also on an error: its workers stop


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def stop_and_resume(
    make: Callable[[], TrainLoader],
    head: int,
    tail: Optional[int],
    resume_with: Optional[Callable[[], TrainLoader]] = None,
) -> tuple[list[dict], TrainLoader]:
    """The batches of a loader from `make` stopped after `head` batches, then of a new one (from
    `resume_with`, default `make`) loaded with its state: `tail` more, or to the end when None.
    Returns them and the resumed loader, for the test to hold against an uninterrupted run."""
    first = make()
    batches = take(first, head)
    second = (resume_with or make)()
    second.load_state_dict(first.state_dict())
    return batches + (list(second) if tail is None else take(second, tail)), second


def repack(spec: str, folder: Path, shards: int, name: str = "part") -> str:
    """The samples of the shards in `spec`, in order, written again as `shards` shards of nearly equal
    size (the first ones one sample longer) under `folder`; returns their brace spec. More shards
    than the committed sets hold, for runs of more slots."""
    samples: list[list[tuple[str, bytes]]] = []
    for url in expand_sources(spec)[0].urls:
        with tarfile.open(url) as tar:
            for member in tar.getmembers():
                key = member.name.split(".")[0]
                if not samples or samples[-1][0][0].split(".")[0] != key:
                    samples.append([])
                samples[-1].append((member.name, tar.extractfile(member).read()))  # type: ignore[union-attr]
    folder.mkdir(parents=True, exist_ok=True)
    size, extra = divmod(len(samples), shards)
    start = 0
    for i in range(shards):
        n = size + (i < extra)
        with tarfile.open(folder / f"{name}-{i:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for members in samples[start : start + n]:
                for member_name, data in members:
                    info = tarfile.TarInfo(member_name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        start += n
    return str(folder / f"{name}-{{000000..{shards - 1:06d}}}.tar")
