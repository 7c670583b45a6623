"""Which submodules of a diffusers UNet2DConditionModel become FSDP units: model knowledge, kept
next to the model (as torchtitan keeps `parallelize.py` beside each model), while the generic
wrapping lives in sd_train.parallel.fsdp. `dist.fsdp_units=blocks` wraps the 9 down/mid/up blocks
(SD2-base: 10.9M to 260.3M params each); `layers` wraps each resnet and transformer block of them
as well (about 40 units for SD2), the block keeping only its up/downsampler (and, where a
Transformer2DModel is split into its blocks, that model's norm and input/output projections).

SDXL's Transformer2DModels hold 2 or 10 BasicTransformerBlocks each (70 in all, 60 of ~35M params
at 1280 channels), so one Transformer2DModel at the lowest resolution is ~350M params: under
`layers` each BasicTransformerBlock is a unit of its own. SD 1.x/2.x's hold one block each and stay
one unit, as before."""

from __future__ import annotations

import torch


def fsdp_units(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """Each down, mid and up block, in forward order. Sharding per block means one block's full
    parameters exist at a time during forward and backward; the root wrap takes the rest (conv_in,
    conv_out, the time and class embeddings)."""
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    return [block for block in blocks if block is not None]


def block_layers(block: torch.nn.Module) -> list[torch.nn.Module]:
    """The resnets and transformer blocks of one UNet block, in the order its forward runs them
    (diffusers registers `attentions` before `resnets`, but runs resnet, attention, resnet, ...; the
    mid block runs one resnet first). Up- and downsamplers are left to the block's own unit."""
    resnets = list(getattr(block, "resnets", []))
    attentions = [_transformer_units(a) for a in getattr(block, "attentions", None) or []]
    if not attentions:
        return resnets
    if len(resnets) == len(attentions) + 1:  # UNetMidBlock2DCrossAttn: resnet, (attention, resnet)*
        order = [resnets[0]]
        for attention, resnet in zip(attentions, resnets[1:]):
            order += [*attention, resnet]
        return order
    order = []
    for resnet, attention in zip(resnets, attentions):
        order += [resnet, *attention]
    return order


def _transformer_units(attention: torch.nn.Module) -> list[torch.nn.Module]:
    """A Transformer2DModel as units: itself when it holds one transformer block (SD 1.x/2.x), else
    each of its blocks in order (SDXL), its projections and norm staying with the enclosing unit."""
    blocks = list(getattr(attention, "transformer_blocks", None) or [])
    return blocks if len(blocks) > 1 else [attention]
