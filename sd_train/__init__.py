"""sd-train: train Stable Diffusion UNets with FSDP2, a sharded late-start EMA and per-rank checkpoints."""

# Installs the rank-aware console handler of the `sd_train` logger before any module logs.
from sd_train import console  # noqa: F401

__version__ = "0.1.0"
