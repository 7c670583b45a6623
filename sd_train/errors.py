"""The errors a user is meant to read: each names what is wrong and how to fix it.

Torch-free, and below every other module, so the config code, the data readers and the
checkpointer raise the same classes and the entry point can tell them from a bug.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is wrong. The message names the field and says how to fix it."""


class BadDataError(RuntimeError):
    """Too much of the input read so far was bad; the message names the shards and the share."""


class CheckpointLoadError(RuntimeError):
    """Checkpoints exist but none could be loaded."""


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class OutputRefusedError(ConfigError):
    """An output folder (`--out`, `output_dir`) would replace or overwrite what sd-train did not write
    there, or what a run in progress holds. The message names what is there and the way out."""
