"""The errors a user is meant to read: each names what is wrong and how to fix it.

Torch-free, and below every other module, so the config code, the data readers and the
checkpointer raise the same classes and the entry point can tell them from a bug.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is wrong. The message names the field and says how to fix it."""


class UsageError(ValueError):
    """A command's argument is wrong (a path that is not there, a folder of another kind). The
    message names the argument and what to give instead; `sd-train` prints it and exits 2."""


class BadDataError(RuntimeError):
    """Too much of the input read so far was bad; the message names the shards and the share."""


class CheckpointLoadError(RuntimeError):
    """Checkpoints exist but none could be loaded."""


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""
