"""Two real gloo processes through sd_train's FSDP2 sharding and sharded EMA (the GPU code path)."""

import json

import pytest

from sd_train.config import DistArgs
from tests.support.launch import REPO, ranks_cmd, run

pytestmark = pytest.mark.multiproc


def test_sharded_ema_two_ranks(tmp_path):
    out = tmp_path / "report"
    run(ranks_cmd(2, str(REPO / "tests/e2e/dist/ema_fsdp2.py"), str(out)), timeout=180)
    reports = [json.loads((tmp_path / f"report.rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        assert rep["world_size"] == 2
        assert rep["all_dtensor_shard0"], "params must be DTensors sharded Shard(0)"
        assert rep["uneven_params"], "the test must cover a parameter FSDP2 pads"
        assert rep["ema_bytes_before_window"] == 0
        assert rep["ema_updates"] == 3
        assert rep["ema_equal_gathered"], "gathered sharded EMA must equal the EMA of the gathered params bitwise"
        assert rep["ema_max_diff_vs_single_process"] < 1e-5
        assert rep["swap_in_is_ema"] and rep["swap_out_restores"]
        # Langevin noise keyed by global offsets: the sharded run is the 1-process run (SGD's
        # reduction-order tolerance), though each step adds noise of std 0.01; each rank drew its
        # shards and the rest of the chunks their edges cut, about half the model (measured 53%),
        # not all of it.
        assert rep["params_max_diff_vs_single_process"] < 1e-5 < rep["noise_std"] / 100
        full = rep["full_bytes"] / 4
        assert all(rep["local_numel"] <= n < 0.6 * full for n in rep["noise_drawn_per_step"])
    per_rank = reports[0]["ema_bytes_all_ranks"]
    assert sum(per_rank) == reports[0]["full_bytes"], "the ranks' EMA shards add up to exactly one copy"
    assert all(b < reports[0]["full_bytes"] * 0.6 for b in per_rank), "each rank holds only its share"


@pytest.mark.parametrize("nproc", [1, 2])
def test_ema_eval_forward_equals_plain_unet_with_ema_weights(tmp_path, nproc):
    """The forward that evaluation runs with the EMA swapped in (right after a no_grad raw forward,
    when FSDP2 keeps its root gathered) equals a plain UNet holding the gathered EMA, bitwise, for
    FSDP2 and DDP at world 1 and 2; so does the forward after swapping back, with the raw weights."""
    out = tmp_path / "report"
    run(ranks_cmd(nproc, str(REPO / "tests/e2e/dist/ema_eval_forward.py"), str(out)), timeout=180)
    for r in range(nproc):
        rep = json.loads((tmp_path / f"report.rank{r}.json").read_text())
        assert rep["fsdp2"]["sharded_shard0"], "FSDP2 params must be DTensors sharded Shard(0)"
        for strategy in ("fsdp2", "ddp"):
            s = rep[strategy]
            assert s["world_size"] == nproc and s["ema_updates"] == 3
            assert s["raw_vs_ema_max_diff"] > 1.0, "raw and EMA must differ, or equality shows nothing"
            assert s["ema_forward_equal"], f"{strategy}: EMA forward differs by {s['ema_forward_max_diff']}"
            assert s["raw_forward_equal"] and s["after_swap_forward_equal"], strategy
        # The control: without releasing FSDP2's gathered copies the swap is not seen (the old bug).
        assert rep["fsdp2"]["unreleased_swap_max_diff"] > 1.0


def test_hsdp_ema_follows_the_shard_dimension_and_reshards(tmp_path):
    """HSDP as (replicate 2, shard 1): params placed (Replicate, Shard(0)); the replicas' EMA equal
    bitwise with no collective, and equal to the EMA of the gathered params; an HSDP checkpoint
    reloads into FSDP over 2 ranks and into one process with raw and EMA weights equal. On both
    meshes the shard-local clipping and AdamW (fused and foreach) equal torch's on the DTensors bitwise."""
    out = tmp_path / "report"
    run(ranks_cmd(2, str(REPO / "tests/e2e/dist/hsdp.py"), str(out)), timeout=180)
    reports = [json.loads((tmp_path / f"report.rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        assert rep["world_size"] == 2 and rep["mesh"] == {"replicate": 2, "shard": 1}
        assert rep["group_timeouts_s"] == [DistArgs().timeout_s] * 2, "dist.timeout_s reaches the sub-meshes"
        assert rep["placements_hsdp"] and rep["placements_fsdp"]
        assert rep["ema_equal_across_replicas"] and rep["ema_equal_gathered_reference"]
        assert rep["fsdp_raw_equal"] and rep["fsdp_ema_equal"] and rep["raw_vs_ema_differ"]
        assert set(rep["local_optimizer"]) == {"hsdp_fused", "hsdp_foreach", "fsdp_fused", "fsdp_foreach"}
        for case, checks in rep["local_optimizer"].items():
            assert all(checks.values()), (case, checks)
    assert reports[0]["one_process_raw_equal"] and reports[0]["one_process_ema_equal"]


def test_fsdp_wrappings_hold_what_they_say_and_train_the_same(tmp_path):
    """World 4 (the smallest with an integer reshard_after_forward), params DTensors Shard(0).
    dist.reshard_after_forward=2: between forward and backward a block holds half of each weight
    (true: a quarter, false: all of it), and the per-step losses and final weights equal the true and
    false runs' bitwise (resharding moves bytes, it does no arithmetic). dist.fsdp_units=layers (each
    resnet and transformer block its own unit) gives the losses and weights of the per-block default
    to float32 rounding (measured at world 2: 2.3e-7 relative on the third loss, 1.2e-7 on weights of
    magnitude 1: the gathered parameters sit in other buffers at other offsets, and the CPU kernels
    round the last bit differently), and explicit prefetch changes no bit at all."""
    out = tmp_path / "report"
    run(ranks_cmd(4, str(REPO / "tests/e2e/dist/fsdp_wrappings.py"), str(out)), timeout=300)
    for r in range(4):
        rep = json.loads((tmp_path / f"report.rank{r}.json").read_text())
        assert rep["world_size"] == 4
        assert all(rep[k]["shard0"] for k in ("true", "false", "2", "layers", "layers_prefetch"))
        assert [rep[k]["held_after_forward"][0] for k in ("true", "2", "false")] == [0.25, 0.5, 1.0]
        assert rep["2"]["losses"] == rep["true"]["losses"] == rep["false"]["losses"]
        assert rep["2"]["weights"] == rep["true"]["weights"] == rep["false"]["weights"]
        blocks, layers, prefetch = rep["true"], rep["layers"], rep["layers_prefetch"]
        # This UNet has 5 blocks (2 down, mid, 2 up) + the root; layers adds its 12 resnets and
        # transformer blocks.
        assert (blocks["units"], layers["units"], prefetch["units"]) == (6, 18, 18)
        assert prefetch["losses"] == layers["losses"] and prefetch["weights"] == layers["weights"]
        assert max(abs(a - b) / abs(b) for a, b in zip(layers["losses"], blocks["losses"])) < 1e-6
        assert max(abs(a - b) for a, b in zip(layers["weights"], blocks["weights"])) < 1e-6
