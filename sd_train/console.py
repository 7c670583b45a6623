"""What sd-train prints: one rank-aware logger for its own lines, and the known third-party noise
silenced in one place.

Every runtime module logs through the standard `logging` module under the `sd_train` logger
(`log = logging.getLogger(__name__)`). A record is printed by the main process only (rank 0, read
from the launcher's environment until the process group says otherwise); a record logged with
`extra=ANY_RANK` is printed by every rank, prefixed `[rank R]`. Lines go to stdout as plain text
(warnings as `WARNING: ...`), so the console reads as it did when these were prints. DEBUG lines
(each checkpoint saved, ...) appear with `--verbose`.

Torch-free and below every other module: the config checks log through it before torch loads.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

LOGGER = "sd_train"
# `log.info(..., extra=ANY_RANK)`: printed by every rank, not only the main process.
ANY_RANK = {"any_rank": True}


def _launcher_rank() -> int:
    """This process's rank as torchrun / accelerate (RANK) or srun (SLURM_PROCID) set it; 0 alone."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


class _RankFilter(logging.Filter):
    """Lets through what the main process logs, and what any rank logs with ANY_RANK."""

    def __init__(self) -> None:
        super().__init__()
        self.rank = _launcher_rank()

    def filter(self, record: logging.LogRecord) -> bool:
        any_rank = bool(getattr(record, "any_rank", False))
        record.rank_prefix = f"[rank {self.rank}] " if any_rank else ""
        return any_rank or self.rank == 0


class _PlainFormatter(logging.Formatter):
    """The message as written; warnings and errors say so first."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.ERROR:
            text = f"ERROR: {text}"
        elif record.levelno >= logging.WARNING:
            text = f"WARNING: {text}"
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        return f"{getattr(record, 'rank_prefix', '')}{text}"


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (pytest swaps it), flushed per line."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


_FILTER = _RankFilter()


def _install() -> logging.Logger:
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(_PlainFormatter())
        handler.addFilter(_FILTER)
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # printed once, by our handler, whatever the root logger does
    return logger


_install()


def set_rank(rank: int) -> None:
    """The rank the process group gave this process (the launcher's environment said it first)."""
    _FILTER.rank = rank


def is_main() -> bool:
    """Whether this process prints what only the main process prints."""
    return _FILTER.rank == 0


def set_verbose(verbose: bool) -> None:
    """`--verbose`: sd-train's DEBUG lines too, and no third-party filtering (see quiet_third_party)."""
    logging.getLogger(LOGGER).setLevel(logging.DEBUG if verbose else logging.INFO)


# ---- third-party noise ---------------------------------------------------------------------------
# Each entry: the logger or warning category, the text it starts with or contains, and why it is
# safe to drop. Installed before the libraries are imported (the filters survive their logging
# setup), by the entry points, unless --verbose.
_LOG_FILTERS: list[tuple[str, str, str]] = [
    (
        "transformers.utils.import_utils",
        "requires torchvision (not installed)",
        "printed at import for every image processor class; torchvision has no build for the pinned torch, and "
        "sd-train never uses an image processor (no safety checker, no feature extractor)",
    ),
    (
        "DeepSpeed",
        "Setting accelerator to CPU",
        "printed when deepspeed is imported on a machine without a GPU, also in an FSDP2 run (the pipeline's "
        "save_pretrained imports it when it is installed); on CPU it says nothing a user can act on",
    ),
]
_WARNING_FILTERS: list[tuple[str, str]] = [
    (
        r"torch\.distributed is disabled, unavailable or uninitialized",
        "`sd-train export` and `posthoc` read checkpoints in one process on purpose (no_dist=True)",
    ),
]


# Environment defaults read by a library when it is imported (a value the user set wins).
_ENV_DEFAULTS: list[tuple[str, str, str]] = [
    (
        "TQDM_DISABLE",
        "1",
        "tqdm's default for every bar a library draws: transformers' `Loading weights` and `Writing model shards`, "
        "diffusers' `Loading pipeline components` (on every rank, for parts that load in milliseconds); "
        "sd-train's own training bar passes disable=False and is drawn by the main process only",
    ),
]


class _DropMessages(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def quiet_third_party() -> None:
    """Drop the known third-party lines above (idempotent). Call before torch, transformers or
    deepspeed are imported: some of these lines are printed at import time."""
    for logger_name, fragment, _why in _LOG_FILTERS:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropMessages) and f.fragment == fragment for f in logger.filters):
            logger.addFilter(_DropMessages(fragment))
    for pattern, _why in _WARNING_FILTERS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, value, _why in _ENV_DEFAULTS:
        os.environ.setdefault(name, value)


def setup(verbose: bool = False) -> None:
    """What every entry point calls first: sd-train's level, and the third-party filters unless verbose."""
    set_verbose(verbose)
    if not verbose:
        quiet_third_party()
