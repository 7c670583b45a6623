"""Ranks as threads of this process: `run_ranks(world_size, fn)` runs `fn(rank)` on one thread per
rank, each a member of one process group over torch's in-process test backend ("threaded"), so
the code under test calls `torch.distributed` as it does in a real job (broadcast, all-gather,
all-reduce, barrier) without paying a process start per rank. For the agreements between ranks:
what one rank sees differently (a lagging listing, a short read, a failure) and what all must
then do together.

A rank that raises is re-raised here after every thread is done; one that never returns (a peer
left waiting in a collective, the very bug these tests look for) fails the test after `timeout`
seconds instead of hanging the session (its thread is a daemon and is left behind)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.multi_threaded_pg import _install_threaded_pg, _uninstall_threaded_pg

T = TypeVar("T")


def run_ranks(world_size: int, fn: Callable[[int], T], timeout: float = 120.0) -> list[T]:
    """`fn(rank)` on `world_size` threads named `rank0`, `rank1`, ...; their results by rank."""
    results: dict[int, Any] = {}
    errors: dict[int, BaseException] = {}
    store = dist.HashStore()

    def body(rank: int) -> None:
        dist.init_process_group("threaded", rank=rank, world_size=world_size, store=store)
        try:
            results[rank] = fn(rank)
        except BaseException as e:  # noqa: BLE001 -- handed to the test's thread below
            errors[rank] = e
        finally:
            dist.destroy_process_group()

    torch._C._distributed_c10d._set_thread_isolation_mode(True)
    _install_threaded_pg()
    threads = [threading.Thread(target=body, args=(r,), name=f"rank{r}", daemon=True) for r in range(world_size)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
        stuck = [t.name for t in threads if t.is_alive()]
    finally:
        _uninstall_threaded_pg()
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
    if errors:
        raise errors[min(errors)]
    assert not stuck, f"{stuck} still running after {timeout} s: left waiting in a collective?"
    return [results[r] for r in range(world_size)]
