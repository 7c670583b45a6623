"""Post-hoc EMA in one process: the math against EDM2's published numbers and an independent
recurrence, and the sharded profiles (a 1-rank gloo group, FSDP2 on a small module) against the
closed form of the weights they must hold, their snapshots, the reconstruction and a checkpoint
round trip (torch.equal where the claim is exactness)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor, Shard

from sd_train.checkpoint import Checkpointer
from sd_train.checksums import manifest_path, verify
from sd_train.config import CheckpointArgs, DistArgs, EMAArgs, PosthocArgs, TrainConfig
from sd_train.ema.plan import plan_from_config, posthoc_plan_from_config
from sd_train.ema.posthoc import PowerEMAProfiles, load_snapshot_profile, read_snapshot_meta
from sd_train.ema.posthoc_math import (
    MAX_SIGMA_REL,
    classic_weights,
    gamma_to_sigma_rel,
    power_beta,
    power_weights,
    sigma_rel_to_gamma,
    solve,
)
from sd_train.ema.sharded import ShardedEMA
from sd_train.errors import UsageError
from sd_train.parallel.deepspeed import DeepSpeedStrategy, offline_shadow
from sd_train.parallel.fsdp import DTensorLayout, FSDPStrategy
from sd_train.paths import partial_dir, snapshot_steps, step_dir
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


def test_sigma_rel_outside_the_open_interval_is_refused_by_name():
    for bad in (0.0, -0.1, MAX_SIGMA_REL, 0.3):
        with pytest.raises(ValueError, match=rf"sigma_rel={bad} must be in \(0, 0\.2887\)"):
            sigma_rel_to_gamma(bad)
    assert sigma_rel_to_gamma(MAX_SIGMA_REL * (1 - 1e-6)) == pytest.approx(0.0, abs=1e-4)  # the uniform average


def test_weights_are_padded_with_zeros_to_the_window():
    for weights in (power_weights(6.94, 3, 6), classic_weights(0.5, 3, 6)):
        assert weights.shape == (6,) and weights.dtype == np.float64
        assert np.all(weights[4:] == 0) and weights.sum() == pytest.approx(1.0, abs=1e-15)
    assert np.array_equal(classic_weights(0.5, 3, 6)[:4], [0.125, 0.125, 0.25, 0.5])


def test_rcond_keeps_coefficients_bounded_on_an_ill_conditioned_basis():
    """Five profiles snapshotted every 5 steps over 500: some directions of the basis are spanned at
    1e-11 of the largest. Cut at 1e-10 the coefficients stay 13x smaller than plain least squares
    takes them (244 against 3,154), and fp16 snapshots' rounding is amplified that much less."""
    gammas = [sigma_rel_to_gamma(s) for s in (0.03, 0.05, 0.07, 0.1, 0.15)]
    basis = [(k, g) for k in range(0, 501, 5) for g in gammas]
    target = classic_weights(0.9, 500)
    a = np.stack([power_weights(g, k, 501) for k, g in basis])
    plain, *_ = np.linalg.lstsq(a.T, target, rcond=None)
    fit = solve(basis, target)
    assert np.abs(plain / plain.sum()).max() > 3000
    assert fit.max_abs_coefficient < 300 and fit.fit_error < 1e-5


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


def test_coefficients_sum_to_one_where_the_least_squares_ones_do_not():
    """Snapshots every 4 steps over 16 express sigma_rel 0.12 and a classic decay of 0.99 within the
    tool's bound, but plain least squares puts weights summing to 0.993 and 0.972 on them: unscaled,
    a reconstructed UNet would come out 0.7% and 2.8% too small."""
    gammas = [sigma_rel_to_gamma(s) for s in SIGMAS]
    basis = [(k, g) for k in range(0, 17, 4) for g in gammas]
    a = np.stack([power_weights(g, k, 17) for k, g in basis])
    for target in (power_weights(sigma_rel_to_gamma(0.12), 16), classic_weights(0.99, 16)):
        unscaled, *_ = np.linalg.lstsq(a.T, target, rcond=None)
        assert abs(unscaled.sum() - 1) > 0.005, "a case where the scaling matters"
        fit = solve(basis, target)
        assert fit.coefficients.sum() == pytest.approx(1.0, abs=1e-12)
        # The fit error is that of the coefficients returned, measured after the scaling.
        assert fit.fit_error == pytest.approx(np.linalg.norm(a.T @ fit.coefficients - target) / np.linalg.norm(target))
        assert fit.fit_error < MAX_FIT_ERROR and fit.max_abs_coefficient == pytest.approx(
            np.abs(fit.coefficients).max()
        )


def test_reconstructing_constant_weights_returns_the_constant(info, tmp_path):
    """Weights that never change make every snapshot profile that constant, so every reconstruction
    must return it: a scale error in the coefficients shows as a scaled UNet. A snapshot with a
    flipped bit is then refused by its checksum manifest."""
    module = torch.nn.Linear(3, 2)
    with torch.no_grad():
        module.weight.fill_(0.375)
        module.bias.fill_(-1.25)
    args = EMAArgs(decay=0.99, step_start_ema=4, tolerance=0.99, posthoc=PosthocArgs(SIGMAS, 4))
    profiles = PowerEMAProfiles(module, posthoc_plan_from_config(args, 20), DTensorLayout(module))
    for step in range(1, 21):
        profiles.update(step)
        profiles.maybe_snapshot(tmp_path / "posthoc", step, 0)
    snaps = find_snapshots(tmp_path)
    assert [m["step"] for m in snaps.metas] == [4, 8, 12, 16, 20]
    targets = plan_targets(snaps, [0.12], [0.99], max_fit_error=MAX_FIT_ERROR)
    assert all(t.refused is None for t in targets)
    for name, state in reconstruct(snaps, targets).items():
        torch.testing.assert_close(state["weight"], torch.full((2, 3), 0.375), rtol=1e-5, atol=0, msg=name)
    shard = tmp_path / "posthoc" / "step_00000012" / "__0_0.distcp"  # one bit flipped: refused by name
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=rf"step_00000012 is damaged: checksum mismatch in {re.escape(str(shard))}"):
        find_snapshots(tmp_path)
        torch.testing.assert_close(state["bias"], torch.full((2,), -1.25), rtol=1e-5, atol=0, msg=name)


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


def test_eval_refuses_pipes_from_a_runs_config_unless_allowed(info, tmp_path, capsys):
    """`sd-train posthoc --eval` rebuilds the validator from the run's config.yaml, which may come
    from elsewhere: a `pipe:` URL there (here in a list file it names) is refused, whatever the
    run's own data.allow_pipe says, before anything is reconstructed, until --allow-pipe is given;
    the command never runs."""
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
    profiles = _open_profiles()
    for step in range(1, 9):
        profiles.update(step)
        profiles.maybe_snapshot(run / "posthoc", step, 0)
    with pytest.raises(UsageError, match=rf"the list file {listing} names 'pipe:touch .*pass --allow-pipe"):
        main_posthoc(["--run", str(run), "--eval"])
    assert "snapshots" not in capsys.readouterr().out, "refused before the snapshots are planned"
    # Allowed: on to the snapshots (every target refused by the bound, so no model is needed).
    assert main_posthoc(["--run", str(run), "--eval", "--allow-pipe", "--max-fit-error", "0"]) == 1
    printed = capsys.readouterr()
    assert "reconstructed 0 target(s)" in printed.out and "every target was refused" in printed.err
    assert not ran.exists()


def _open_profiles(dtype: str = "fp32", sigma_rels=(0.05, 0.1), start: int = 1) -> PowerEMAProfiles:
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    args = EMAArgs(decay=0.9, step_start_ema=start, posthoc=PosthocArgs(list(sigma_rels), 2, dtype=dtype))
    return PowerEMAProfiles(module, posthoc_plan_from_config(args, 10), DTensorLayout(module))


def test_profiles_refuse_other_settings_and_bad_pieces():
    profiles = _open_profiles()
    profiles.update(1)
    meta = profiles.meta_state_dict()
    for other in (_open_profiles(sigma_rels=(0.05, 0.2)), _open_profiles(start=2)):
        with pytest.raises(
            ValueError, match=r"^checkpoint tracked post-hoc profiles sigma_rels=\[0.05, 0.1\] from step 1, "
        ):
            other.load_meta_state_dict(meta)
        with pytest.raises(ValueError, match=r"from step \d: resume with the same ema.posthoc settings$"):
            other.load_meta_state_dict(meta)
    fresh = _open_profiles()
    fresh.load_meta_state_dict(meta)
    assert fresh.is_open and all(torch.equal(t, torch.zeros_like(t)) for s in fresh.shadows for t in s)
    fresh.load_meta_state_dict({**meta, "open": False})
    assert not fresh.is_open and fresh.local_state_dict() == {}
    fresh.load_meta_state_dict(meta)
    pieces = profiles.local_state_dict()
    with pytest.raises(ValueError, match=r"^post-hoc profile piece 'p0.weight': saved missing, expected \(2, 3\)$"):
        fresh.load_local_state_dict({k: v for k, v in pieces.items() if k != "p0.weight"})
    with pytest.raises(ValueError, match=r"^post-hoc profile piece 'p0.weight': saved \(3, 2\), expected \(2, 3\)$"):
        fresh.load_local_state_dict({**pieces, "p0.weight": torch.zeros(3, 2)})


def test_snapshots_replace_leftovers_and_keep_their_dtype(info, tmp_path, monkeypatch):
    """A crash's leftover `.partial` folder is cleared before writing, a step written again replaces
    the old snapshot (deleting it only once the new one is in place), and fp16 snapshots store fp16
    (read back as fp32)."""
    profiles = _open_profiles("fp16")
    root = tmp_path / "posthoc"
    assert profiles.maybe_snapshot(root, 2, 0) is None, "nothing to snapshot before the start"
    profiles.update(1)
    assert profiles.maybe_snapshot(root, 3, 0) is None, "not a snapshot step"
    leftover = partial_dir(root, 2)
    leftover.mkdir(parents=True)
    (leftover / "junk").write_text("from a crash")
    folder = profiles.maybe_snapshot(root, 2, 0)
    assert folder == step_dir(root, 2) and not (folder / "junk").exists() and not leftover.exists()
    meta = read_snapshot_meta(folder)
    assert (meta["dtype"], meta["world_size"], meta["step"], meta["step_start"]) == ("fp16", 1, 2, 1)
    # Checksummed like a checkpoint: every file of the snapshot, snapshot.json and .metadata included.
    listed = json.loads(manifest_path(folder, 0).read_text())["files"]
    assert {"snapshot.json", ".metadata"} < set(listed) and any(n.endswith(".distcp") for n in listed)
    assert verify(folder, 1) is None
    stored = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    assert {item.properties.dtype for item in stored.values()} == {torch.float16}
    with torch.no_grad():
        profiles.shadows[0][0].fill_(0.5)
    seen, real_rmtree = [], shutil.rmtree

    def watching_rmtree(path, *args, **kwargs):  # whatever is deleted, step 2 is complete meanwhile
        seen.append(load_snapshot_profile(folder, 0)["weight"])
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", watching_rmtree)
    profiles.write_snapshot(root, 2, 0)  # the same step again: replaces it, the old one deleted last
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert len(seen) == 1 and torch.equal(seen[0], torch.full((2, 3), 0.5)), "the new one was in place first"
    assert sorted(p.name for p in root.iterdir()) == [folder.name], "no partial or aside folder left"
    snap = load_snapshot_profile(folder, 0)
    assert snap["weight"].dtype == torch.float32 and torch.equal(snap["weight"], torch.full((2, 3), 0.5))
    with pytest.raises(KeyError, match="has no profile 2"):
        load_snapshot_profile(folder, 2)
    with pytest.raises(
        FileNotFoundError, match=r"is not a complete post-hoc snapshot \(no snapshot.json or .metadata\)"
    ):
        read_snapshot_meta(tmp_path)


def test_the_swap_without_trading_copies_the_shadow_in():
    """`_put` without a trade (the swap where the weights' dtype differs from the shadow's, which
    keeps a backup instead of trading values): the weights take the shadow's values, the shadow
    keeps them."""
    from sd_train.ema.sharded import _put

    dst, src = [torch.zeros(3), torch.zeros(2)], [torch.arange(3.0), torch.ones(2)]
    _put(dst, src, trade=False)
    assert all(torch.equal(d, s) for d, s in zip(dst, src)) and torch.equal(src[0], torch.arange(3.0))
