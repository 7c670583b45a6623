"""Helpers shared by the data tests: read a number of batches from a loader, and their keys."""

from __future__ import annotations

from itertools import islice

from sd_train.data.loader import TrainLoader


def take(loader: TrainLoader, n: int) -> list[dict]:
    it = iter(loader)
    try:
        return list(islice(it, n))
    finally:
        it.close()  # also on an error: its workers stop


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["keys"]]
