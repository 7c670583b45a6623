"""SDXL's FSDP2 units and FLOPs. With `dist.fsdp_units=auto` an SDXL UNet is sharded per
transformer block and resnet as well as per down/mid/up block (a Transformer2DModel with several
blocks split into them), an SD UNet per block as before: checked on the wrapped tiny models in a
1-rank process group, and on SDXL base's own architecture on the meta device (unit sizes and the
FLOPs per image behind `speed/mfu`)."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from torch.distributed.fsdp import FSDPModule

from sd_train.config import DistArgs
from sd_train.model.family import SDXL_BASE_UNET
from sd_train.model.parallelize import block_layers, fsdp_units
from sd_train.parallel.build import shard_unet
from sd_train.perf import training_flops_per_image


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_auto_units_follow_the_family(tiny_assets, tiny_sdxl, info, family):
    model = tiny_sdxl["model"] if family == "sdxl" else tiny_assets["model"]
    unet = shard_unet(UNet2DConditionModel.from_pretrained(model, subfolder="unet"), DistArgs(strategy="fsdp2"), info)
    blocks = [b for b in unet.modules() if isinstance(b, BasicTransformerBlock)]
    resnets = [r for r in unet.modules() if isinstance(r, ResnetBlock2D)]
    assert all(isinstance(b, FSDPModule) for b in fsdp_units(unet))
    if family == "sd":  # per block only, as before
        assert not any(isinstance(m, FSDPModule) for m in blocks + resnets)
        return
    assert all(isinstance(r, FSDPModule) for r in resnets)
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        for attention in getattr(block, "attentions", None) or []:
            several = len(attention.transformer_blocks) > 1
            assert isinstance(attention, FSDPModule) != several  # split into its blocks when it holds several
            assert all(isinstance(b, FSDPModule) == several for b in attention.transformer_blocks)
    assert any(len(a.transformer_blocks) > 1 for a in unet.mid_block.attentions)


@pytest.fixture(scope="module")
def sdxl_base() -> torch.nn.Module:
    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_BASE_UNET)


def test_sdxl_base_units(sdxl_base):
    """2,567,463,684 params; 70 BasicTransformerBlocks (60 of 34.8M at 1280 channels). Per block,
    up_blocks[0] alone is 1.21B params; per layer, every transformer block is its own unit and
    no unit passes 50M."""
    assert numel(sdxl_base) == 2_567_463_684
    blocks = [m for m in sdxl_base.modules() if isinstance(m, BasicTransformerBlock)]
    assert len(blocks) == 70 and sum(numel(b) == 34_755_840 for b in blocks) == 60
    assert round(numel(sdxl_base.up_blocks[0]) / 1e6) == 1207
    layers = [layer for unit in fsdp_units(sdxl_base) for layer in block_layers(unit)]
    assert {id(b) for b in blocks} <= {id(m) for m in layers} and len(layers) == 70 + 17
    assert max(numel(m) for m in layers) < 50e6


def test_sdxl_flops_per_image(sdxl_base):
    """Forward+backward at 1024x1024 (128x128 latents, 77 tokens): 20.2 TFLOP, the figure measured
    with FlopCounterMode for the issue; the pooled embedding and time ids are part of the call."""
    flops = training_flops_per_image(sdxl_base, (4, 128, 128), (77, 2048), torch.device("meta"))
    assert abs(flops / 20.2e12 - 1) < 0.005, flops
