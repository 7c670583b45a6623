"""Two real gloo processes through sd_train's FSDP2 sharding and sharded EMA (the GPU code path)."""

import json

import pytest

from launch import REPO, run, torchrun_cmd

pytestmark = pytest.mark.multiproc


def test_sharded_ema_two_ranks(tmp_path):
    out = tmp_path / "report"
    run(torchrun_cmd(2, str(REPO / "tests/dist/ema_fsdp2.py"), str(out)), timeout=180)
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
    per_rank = reports[0]["ema_bytes_all_ranks"]
    assert sum(per_rank) == reports[0]["full_bytes"], "the ranks' EMA shards add up to exactly one copy"
    assert all(b < reports[0]["full_bytes"] * 0.6 for b in per_rank), "each rank holds only its share"
