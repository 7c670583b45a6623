"""Run under torchrun with 2 ranks (tests/e2e/test_hot_path.py does). The same tiny UNet sharded by
sd_train's FSDP2 wrapping twice: eagerly, and with `perf.compile` (each block compiled before
`fully_shard`, backend aot_eager: the graph capture of inductor without its code generation) and
`perf.channels_last`. Checks world size 2 and Shard(0) DTensor parameters; writes the max forward
and gradient differences and the parameter names' equality as JSON to argv[1] (rank 0)."""

import json
import sys

import torch
from diffusers import UNet2DConditionModel
from torch.distributed.tensor import DTensor, Shard

from sd_train.config import DistArgs, PerfArgs
from sd_train.parallel.build import shard_unet
from sd_train.parallel.process_group import init_distributed

CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)  # fmt: skip

info = init_distributed(DistArgs(backend="gloo"))
assert info.world_size == 2, info.world_size
models = []
for perf in (None, PerfArgs(compile=True, compile_backend="aot_eager", channels_last=True)):
    torch.manual_seed(0)
    models.append(shard_unet(UNet2DConditionModel(**CONFIG), DistArgs(), info, perf))
for model in models:
    assert all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in model.parameters())
g = torch.Generator().manual_seed(100 + info.rank)
x, text, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g), torch.tensor([3, 700])
outs = []
for model in models:
    y = model(x, t, encoder_hidden_states=text).sample
    y.square().mean().backward()
    outs.append((y.detach(), torch.cat([p.grad.full_tensor().flatten() for p in model.parameters()])))
(ye, ge), (yc, gc) = outs
report = {
    "world_size": info.world_size,
    "forward_rel": float((ye - yc).abs().max() / ye.abs().max()),
    "grad_rel": float((ge - gc).abs().max() / ge.abs().max()),
    "names_equal": [n for n, _ in models[0].named_parameters()] == [n for n, _ in models[1].named_parameters()],
    "graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
}
if info.rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(report, f)
