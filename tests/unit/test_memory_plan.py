"""The memory plan (sd_train.memory) against what it counts: unit sizes against the wrapped modules,
the model-state items against the bytes of the live objects of a 1-rank run, the fake-tensor step
estimate against FSDPMemTracker on real tensors, the refusal (exit 2, the largest items, the fixes),
`checkpoint.async_save=auto`, the export holding one UNet at a time, and the loader workers' start."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed.checkpoint as dcp
import xxhash
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

import sd_train.export as export
from sd_train import entry
from sd_train.checksums import complete_manifest
from sd_train.config import load_config
from sd_train.data.workers import FORKSERVER_MIN_BYTES, worker_start_method
from sd_train.ema.plan import plan_from_config, posthoc_plan_from_config
from sd_train.ema.posthoc import PowerEMAProfiles
from sd_train.ema.sharded import ShardedEMA
from sd_train.memory.build import memory_plan
from sd_train.memory.plan import GIB
from sd_train.memory.record import StepEstimate, cached_estimate, estimate_key, store_estimate
from sd_train.memory.sizes import read_model_sizes
from sd_train.model.parallelize import block_layers, fsdp_units
from sd_train.optim import build_optimizer
from sd_train.parallel.fsdp import FSDPStrategy
from sd_train.preflight import resolve_fsdp_units, resolve_precision, resolve_strategy
from tests.support.streams import augmented_loader

REPO = Path(__file__).resolve().parents[2]
SHARDS = str(REPO / "tests" / "assets" / "tiny-{000000..000005}.tar")


def tiny_cfg(assets: dict, *overrides: str):
    cfg = load_config(str(REPO / "configs" / "test.yaml"), [*assets["overrides"], *overrides])
    cfg.validate(1)
    return resolve_fsdp_units(resolve_precision(resolve_strategy(cfg, {})), "sd")


def items(plan, column: str) -> dict[str, int]:
    phase = next(p for p in plan.phases if p.column == column)
    return {i.name: i.bytes for i in [*phase.device, *phase.host]}


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SD_TRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_unit_sizes_from_the_file_headers_match_the_wrapped_modules(tiny_assets):
    """The torch-free counts (safetensors headers) against the parameters of the modules
    sd_train.model.parallelize makes FSDP units of, for both unit layouts."""
    unet = UNet2DConditionModel.from_pretrained(tiny_assets["model"], subfolder="unet")
    names = {id(m): n for n, m in unet.named_modules()}
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    total = count(unet)
    want = {names[id(b)]: count(b) for b in fsdp_units(unet)}
    want["root"] = total - sum(want.values())
    sizes = read_model_sizes(str(tiny_assets["model"]), "blocks")
    assert sizes.units == want and sizes.unet_numel == total
    layers = {}
    for block in fsdp_units(unet):
        inner = {names[id(layer)]: count(layer) for layer in block_layers(block)}
        layers |= inner
        layers[names[id(block)]] = count(block) - sum(inner.values())
    layers["root"] = want["root"]
    assert {k: v for k, v in sizes.regroup("layers").units.items() if v} == {k: v for k, v in layers.items() if v}


def test_plan_items_against_the_live_objects_of_a_one_rank_run(tiny_assets, info):
    """Build what a 1-rank run holds (the UNet under FSDP2, fused AdamW after a step, the EMA, two
    post-hoc profiles, the state an async save stages) and compare each with the plan's item."""
    cfg = tiny_cfg(tiny_assets, "ema.posthoc.sigma_rels=[0.05,0.1]", "checkpoint.async_save=true")
    unet = UNet2DConditionModel.from_pretrained(tiny_assets["model"], subfolder="unet")
    strategy = FSDPStrategy(cfg.dist, info, 1.0, fsdp_units, cfg.perf, block_layers)
    strategy.wrap(unet, lambda m: build_optimizer(m, cfg.optim, fused=True))
    x, e = torch.randn(2, 4, 16, 16), torch.randn(2, 77, unet.config.cross_attention_dim)
    strategy.model(x, torch.tensor([1, 2]), encoder_hidden_states=e).sample.square().mean().backward()
    strategy.optimizer.step()
    layout = strategy.ema_layout()
    ema = ShardedEMA(strategy.module, plan_from_config(cfg.ema, cfg.max_steps), layout)
    ema.allocate(copy_weights=True)
    posthoc = PowerEMAProfiles(strategy.module, posthoc_plan_from_config(cfg.ema, cfg.max_steps), layout)
    posthoc.allocate(copy_weights=True)

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    params = nbytes(layout.views(ema.named_params))
    grads = nbytes(p.grad._local_tensor for p in strategy.module.parameters())
    moments = nbytes(v for s in strategy.optimizer.state.values() for k, v in s.items() if k != "step")
    staged = strategy._tensor_state({"ema": ema, "posthoc": posthoc})  # what dcp.async_save copies
    staged_bytes = nbytes(t._local_tensor if hasattr(t, "_local_tensor") else t for t in _tensors(staged))
    steps = nbytes(s["step"] for s in strategy.optimizer.state.values())

    plan = memory_plan(cfg, 1, None, estimate=None)
    ev, window, step = items(plan, "eval"), items(plan, "step+EMA"), items(plan, "step")
    assert ev["sharded params"] == params and step["gradients"] == grads and ev["optimizer state"] == moments
    assert window["EMA"] == ema.local_bytes() and window["post-hoc profiles"] == posthoc.local_bytes()
    assert plan.staging <= staged_bytes <= plan.staging + steps  # Adam's step counters: 4 bytes each
    assert sum(window.values()) - sum(step.values()) == ema.local_bytes() + posthoc.local_bytes()
    # Evaluation holds no gradients (freed after the step) and no copy of the weights: the EMA swap
    # trades values with the pieces, and trading back restores both bitwise.
    assert "gradients" not in ev and "EMA swap copy" not in ev
    pieces = layout.forward_views(ema.named_params)
    raw, shadow = [t.clone() for t in pieces], [t.clone() for t in ema.shadow]
    gc.collect()
    before = live_tensor_bytes()
    with ema.swapped_in():
        gc.collect()
        assert live_tensor_bytes() - before <= max(t.nbytes for t in pieces)
        assert all(torch.equal(t, s) for t, s in zip(pieces, shadow))
    assert all(torch.equal(t, r) for t, r in zip(pieces, raw))
    assert all(torch.equal(t, s) for t, s in zip(ema.shadow, shadow))
    load = items(plan, "load")
    assert load["whole UNet"] == 4 * sum(p.numel() for p in unet.parameters())


def _tensors(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, torch.Tensor):
        yield tree


def test_fake_tensor_estimate_matches_the_tracker_on_real_tensors(tiny_assets, info, cache):
    """The cached estimate (a child process: fake tensors, a fake process group) against
    FSDPMemTracker run here on real tensors over the same 1-rank step."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    cfg = tiny_cfg(tiny_assets, "micro_batch_size=4", "global_batch_size=4")
    path = cache.parent / "config.yaml"
    from sd_train.config import dump_config

    dump_config(cfg, path)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [
        sys.executable,
        "-m",
        "sd_train.memory.estimate",
        "--config",
        str(path),
        "--world-size",
        "1",
        "--shard-size",
        "1",
    ]
    subprocess.run(cmd, check=True, env=env, cwd=REPO, capture_output=True)
    est = cached_estimate(estimate_key(cfg, 1, 1))
    assert (
        est is not None
        and est.runtime_rss > 100 * 2**20
        and est.worker_server_anon > 50 * 2**20
        and 0 < est.worker_uss < est.worker_server_anon
    )

    unet = UNet2DConditionModel.from_pretrained(tiny_assets["model"], subfolder="unet")
    strategy = FSDPStrategy(cfg.dist, info, 1.0, fsdp_units, cfg.perf, block_layers)
    strategy.wrap(unet, lambda m: build_optimizer(m, cfg.optim, fused=True))
    model, opt = strategy.model, strategy.optimizer
    x, e = torch.randn(4, 4, 16, 16), torch.randn(4, 77, unet.config.cross_attention_dim)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    tracker = FSDPMemTracker(model, opt)
    tracker.track_inputs((x, e))
    with tracker:
        opt.zero_grad(set_to_none=True)
        t = torch.randint(0, 1000, (4,))
        (model(x, t, encoder_hidden_states=e).sample.float() - x).square().mean().backward()
        opt.step()
    real = {
        str(getattr(k, "value", k)): v for k, v in tracker.get_tracker_snapshot("peak")[torch.device("cpu")].items()
    }
    for cat in ("Sharded Param", "OptState", "Unsharded Param"):
        assert est.step[cat] == real[cat], cat
    assert abs(est.step["Total"] - real["Total"]) <= 0.1 * real["Total"], (est.step, real)


def synthetic_estimate(cfg, activations: int) -> StepEstimate:
    """A cached record for `cfg` whose step holds `activations` bytes of activations at the peak."""
    sizes = read_model_sizes(cfg.model.pretrained_path)
    states = 4 * sizes.unet_numel * 3
    step = {"Sharded Param": 4 * sizes.unet_numel, "OptState": 8 * sizes.unet_numel, "Activation": activations}
    step["Total"] = states + activations
    return StepEstimate(
        estimate_key(cfg, 1, 1), step, runtime_rss=300 * 2**20, worker_server_anon=150 * 2**20, worker_uss=50 * 2**20
    )


def test_a_config_that_cannot_fit_is_refused_with_its_largest_items_and_fixes(tiny_assets, cache, capsys):
    args = ["--config", str(REPO / "configs" / "test.yaml"), *tiny_assets["overrides"], "dist.memory_check=cached"]
    cfg = tiny_cfg(tiny_assets, "dist.memory_check=cached")
    store_estimate(synthetic_estimate(cfg, activations=3 * GIB))  # micro-batch 4: 0.75 GiB a sample
    assert entry.main([*args, "dist.memory_budget_gb=2"]) == 2
    err = capsys.readouterr().err
    assert "memory plan: the per-rank peak" in err and "exceeds dist.memory_budget_gb=2" in err
    assert "Largest items (training step" in err and "activations 3.00 GiB" in err and "runtime" in err
    assert "Fixes that fit: micro_batch_size=2 (gradient accumulation x2; peak 1.90 GiB" in err
    assert "Also worth estimating: model.gradient_checkpointing=true (not sized" in err
    assert entry.main([*args, "--plan", "dist.memory_budget_gb=4"]) == 0  # 3 GiB of activations fit in 4


def test_the_lower_bound_refuses_without_an_estimate(tiny_assets, cache, capsys):
    args = ["--config", str(REPO / "configs" / "test.yaml"), *tiny_assets["overrides"], "dist.memory_check=cached"]
    assert entry.main([*args, "--plan", "dist.memory_budget_gb=0.005"]) == 2
    err = capsys.readouterr().err
    assert "optimizer state" in err and "(lower bound: the step was not estimated)" in err
    assert entry.main([*args, "--plan", "dist.memory_budget_gb=1"]) == 0
    assert "memory verdict: fits" in capsys.readouterr().out
    # Without the export and the evaluation (their phases absent) the plan is made all the same.
    assert entry.main([*args, "--plan", "export_at_end=false", "eval.every_steps=0"]) == 0
    out = capsys.readouterr().out
    assert "memory verdict: fits" in out and "export" not in out.split("Memory plan")[1].splitlines()[1]


def test_async_save_auto_is_decided_by_the_host(tiny_assets):
    cfg = tiny_cfg(tiny_assets, "checkpoint.async_save=auto")
    est = synthetic_estimate(cfg, activations=10 * 2**20)
    roomy = memory_plan(cfg, 1, None, host_memory=8 * GIB, estimate=est)
    assert roomy.async_save and roomy.staging > 0 and "async-save staging" in items(roomy, "step")
    needed = roomy.node_host_peak()
    tight = memory_plan(cfg, 1, None, host_memory=needed - roomy.staging // 2, estimate=est)
    assert not tight.async_save and tight.staging == 0 and not tight.overages()
    assert any("synchronous saves" in n for n in tight.notes)
    explicit = memory_plan(dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, async_save=True)),
                           1, None, host_memory=needed - roomy.staging // 2, estimate=est)  # fmt: skip
    assert explicit.overages() and any(f.startswith("checkpoint.async_save=false") for f in explicit.fixes())


def live_tensor_bytes() -> int:
    seen, total = set(), 0
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu":
            try:
                storage = obj.untyped_storage()
                ptr = storage.data_ptr()
            except RuntimeError:  # a fake or freed storage left by an earlier test: holds nothing
                continue
            if ptr not in seen:
                seen.add(ptr)
                total += storage.nbytes()
    return total


def test_export_holds_one_unet_at_a_time_and_writes_the_checkpoint(tiny_assets, tmp_path, monkeypatch):
    """A checkpoint with a raw UNet and an EMA: the export writes both, equal to the checkpoint, and
    when each is written no more than one UNet's bytes are held (a writer that counts live tensors)."""
    model = str(tiny_assets["model"])
    raw = UNet2DConditionModel.from_pretrained(model, subfolder="unet").state_dict()
    ema = {n: t + 1.0 for n, t in raw.items()}
    folder = tmp_path / "step_00000004"
    dcp.save({"model": raw, "ema": ema}, checkpoint_id=str(folder), no_dist=True)
    state = {"step": 4, "world_size": 1, "ema": {"open": True}, "config": {"model": {"pretrained_path": model}}}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    complete_manifest(folder, 0)  # as every checkpoint has: the export checks it before reading
    unet_bytes = sum(t.numel() * t.element_size() for t in raw.values())

    held, real = [], export.save_pipeline

    def counting(model_path, unet_state, *args):
        gc.collect()
        held.append(live_tensor_bytes() - baseline)
        return real(model_path, unet_state, *args)

    monkeypatch.setattr(export, "save_pipeline", counting)
    gc.collect()
    baseline = live_tensor_bytes()
    written = export.export_checkpoint(folder, model, tmp_path / "export", "epsilon")
    assert [p.name for p in written] == ["raw", "ema"] and len(held) == 2
    assert all(unet_bytes <= h < 1.5 * unet_bytes for h in held), (held, unet_bytes)
    for kind, want in (("raw", raw), ("ema", ema)):
        got = load_file(tmp_path / "export" / kind / "unet" / "diffusion_pytorch_model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), kind


def worker_rss_of(loader) -> int:
    it = iter(loader)
    try:
        next(it)
        kids = psutil.Process().children(recursive=True)
        return max(k.memory_info().rss for k in kids)
    finally:
        it.close()


def test_forkserver_workers_do_not_hold_the_ranks_memory():
    """A rank holding 384 MiB when its loader starts: a forked worker maps all of it, a worker from
    the forkserver holds only its own runtime."""
    ballast = torch.ones(384 * 2**20 // 4)  # written, so resident
    loader = augmented_loader(SHARDS, rank=0, world=1, workers=1, seed=0, batch=2, shuffle=0, max_epochs=None)
    forked = worker_rss_of(loader)
    loader.worker_start = "forkserver"
    served = worker_rss_of(loader)
    assert forked > ballast.nbytes > served + 128 * 2**20, (forked, served)
    assert worker_start_method("auto", FORKSERVER_MIN_BYTES) == "forkserver"
    assert worker_start_method("auto", FORKSERVER_MIN_BYTES - 1) == "fork"
    assert worker_start_method("fork", 10 * FORKSERVER_MIN_BYTES) == "fork"


def test_checksums_of_a_save_do_not_raise_the_ranks_peak(tmp_path):
    """Hashing a rank's checkpoint file (as every save and load does) holds one buffer, not the file:
    through mmap the file's pages counted in the rank's resident set, 1.6 GiB above the plan per
    SD2 rank. Measured in a fresh process's peak RSS, hashing 256 MiB from the page cache."""
    big = tmp_path / "__0_0.distcp"
    big.write_bytes(os.urandom(256 * 2**20))
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak (this test's 256 MiB of bytes).
    code = (
        "import re, sys; from sd_train.checksums import digest; "
        "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) * 1024; "
        "before = hwm(); got = digest(sys.argv[1]); print(hwm() - before, got)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(big)], capture_output=True, text=True, check=True).stdout
    grown, got = out.split()
    assert int(grown) < 32 * 2**20, f"hashing 256 MiB raised the peak RSS by {int(grown) / 2**20:.0f} MiB"
    assert got == xxhash.xxh3_64(big.read_bytes()).hexdigest()


def test_forkserver_workers_end_with_a_killed_rank(tmp_path):
    """A rank killed with SIGKILL: its forkserver and workers end too (their parent is the server,
    so without the rank watch they ran on)."""
    script = tmp_path / "rank.py"
    script.write_text(
        "import sys, time, psutil\n"
        f"sys.path[:0] = [{str(REPO)!r}]\n"
        "from tests.support.streams import augmented_loader\n"
        "if __name__ == '__main__':\n"
        f"    loader = augmented_loader({SHARDS!r}, rank=0, world=1, workers=2, seed=0, batch=2, shuffle=0,\n"
        "                              max_epochs=None)\n"
        "    loader.worker_start = 'forkserver'\n"
        "    it = iter(loader)\n"
        "    next(it)\n"
        "    print(' '.join(str(p.pid) for p in psutil.Process().children(recursive=True)), flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) >= 3  # the server and the two workers (and multiprocessing's resource tracker)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        assert time.monotonic() < deadline, [p for p in pids if psutil.pid_exists(p)]
        time.sleep(0.2)


def test_ranks_agree_on_async_saves_when_their_plans_differ(tiny_assets, monkeypatch):
    """`checkpoint.async_save=auto` is decided by each rank's plan before the process group exists;
    a rank that planned without its node's estimate may decide otherwise, and the async saver's
    group is created collectively: one rank's synchronous choice makes every rank's synchronous.
    The collective is the trainer's MAX all-reduce, here stood in for by a 2-rank answer."""
    from types import SimpleNamespace

    import sd_train.trainer as trainer_module

    cfg = tiny_cfg(tiny_assets, "checkpoint.async_save=true")
    votes = []

    def other_rank_chose(sync: float):
        def all_reduce_max(values, device):  # noqa: ARG001
            votes.append(values[0])
            return [max(values[0], sync)]

        return all_reduce_max

    two_ranks = SimpleNamespace(info=SimpleNamespace(world_size=2, device=torch.device("cpu")))
    agree = trainer_module.Trainer._agreed_async_save
    monkeypatch.setattr(trainer_module, "all_reduce_max", other_rank_chose(1.0))
    assert agree(two_ranks, cfg).checkpoint.async_save is False and votes == [0.0]
    monkeypatch.setattr(trainer_module, "all_reduce_max", other_rank_chose(0.0))
    assert agree(two_ranks, cfg).checkpoint.async_save is True
    sync_cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, async_save=False))
    assert agree(two_ranks, sync_cfg).checkpoint.async_save is False and votes[-1] == 1.0


def test_the_staging_copy_trains_beside_the_steps_only_after_an_earlier_save(tiny_assets):
    """DCP's stager allocates the copy at the first async save: a run that saves before its last
    step trains beside it from then on; a run whose only save is the last step holds it in that
    save alone, with the gradients freed (the SD2-shaped 1-rank bench run: 7.67 GiB measured)."""
    est = synthetic_estimate(tiny_cfg(tiny_assets), activations=10 * 2**20)
    early = memory_plan(tiny_cfg(tiny_assets, "checkpoint.async_save=true"), 1, None, estimate=est)
    assert "async-save staging" in items(early, "step") and "save" not in [p.column for p in early.phases]
    last = memory_plan(tiny_cfg(tiny_assets, "checkpoint.async_save=true", "checkpoint.every_steps=12"), 1, None,
                       estimate=est)  # fmt: skip
    save, step = items(last, "save"), items(last, "step")
    assert "async-save staging" not in step and save["async-save staging"] == early.staging
    assert "gradients" not in save and save["sharded params"] == step["sharded params"]
    assert sum(step.values()) == sum(items(early, "step").values()) - early.staging
    assert last.host_peak()[0] < early.host_peak()[0]


def test_the_step_is_estimated_at_the_largest_bucket(tiny_assets):
    """Activations grow with the pixels: a listed bucket larger than resolution² is what the step
    estimate runs at (and keys it apart); the generated set never exceeds the square."""
    from sd_train.memory.record import step_shape

    square = tiny_cfg(tiny_assets)
    r = square.data.resolution
    assert step_shape(square) == (r, r) and "bucket" not in estimate_key(square, 1, 1)
    generated = tiny_cfg(tiny_assets, "data.buckets=generated")
    assert step_shape(generated) == (r, r) and estimate_key(generated, 1, 1) == estimate_key(square, 1, 1)
    listed = tiny_cfg(tiny_assets, f"data.buckets=[[{r},{r}],[{r},{2 * r}]]")
    assert step_shape(listed) == (r, 2 * r) and estimate_key(listed, 1, 1)["bucket"] == [r, 2 * r]
