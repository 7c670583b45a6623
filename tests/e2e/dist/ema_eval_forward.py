"""Run under torchrun with 1 or 2 ranks (tests/e2e/test_distributed.py does). For FSDP2 and DDP, trains a
tiny UNet a few SGD steps through sd_train's own sharding and EMA, then checks what evaluation
consumes: the forward with the EMA swapped in, against an independent reference, a plain unwrapped
UNet loaded with the gathered EMA weights.

The swapped forward runs right after a `no_grad` raw forward, the situation in which FSDP2 keeps the
root's gathered weights registered. Also checked: the forward after swapping back equals a plain UNet
holding the raw weights (evaluation leaves training alone), and a negative control: writing the EMA
into the shards without releasing the gathered copies gives a different output under FSDP2, so the
comparison can fail. Writes a JSON report to argv[1].rank{R}.json."""

import json
import sys

import torch
from diffusers import UNet2DConditionModel
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor, Shard

from sd_train.config import DistArgs, EMAArgs
from sd_train.parallel.build import shard_unet
from sd_train.parallel.process_group import init_distributed
from sd_train.ema.sharded import ShardedEMA
from sd_train.parallel.fsdp import DTensorLayout
from sd_train.ema.plan import plan_from_config

STEPS, START, DECAY, BATCH = 5, 2, 0.6, 2
CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
)


def inputs(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g), torch.randn(n, 5, 16, generator=g)


def plain_forward(state: dict, x, t, c) -> torch.Tensor:
    ref = UNet2DConditionModel(**CONFIG)
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    ref.eval()
    with torch.no_grad():
        return ref(x, t, encoder_hidden_states=c).sample


def check(strategy: str, info) -> dict:
    torch.manual_seed(0)
    model = shard_unet(UNet2DConditionModel(**CONFIG), DistArgs(strategy=strategy), info)
    module = getattr(model, "module", model)
    ema = ShardedEMA(module, plan_from_config(EMAArgs(decay=DECAY, step_start_ema=START, tolerance=0.9), STEPS), DTensorLayout(module))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for step in range(1, STEPS + 1):
        x, t, c = inputs(step * 10 + info.rank, BATCH)
        model(x, t, encoder_hidden_states=c).sample.square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update(step)
    params = list(getattr(model, "module", model).parameters())
    report = {
        "world_size": info.world_size,
        "sharded_shard0": all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in params),
        "ema_updates": ema.num_updates,
    }
    x, t, c = inputs(999, 3)  # the same eval batch on every rank
    model.eval()
    with torch.no_grad():
        raw_out = model(x, t, encoder_hidden_states=c).sample  # leaves FSDP2's root gathered
        with ema.swapped_in():
            ema_out = model(x, t, encoder_hidden_states=c).sample
        after_out = model(x, t, encoder_hidden_states=c).sample
    gathered_ema = ema.full_tensors()
    raw_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    ref_ema, ref_raw = plain_forward(gathered_ema, x, t, c), plain_forward(raw_state, x, t, c)
    report["ema_forward_equal"] = torch.equal(ema_out, ref_ema)
    report["ema_forward_max_diff"] = (ema_out - ref_ema).abs().max().item()
    report["raw_vs_ema_max_diff"] = (ref_raw - ref_ema).abs().max().item()
    report["raw_forward_equal"] = torch.equal(raw_out, ref_raw)
    report["after_swap_forward_equal"] = torch.equal(after_out, ref_raw)
    # Negative control: the swap without releasing the gathered copies (the old bug).
    with torch.no_grad():
        model(x, t, encoder_hidden_states=c)
        views = ema.layout.views(ema.named_params)
        backup = [v.clone() for v in views]
        for v, s in zip(views, ema.shadow):
            v.copy_(s)
        stale_out = model(x, t, encoder_hidden_states=c).sample
        for v, b in zip(views, backup):
            v.copy_(b)
    ema.layout.release()
    report["unreleased_swap_max_diff"] = (stale_out - ref_ema).abs().max().item()
    model.train()
    return report


info = init_distributed(DistArgs())
report = {strategy: check(strategy, info) for strategy in ("fsdp2", "ddp")}
with open(f"{sys.argv[1]}.rank{info.rank}.json", "w") as f:
    json.dump(report, f)
torch.distributed.destroy_process_group()
