"""Run under torchrun with 4 ranks (tests/e2e/test_distributed.py does): the smallest world where
FSDP2's integer `reshard_after_forward` means something (a group size strictly between 1 and the
shard group). The same tiny UNet and SGD steps through sd_train's own wrapping under five FSDP2
wrappings: the per-block default (`reshard_after_forward` true), false and 2, every resnet and
transformer block as its own unit (`fsdp_units=layers`), and that with explicit prefetch of 1.
Reports the unit counts, the placements, how much of one block's weight a rank holds right after
forward (a quarter, all, a half), and the per-step losses and final weights of each."""

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
    "true": DistArgs(strategy="fsdp2"),
    "false": DistArgs(strategy="fsdp2", reshard_after_forward=False),
    "2": DistArgs(strategy="fsdp2", reshard_after_forward=2),
    "layers": DistArgs(strategy="fsdp2", fsdp_units="layers"),
    "layers_prefetch": DistArgs(strategy="fsdp2", fsdp_units="layers", prefetch=1),
}.items():
    torch.manual_seed(0)
    model = shard_unet(UNet2DConditionModel(**CONFIG), args, info)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    shard0 = all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in model.parameters())
    probe = model.down_blocks[1].resnets[0].conv1  # inside a block unit, not the root
    losses, held_after_forward = [], []
    for step in range(1, 4):
        g = torch.Generator().manual_seed(10 * step + info.rank)
        x, t, c = torch.randn(2, 4, 8, 8, generator=g), torch.randint(0, 1000, (2,), generator=g), torch.randn(2, 5, 16, generator=g)
        loss = model(x, t, encoder_hidden_states=c).sample.square().mean()
        w = probe.weight  # what the block holds between its forward and its backward
        held_after_forward.append((w.to_local() if isinstance(w, DTensor) else w).numel() / w.numel())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    report[name] = {
        "units": sum(isinstance(m, FSDPModule) for m in model.modules()),
        "shard0": shard0,
        "held_after_forward": held_after_forward,
        "losses": losses,
        "weights": torch.cat([p.full_tensor().flatten() for p in model.parameters()]).tolist(),
    }
with open(f"{sys.argv[1]}.rank{info.rank}.json", "w") as f:
    json.dump(report, f)
dist.destroy_process_group()
