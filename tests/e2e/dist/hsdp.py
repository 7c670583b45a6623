"""Run under torchrun with 2 ranks (tests/e2e/test_distributed.py does). HSDP through sd_train's own
mesh, sharding and EMA: a 2-D mesh of (replicate 2, shard 1), trained a few SGD steps, then:

- every parameter is a DTensor placed (Replicate(), Shard(0)) on the 2-D mesh, whose groups wait
  `dist.timeout_s` like the default group;
- each rank's local EMA equals the other replica's bitwise (no collective keeps them so), with
  Langevin noise added after every step (sd_train.langevin: both replicas draw the same numbers);
- the gathered EMA equals an EMA kept of the gathered parameters, bitwise;
- a DCP checkpoint written under HSDP reloads into FSDP over a 1-D mesh of 2 (resharding), and into
  one process with no process group, with raw weights and EMA equal bitwise;
- on both meshes, sd_train.optim's shard-local clipping and AdamW (fused and foreach) give the
  norms, weights and moments of torch's clip_grad_norm_ and AdamW on the DTensors, bitwise.
Writes a JSON report to argv[1].rank{R}.json; the checkpoint goes to argv[1].ckpt."""

import json
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from diffusers import UNet2DConditionModel
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor, Replicate, Shard

from sd_train.config import DistArgs, EMAArgs
from sd_train.config.launcher import read_launch_env
from sd_train.ema.sharded import ShardedEMA
from sd_train.langevin import ChunkedNoise
from sd_train.parallel.fsdp import DTensorLayout, dtensor_noise_piece
from sd_train.ema.plan import plan_from_config
from sd_train.parallel.build import shard_unet
from sd_train.optim import ShardLocalAdamW, _shard_groups, clip_grad_norm_
from sd_train.parallel.process_group import DistInfo, build_mesh, init_distributed

STEPS, START, DECAY = 6, 3, 0.6
CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
)  # fmt: skip


def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**CONFIG)


def wrapped(args: DistArgs, info: DistInfo):
    mesh_info = DistInfo(info.rank, info.world_size, info.local_rank, info.device,
                         build_mesh(info.device, info.world_size, args, read_launch_env()))  # fmt: skip
    model = shard_unet(unet(), args, mesh_info)
    plan = plan_from_config(EMAArgs(decay=DECAY, step_start_ema=START, tolerance=0.9), STEPS)
    return model, ShardedEMA(model, plan, DTensorLayout(model))


info = init_distributed(DistArgs())
rank, out = info.rank, sys.argv[1]
hsdp = DistArgs(strategy="fsdp2", shard_group_size=1)
model, ema = wrapped(hsdp, info)
params = dict(model.named_parameters())
mesh = next(iter(params.values())).device_mesh
report = {
    "world_size": info.world_size,
    "mesh": dict(zip(mesh.mesh_dim_names, mesh.shape)),
    # What gloo waits for in each dimension's group: dist.timeout_s, not torch's default.
    "group_timeouts_s": [mesh.get_group(d)._get_backend(torch.device("cpu")).options._timeout.total_seconds()
                         for d in mesh.mesh_dim_names],
    "placements_hsdp": all(isinstance(p, DTensor) and p.placements == (Replicate(), Shard(0)) for p in params.values()),
}  # fmt: skip
opt = torch.optim.SGD(model.parameters(), lr=0.2)
noise, pieces = ChunkedNoise(seed=0, chunk=1024), [dtensor_noise_piece(n, p) for n, p in params.items()]
reference = {}
for step in range(1, STEPS + 1):
    g = torch.Generator().manual_seed(100 * step + rank)  # each replica its own data
    x, t, c = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.randint(0, 1000, (2,), generator=g),
        torch.randn(2, 5, 16, generator=g),
    )
    model(x, t, encoder_hidden_states=c).sample.square().mean().backward()
    opt.step()
    opt.zero_grad()
    noise.add_(pieces, step, 0.01)
    ema.update(step)
    full = {n: p.full_tensor().detach().clone() for n, p in params.items()}
    if step == START:
        reference = full
    elif step > START:
        reference = {n: torch.lerp(reference[n], full[n], 1 - DECAY) for n in full}

# The replicas' local EMA shards, compared bitwise across ranks (gathered only for the check).
local = torch.cat([s.flatten() for s in ema.shadow])
both = [torch.empty_like(local) for _ in range(info.world_size)]
dist.all_gather(both, local)
report["ema_equal_across_replicas"] = torch.equal(both[0], both[1])
gathered = ema.full_tensors()
report["ema_equal_gathered_reference"] = all(torch.equal(gathered[n], reference[n]) for n in reference)
raw = {n: p.full_tensor().detach().clone() for n, p in params.items()}

# Save under HSDP, reload into FSDP over a 1-D mesh of 2.
ckpt = f"{out}.ckpt"
dcp.save({"model": get_model_state_dict(model), "ema": ema.tensor_state_dict()}, checkpoint_id=ckpt)
fsdp_model, fsdp_ema = wrapped(DistArgs(strategy="fsdp2", shard_group_size=2), info)
fsdp_params = dict(fsdp_model.named_parameters())
report["placements_fsdp"] = all(p.placements == (Shard(0),) for p in fsdp_params.values())
fsdp_ema.allocate(copy_weights=False)
state = {"model": get_model_state_dict(fsdp_model), "ema": fsdp_ema.tensor_state_dict()}
dcp.load(state, checkpoint_id=ckpt)
set_model_state_dict(fsdp_model, state["model"])
report["fsdp_raw_equal"] = all(torch.equal(p.full_tensor(), raw[n]) for n, p in fsdp_params.items())
fsdp_gathered = fsdp_ema.full_tensors()
report["fsdp_ema_equal"] = all(torch.equal(fsdp_gathered[n], gathered[n]) for n in gathered)

dist.barrier()
if rank == 0:  # one process, no process group: plain tensors from the same files
    plain = {
        "model": {n: torch.empty_like(t) for n, t in raw.items()},
        "ema": {n: torch.empty_like(t) for n, t in gathered.items()},
    }
    dcp.load(plain, checkpoint_id=ckpt, no_dist=True)
    report["one_process_raw_equal"] = all(torch.equal(plain["model"][n], raw[n]) for n in raw)
    report["one_process_ema_equal"] = all(torch.equal(plain["ema"][n], gathered[n]) for n in gathered)
report["raw_vs_ema_differ"] = any(not torch.equal(raw[n], gathered[n]) for n in raw)


def optimizer_run(args: DistArgs, ours: bool, kernel: str) -> tuple[list, dict, dict]:
    """3 clipped AdamW steps: (norms, full weights, full moments), with sd_train's shard-local
    clipping and AdamW or with torch's on the DTensors."""
    model, _ = wrapped(args, info)
    kind = ShardLocalAdamW if ours else torch.optim.AdamW
    opt = kind(model.parameters(), lr=1e-2, weight_decay=0.01, **{kernel: True})
    norms = []
    for step in range(1, 4):
        g = torch.Generator().manual_seed(7 * step + rank)
        x, t, c = (
            torch.randn(2, 4, 8, 8, generator=g),
            torch.randint(0, 1000, (2,), generator=g),
            torch.randn(2, 5, 16, generator=g),
        )
        model(x, t, encoder_hidden_states=c).sample.square().mean().backward()
        if ours:
            assert _shard_groups([p.grad for p in model.parameters()]) is not None, "the local path must apply"
            norms.append(clip_grad_norm_(model.parameters(), 0.05))
        else:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05).full_tensor())
        opt.step()
        opt.zero_grad()
    weights = {n: p.full_tensor() for n, p in model.named_parameters()}
    moments = {
        f"{n}.{k}": opt.state[p][k].full_tensor()
        for n, p in model.named_parameters()
        for k in ("exp_avg", "exp_avg_sq")
    }
    return norms, weights, moments


report["local_optimizer"] = {}
for name, args in (("hsdp", hsdp), ("fsdp", DistArgs(strategy="fsdp2", shard_group_size=2))):
    for kernel in ("fused", "foreach"):
        (na, wa, ma), (nb, wb, mb) = optimizer_run(args, False, kernel), optimizer_run(args, True, kernel)
        report["local_optimizer"][f"{name}_{kernel}"] = {
            "norms_equal": all(torch.equal(a, b) for a, b in zip(na, nb)),
            "clipped": all(float(n) > 0.05 for n in na),
            "weights_equal": all(torch.equal(wa[n], wb[n]) for n in wa),
            "moments_equal": all(torch.equal(ma[n], mb[n]) for n in ma),
        }  # fmt: skip
with open(f"{out}.rank{rank}.json", "w") as f:
    json.dump(report, f)
dist.destroy_process_group()
