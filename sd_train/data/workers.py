"""How a rank starts its loader workers: `fork` or `forkserver` (`data.worker_start`).

A rank starts its workers after its model is built. A forked worker maps every page the rank had
then, and each page the rank writes afterwards (every optimizer step writes all of the model and
optimizer state) is copied, the worker keeping the old one: the SD2-base rehearsal at 2 CPU ranks
showed ~2.1 GB of RSS per worker. A worker started from a forkserver (a fresh interpreter that
imported the data modules, and so torch) holds ~0.22 GiB of RSS whatever the model, but the server
costs a torch import once per rank (~1.2 s of CPU on an idle core), which small models need not pay.
Torch-free: the memory plan uses the same rule.
"""

from __future__ import annotations

from typing import Literal

FORKSERVER_MIN_BYTES = 256 * 2**20
"""`auto` starts workers from a forkserver once the rank holds at least this many bytes of UNet
parameters when they start; below it, forking copies less than a forkserver worker's own runtime."""


def worker_start_method(setting: str, rank_param_bytes: int) -> Literal["fork", "forkserver"]:
    """The start method of `data.worker_start` for a rank holding `rank_param_bytes` of parameters."""
    if setting in ("fork", "forkserver"):
        return setting  # type: ignore[return-value]
    return "forkserver" if rank_param_bytes >= FORKSERVER_MIN_BYTES else "fork"
