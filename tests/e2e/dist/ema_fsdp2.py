"""Run under torchrun with 2 ranks (tests/e2e/test_distributed.py does). Trains a tiny diffusers UNet
with FSDP2 + SGD through sd_train's own sharding and EMA code, and checks on every rank:

- world size 2, every parameter a DTensor sharded Shard(0), one of them with an uneven first dim;
- before the window no EMA tensor exists (0 bytes);
- each rank holds only its shard's EMA bytes (the ranks' bytes add up to one full copy);
- the gathered sharded EMA equals, bitwise, an EMA kept of the gathered parameters;
- it also matches an unsharded single-process run of the same global batches (SGD: tight atol);
- EMA swap-in puts the EMA into the model and swap-out restores the weights bitwise;
- Langevin noise (sd_train.langevin) after every step, sharded pieces keyed by their global offset
  (`dtensor_noise_piece`, as FSDPStrategy.noise_pieces), the reference's by the whole tensors: the
  weights still match the single-process run to SGD's reduction-order tolerance, though each step's
  noise (std 0.01) is 1000x that; each rank draws only its shards' chunks (counted by torch's
  dispatcher, as tests/support/random_count.py does in one process; this script runs outside the
  tests package), with chunks of 1024 elements so that shard edges cut chunks.
Writes a JSON report to argv[1]."""

import copy
import json
import sys

import torch
import torch.distributed as dist
from diffusers import UNet2DConditionModel
from torch.distributed.tensor import DTensor, Shard

from sd_train.config import DistArgs, EMAArgs
from sd_train.parallel.build import shard_unet
from sd_train.parallel.process_group import init_distributed
from sd_train.ema.sharded import ShardedEMA
from sd_train.parallel.fsdp import DTensorLayout
from sd_train.ema.plan import plan_from_config
from sd_train.langevin import ChunkedNoise, NoisePiece
from sd_train.parallel.fsdp import dtensor_noise_piece
from torch.utils._python_dispatch import TorchDispatchMode

STEPS, START, DECAY, BATCH = 8, 5, 0.7, 4
LR, DIFFUSION, CHUNK = 0.05, 1e-3, 1024
NOISE_STD = (2 * DIFFUSION * LR) ** 0.5  # 0.01 per element per step



class NormalCount(TorchDispatchMode):
    """Elements written by `normal_` inside the block, whoever calls it."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.startswith("normal"):
            self.elements += out.numel()
        return out


torch.manual_seed(0)
# out_channels=3 makes conv_out's weight [3, ...]: dim 0 does not divide by 2, so FSDP2 pads it.
unet = UNet2DConditionModel(
    sample_size=8, in_channels=4, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
)
reference = copy.deepcopy(unet)  # the unsharded single-process run

info = init_distributed(DistArgs())
rank, world = info.rank, info.world_size
model = shard_unet(unet, DistArgs(), info)
params = dict(model.named_parameters())
plan = plan_from_config(EMAArgs(decay=DECAY, step_start_ema=START, tolerance=0.5), STEPS)
ema = ShardedEMA(model, plan, DTensorLayout(model))
opt = torch.optim.SGD(model.parameters(), lr=LR)
ref_opt = torch.optim.SGD(reference.parameters(), lr=LR)
noise, ref_noise = ChunkedNoise(seed=0, chunk=CHUNK), ChunkedNoise(seed=0, chunk=CHUNK)
pieces = [dtensor_noise_piece(n, p) for n, p in model.named_parameters()]
ref_pieces = [NoisePiece(n, p.numel(), 0, p.detach()) for n, p in reference.named_parameters()]
drawn = []
report = {"world_size": world, "rank": rank}
report["all_dtensor_shard0"] = all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in params.values())
report["uneven_params"] = [n for n, p in params.items() if p.shape[0] % world]
gathered_ema = None
ref_ema = None


def batch(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(world * BATCH, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (world * BATCH,), generator=g)
    c = torch.randn(world * BATCH, 5, 16, generator=g)
    y = torch.randn(world * BATCH, 3, 8, 8, generator=g)
    return x, t, c, y


bytes_before = []
for step in range(1, STEPS + 1):
    x, t, c, y = batch(step)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    loss = torch.nn.functional.mse_loss(model(x[mine], t[mine], encoder_hidden_states=c[mine]).sample, y[mine])
    loss.backward()
    opt.step()
    opt.zero_grad()
    with NormalCount() as count:
        noise.add_(pieces, step, NOISE_STD)
    drawn.append(count.elements)
    ref_loss = torch.nn.functional.mse_loss(reference(x, t, encoder_hidden_states=c).sample, y)
    ref_loss.backward()
    ref_opt.step()
    ref_opt.zero_grad()
    ref_noise.add_(ref_pieces, step, NOISE_STD)
    ema.update(step)
    if step < START:
        bytes_before.append(ema.local_bytes())
        assert ema.shadow is None
    # Reference EMA of the gathered params, updated exactly like the shards (fp32 lerp).
    full = {n: p.full_tensor().detach().clone() for n, p in params.items()}
    ref_full = {n: p.detach().clone() for n, p in reference.named_parameters()}
    if step == START:
        gathered_ema, ref_ema = full, ref_full
    elif step > START:
        for n in full:
            gathered_ema[n].lerp_(full[n], 1 - DECAY)
            ref_ema[n].lerp_(ref_full[n], 1 - DECAY)

report["ema_bytes_before_window"] = sum(bytes_before)
report["ema_local_bytes"] = ema.local_bytes()
report["full_bytes"] = sum(p.numel() * 4 for p in params.values())
sharded_full = ema.full_tensors()
report["ema_equal_gathered"] = all(torch.equal(sharded_full[n], gathered_ema[n]) for n in sharded_full)
report["ema_max_diff_vs_single_process"] = max((sharded_full[n] - ref_ema[n]).abs().max().item() for n in sharded_full)
report["ema_updates"] = ema.num_updates
ref_params = dict(reference.named_parameters())
report["params_max_diff_vs_single_process"] = max(
    (p.full_tensor() - ref_params[n]).abs().max().item() for n, p in params.items()
)
report["noise_std"] = NOISE_STD
report["noise_drawn_per_step"] = sorted(set(drawn))
report["local_numel"] = sum(p.to_local().numel() for p in params.values())
# Swap: EMA in, then the raw weights back, bitwise.
# The swap trades values with the shadow (no second copy of the weights while the EMA is in), so
# compare with copies of both taken before it, and check that both come back.
raw = {n: p.to_local().clone() for n, p in params.items()}
shadow = [s.clone() for s in ema.shadow]
with ema.swapped_in():
    report["swap_in_is_ema"] = all(torch.equal(params[n].to_local(), s) for (n, _), s in zip(ema.named_params, shadow))
report["swap_out_restores"] = all(torch.equal(params[n].to_local(), raw[n]) for n in raw) and all(
    torch.equal(a, b) for a, b in zip(ema.shadow, shadow)
)
bytes_all = [None] * world
dist.all_gather_object(bytes_all, report["ema_local_bytes"])
report["ema_bytes_all_ranks"] = bytes_all
with open(f"{sys.argv[1]}.rank{rank}.json", "w") as f:
    json.dump(report, f)
dist.destroy_process_group()
