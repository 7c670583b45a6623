"""sd-train: train Stable Diffusion UNets with FSDP2, a sharded late-start EMA and per-rank checkpoints."""

__version__ = "0.1.0"
