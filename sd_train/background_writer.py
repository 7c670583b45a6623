"""Files the main process writes mid-run, written off the training thread.

Why. Under FSDP2 and DeepSpeed every rank meets the others in the next collective. A file the main
process writes on the training thread (a sample grid on a slow network disk) holds the other ranks
in that collective for as long as the write takes, and past `dist.timeout_s` the job dies. Written
by one background thread, the write overlaps training instead: nothing collective waits for it.
The end-of-run export already gathers first and writes with no collective pending
(sd_train.export); this is the same rule for the writes in between.

One thread, so the files are written in the order they were handed over. An error in a write is
raised at the next `submit` or at `close`, never lost. `close` waits for every write; the trainer
calls it after the process group is gone, when no peer can be left waiting.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any


class BackgroundWriter:
    """Owns one writer thread and the writes handed to it."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sd-train-writer")
        self._pending: list[concurrent.futures.Future] = []

    def submit(self, write: Callable[..., Any], *args: Any) -> None:
        """Queue `write(*args)`; first re-raise the error of any finished write."""
        self._reap(block=False)
        self._pending.append(self._pool.submit(write, *args))

    def pending(self) -> int:
        """Writes queued or running."""
        return sum(not f.done() for f in self._pending)

    def close(self) -> None:
        """Wait for every write; raise the first error."""
        try:
            self._reap(block=True)
        finally:
            self._pool.shutdown(wait=True)

    def _reap(self, block: bool) -> None:
        keep = []
        for f in self._pending:
            if block or f.done():
                f.result()  # raises the write's error
            else:
                keep.append(f)
        self._pending = keep
