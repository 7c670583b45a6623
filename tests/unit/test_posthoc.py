"""Post-hoc EMA in one process: the math against EDM2's published numbers and an independent
recurrence, and the sharded profiles (a 1-rank gloo group, FSDP2 on a small module) against the
closed form of the weights they must hold, their snapshots, the reconstruction and a checkpoint
round trip (torch.equal where the claim is exactness)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.distributed.tensor import DTensor, Shard

from sd_train.checkpoint import Checkpointer
from sd_train.config import CheckpointArgs, DistArgs, EMAArgs, PosthocArgs, TrainConfig
from sd_train.ema.plan import plan_from_config, posthoc_plan_from_config
from sd_train.ema.posthoc import PowerEMAProfiles, load_snapshot_profile, read_snapshot_meta
from sd_train.ema.posthoc_math import (
    classic_weights,
    gamma_to_sigma_rel,
    power_beta,
    power_weights,
    sigma_rel_to_gamma,
    solve,
)
from sd_train.ema.sharded import ShardedEMA
from sd_train.parallel.deepspeed import DeepSpeedStrategy, offline_shadow
from sd_train.parallel.fsdp import FSDPStrategy
from sd_train.paths import snapshot_steps
from sd_train.tools.posthoc import MAX_FIT_ERROR, find_snapshots, plan_targets, reconstruct

SIGMAS, START, EVERY, STEPS, DECAY = [0.05, 0.1], 2, 2, 8, 0.6


def test_gamma_matches_edm2_pairs_and_round_trips():
    # EDM2 (Karras et al. 2024) tracks sigma_rel 0.05 and 0.10, i.e. gamma 16.97 and 6.94.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for s in (0.01, 0.03, 0.05, 0.1, 0.15, 0.2, 0.28):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-12)
    with pytest.raises(ValueError):
        sigma_rel_to_gamma(0.3)


def test_closed_form_equals_the_beta_recurrence():
    rng = np.random.default_rng(0)
    for gamma in (0.0, 6.94, 16.97):
        w = rng.standard_normal(31)
        e = w[0]
        for t in range(2, w.size + 1):  # t counted from the start, t = 1 was the copy
            b = power_beta(gamma, t)
            e = b * e + (1 - b) * w[t - 1]
        c = power_weights(gamma, w.size - 1)
        assert c.sum() == pytest.approx(1.0, abs=1e-14)
        assert c @ w == pytest.approx(e, abs=1e-12)
    d, e = 0.9, w[0]
    for k in range(1, w.size):
        e = d * e + (1 - d) * w[k]
    assert classic_weights(d, w.size - 1) @ w == pytest.approx(e, abs=1e-12)


def test_solve_reproduces_a_profile_from_itself_and_flags_what_snapshots_cannot_express():
    gammas = [sigma_rel_to_gamma(s) for s in SIGMAS]
    basis = [(n, g) for n in range(0, 41, 8) for g in gammas]
    fit = solve(basis, power_weights(gammas[1], 40))
    expected = np.zeros(len(basis))
    expected[-1] = 1.0
    assert fit.fit_error < 1e-12 and np.abs(fit.coefficients - expected).max() < 1e-9
    # Two snapshots at the very end cannot express a short classic EMA: the fit error says so.
    assert solve([(40, g) for g in gammas], classic_weights(0.5, 40)).fit_error > MAX_FIT_ERROR


class Run:
    def __init__(self, info, out):
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
        self.strategy = FSDPStrategy(DistArgs(strategy="fsdp2"), info, 0.0, lambda m: [m[0]])
        self.strategy.wrap(module, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
        args = EMAArgs(decay=DECAY, step_start_ema=START, tolerance=0.9, posthoc=PosthocArgs(SIGMAS, EVERY))
        self.ema = ShardedEMA(self.strategy.module, plan_from_config(args, STEPS), self.strategy.ema_layout())
        plan = posthoc_plan_from_config(args, STEPS)
        self.profiles = PowerEMAProfiles(self.strategy.module, plan, self.strategy.ema_layout())
        self.out = out
        self.ckpt = Checkpointer(
            CheckpointArgs(every_steps=STEPS, keep_last_k=0),
            str(out),
            0,
            1,
            STEPS,
            self.strategy,
            {"ema": self.ema, "posthoc": self.profiles},
            {},
            {},
            config={},
        )

    def step(self, step: int) -> None:
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        self.strategy.model(x).square().mean().backward()
        self.strategy.step()
        self.strategy.optimizer.zero_grad()
        self.ema.update(step)
        self.profiles.update(step)
        self.profiles.maybe_snapshot(self.out / "posthoc", step, 0)
        self.ckpt.save(step)

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: p.full_tensor().clone() for n, p in self.strategy.module.named_parameters()}

    def profile(self, i: int) -> dict[str, torch.Tensor]:
        layout = self.profiles.layout
        return {n: layout.full(p, s).clone() for (n, p), s in zip(self.profiles.named_params, self.profiles.shadows[i])}


def test_sharded_profiles_track_snapshot_reconstruct_and_resume(info, tmp_path):
    run = Run(info, tmp_path)
    assert all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in run.strategy.module.parameters())
    history = []
    for step in range(1, STEPS + 1):
        run.step(step)
        if step < START:
            assert not run.profiles.is_open and run.profiles.local_bytes() == 0, "nothing before the start"
            continue
        history.append(run.weights())
        n = step - START
        for i, s in enumerate(SIGMAS):
            c = power_weights(sigma_rel_to_gamma(s), n)
            for name, got in run.profile(i).items():
                want = sum(float(ck) * h[name].double() for ck, h in zip(c, history))
                torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    assert snapshot_steps(tmp_path / "posthoc") == [2, 4, 6, 8]
    # The last snapshot (fp32) read in one process with no process group is the live profile, bitwise.
    for i in range(len(SIGMAS)):
        snap = load_snapshot_profile(tmp_path / "posthoc" / "step_00000008", i)
        assert all(torch.equal(snap[n], t) for n, t in run.profile(i).items())
    # Reconstruction: a tracked profile comes back (coefficients one-hot up to rounding); the plain
    # EMA's classic decay, started at the same step, comes back from 4 x 2 snapshot profiles.
    snaps = find_snapshots(tmp_path)
    targets = plan_targets(snaps, [0.1], [DECAY], max_fit_error=0.05)
    assert all(t.refused is None and t.fit.fit_error < 1e-9 for t in targets)
    states = reconstruct(snaps, targets)
    ema = run.ema.full_tensors()
    for name, t in run.profile(1).items():
        assert (states["sigma_rel_0.1"][name] - t).abs().max() < 1e-6
        assert (states["decay_0.6"][name] - ema[name]).abs().max() < 1e-5
    # A checkpoint restores the profiles bitwise.
    saved = [run.profile(i) for i in range(len(SIGMAS))]
    fresh = Run(info, tmp_path)
    assert fresh.ckpt.load().step == STEPS
    for i in range(len(SIGMAS)):
        assert all(torch.equal(fresh.profile(i)[n], t) for n, t in saved[i].items())


class _Engine:
    """Stands in for the DeepSpeed engine: its own zero/ files are DeepSpeed's business (and
    tests/e2e/test_deepspeed.py runs the real one); this checks the shadows' files."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def save_checkpoint(self, *args, **kwargs) -> None:
        pass

    def load_checkpoint(self, folder, **kwargs):
        return folder, None


def _deepspeed_like(stage: int, info):
    """A module whose parameters look as DeepSpeed leaves them at world 1 (ZeRO-3: `ds_tensor` is
    the flat partition, the parameter itself empty), and the strategy's EMA layout for it."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    if stage == 3:
        for p in module.parameters():
            p.ds_tensor, p.ds_shape, p.ds_numel = p.detach().flatten().clone(), p.shape, p.numel()
    cfg = TrainConfig()
    cfg.dist.strategy, cfg.dist.zero_stage = "deepspeed", stage
    strategy = DeepSpeedStrategy(cfg, info, accum=1)
    strategy.engine = _Engine(module)
    return module, strategy


@pytest.mark.parametrize("stage", [3, 2])
def test_deepspeed_profiles_round_trip_a_checkpoint_and_a_snapshot(info, tmp_path, stage):
    """Under ZeRO-3 (per partition) and ZeRO-2 (replicated) the live profiles go into the
    checkpoint as `posthoc_rank_R.pt` and come back bitwise; a snapshot reads back in one process
    as full tensors of the parameters' shapes."""
    module, strategy = _deepspeed_like(stage, info)
    args = EMAArgs(decay=DECAY, step_start_ema=START, tolerance=0.9, posthoc=PosthocArgs(SIGMAS, EVERY))
    plan = posthoc_plan_from_config(args, STEPS)
    layout = strategy.ema_layout()
    profiles = PowerEMAProfiles(module, plan, layout)
    ema = ShardedEMA(module, plan_from_config(args, STEPS), layout)
    for step in range(1, 6):
        with torch.no_grad():
            for v in layout.views(profiles.named_params):
                v.add_(torch.randn_like(v))
        ema.update(step)
        profiles.update(step)
    assert profiles.is_open and not torch.equal(profiles.shadows[0][0], profiles.shadows[1][0])
    strategy.save(tmp_path, {"ema": ema, "posthoc": profiles})
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"DeepSpeed's")
    assert strategy.missing_files(tmp_path) is None
    fresh = PowerEMAProfiles(module, plan, layout)
    fresh.load_meta_state_dict(profiles.meta_state_dict())
    fresh_ema = ShardedEMA(module, plan_from_config(args, STEPS), layout)
    fresh_ema.load_meta_state_dict(ema.meta_state_dict())
    strategy.load(tmp_path, {"ema": fresh_ema, "posthoc": fresh})
    for a, b in zip(profiles.shadows, fresh.shadows):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(ema.shadow, fresh_ema.shadow))
    # Offline (no strategy), each profile reassembles to full tensors of the parameters' shapes.
    shapes = {n: p.shape for n, p in module.named_parameters()}
    for i in range(len(SIGMAS)):
        full = offline_shadow(tmp_path, "posthoc", f"p{i}.")
        assert {n: t.shape for n, t in full.items()} == shapes
        assert all(
            torch.equal(full[n].flatten(), s.flatten()) for (n, _), s in zip(profiles.named_params, fresh.shadows[i])
        )
    # The snapshot: a ZeRO-3 partition is stored as part of the flattened parameter, and read back
    # with the parameter's shape.
    folder = profiles.write_snapshot(tmp_path / "posthoc", 5, 0)
    meta = read_snapshot_meta(folder)
    assert ("shapes" in meta) == (stage == 3) and meta["layout"] == layout.name
    for i in range(len(SIGMAS)):
        snap = load_snapshot_profile(folder, i)
        assert {n: t.shape for n, t in snap.items()} == shapes
        assert all(torch.equal(snap[n], offline_shadow(tmp_path, "posthoc", f"p{i}.")[n]) for n in snap)


def test_deepspeed_checkpoint_with_an_empty_profile_file_is_reported_before_loading(info, tmp_path):
    _, strategy = _deepspeed_like(3, info)
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"DeepSpeed's")
    torch.save({}, tmp_path / "ema_rank_0.pt")
    (tmp_path / "posthoc_rank_0.pt").write_bytes(b"")  # truncated by a crash
    assert "posthoc_rank_0.pt" in strategy.missing_files(tmp_path)


def test_zero3_layout_refuses_a_partitioning_it_does_not_describe(info):
    module, strategy = _deepspeed_like(3, info)
    p = next(module.parameters())
    with pytest.raises(RuntimeError, match="a DeepSpeed partitioning sd-train does not describe"):
        strategy.ema_layout().global_tensor(p, torch.zeros(p.ds_numel + 1))


def test_eval_refuses_pipes_from_a_runs_config_unless_allowed(tmp_path):
    """`sd-train posthoc --eval` rebuilds the validator from the run's config.yaml, which may come
    from elsewhere: a `pipe:` URL there (here in a list file it names) is refused, whatever the
    run's own data.allow_pipe says, until --allow-pipe is given; the command never runs."""
    from sd_train.config import dump_config
    from sd_train.tools.posthoc import main_posthoc

    ran = tmp_path / "ran"
    listing = tmp_path / "val.txt"
    listing.write_text(f"pipe:touch {ran}; cat v.tar\n")
    cfg = TrainConfig()
    cfg.data.val_shards, cfg.data.allow_pipe = str(listing), True
    run = tmp_path / "run"
    run.mkdir()
    dump_config(cfg, run / "config.yaml")
    with pytest.raises(SystemExit, match=rf"the list file {listing} names 'pipe:touch .*pass --allow-pipe"):
        main_posthoc(["--run", str(run), "--eval"])
    with pytest.raises(SystemExit, match="has no complete snapshots"):  # allowed: on to the snapshots
        main_posthoc(["--run", str(run), "--eval", "--allow-pipe"])
    assert not ran.exists()
