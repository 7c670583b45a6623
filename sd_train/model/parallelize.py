"""Which submodules of a diffusers UNet2DConditionModel become FSDP units: model knowledge, kept
next to the model (as torchtitan keeps `parallelize.py` beside each model), while the generic
wrapping lives in sd_train.parallel.fsdp."""

from __future__ import annotations

import torch


def fsdp_units(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """Each down, mid and up block, in forward order. Sharding per block means one block's full
    parameters exist at a time during forward and backward; the root wrap takes the rest (conv_in,
    conv_out, the time and class embeddings)."""
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    return [block for block in blocks if block is not None]
