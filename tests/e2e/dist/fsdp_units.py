"""Run under torchrun with 2 ranks (tests/e2e/test_distributed.py does). The same tiny UNet and SGD
steps under three FSDP2 wrappings through sd_train's own strategy: the 9-block default, every resnet
and transformer block as its own unit, and that with explicit prefetch of 1. Reports the unit counts,
the placements and the per-step losses and final weights of each, for a bitwise comparison."""

import json
import sys

import torch
import torch.distributed as dist
from diffusers import UNet2DConditionModel
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from sd_train.config import DistArgs
from sd_train.parallel.build import shard_unet
from sd_train.parallel.process_group import init_distributed

CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
)  # fmt: skip

info = init_distributed(DistArgs())
report = {"world_size": info.world_size}
for name, args in {
    "blocks": DistArgs(strategy="fsdp2"),
    "layers": DistArgs(strategy="fsdp2", fsdp_units="layers"),
    "layers_prefetch": DistArgs(strategy="fsdp2", fsdp_units="layers", prefetch=1),
}.items():
    torch.manual_seed(0)
    model = shard_unet(UNet2DConditionModel(**CONFIG), args, info)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(1, 4):
        g = torch.Generator().manual_seed(10 * step + info.rank)
        x, t, c = torch.randn(2, 4, 8, 8, generator=g), torch.randint(0, 1000, (2,), generator=g), torch.randn(2, 5, 16, generator=g)
        loss = model(x, t, encoder_hidden_states=c).sample.square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    report[name] = {
        "units": sum(isinstance(m, FSDPModule) for m in model.modules()),
        "shard0": all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in model.parameters()),
        "losses": losses,
        "weights": torch.cat([p.full_tensor().flatten() for p in model.parameters()]).tolist(),
    }
with open(f"{sys.argv[1]}.rank{info.rank}.json", "w") as f:
    json.dump(report, f)
dist.destroy_process_group()
