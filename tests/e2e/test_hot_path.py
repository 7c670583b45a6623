"""The hot path as a run uses it: at most one host sync per optimizer step on steps that neither
log, evaluate nor save, the throughput figures in metrics.jsonl, and the GPU proof's `--tiny` mode
(the same sections, on CPU)."""

import json
import sys
from pathlib import Path

import pytest

from tests.support.launch import REPO, ranks_cmd, run
from tests.support.runs import TRAIN


def test_one_host_sync_per_plain_step_and_readable_throughput(tiny_assets, tmp_path: Path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, TRAIN, "--config", "configs/test.yaml", *tiny_assets["overrides"], f"output_dir={out}",
        "max_steps=8", "metrics.log_every=4", "checkpoint.every_steps=8", "eval.every_steps=0",
        "ema.step_start_ema=4", "export_at_end=false", "perf.peak_tflops=0.001",
    ]  # fmt: skip
    proc = run(cmd, timeout=300)
    assert "hot path: cpu, params fp32, AdamW fused" in proc.stdout and "GFLOP" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in logged] == [4, 8]
    for r in logged:
        # Steps 1-3 and 5-7 are plain: the grad-norm read (with the preemption flag) is their only one.
        assert r["speed/host_syncs_per_step"] == 1, r
        assert r["speed/img_per_s_per_gpu"] > 0 and 0 < r["speed/mfu"] == r["speed/tflops_per_gpu"] / 0.001
        for key in ("speed/data_ms", "speed/forward_backward_ms", "speed/optimizer_ms", "speed/ema_ms"):
            assert r[key] >= 0, key
        assert r["memory/peak_allocated_gb"] > 0 and r["memory/peak_reserved_gb"] > 0


def test_gpu_proof_tiny_runs_every_section_on_cpu(tmp_path: Path):
    proc = run([sys.executable, str(REPO / "bench" / "gpu_proof.py"), "--tiny", "--out", str(tmp_path)], timeout=300)
    result = json.loads((tmp_path / "gpu_proof.json").read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == result
    assert result["tiny"] is True
    sections = result["sections"]
    assert set(sections) == {"environment", "model", "throughput", "ema", "checkpoint", "correctness"}
    failed = {name: s.get("error") for name, s in sections.items() if s["status"] != "ok"}
    assert not failed, failed
    checks = sections["correctness"]["checks"]
    assert checks["nan_step_skipped"] and checks["nan_weights_untouched"] and checks["nan_ema_untouched"]
    assert checks["ema_eval_max_abs_diff"] == 0.0
    assert sections["checkpoint"]["bitwise_reload"] is True
    assert all(row["host_syncs_per_step"] <= 1 for row in sections["throughput"]["rows"] if row["path"] == "new")


@pytest.mark.multiproc
def test_compiled_channels_last_fsdp2_matches_eager(tmp_path: Path):
    """perf.compile (per block, before fully_shard) and perf.channels_last on 2 FSDP2 ranks: the
    forward and the gathered gradients within 1e-4 of eager (relative to the largest value)."""
    out = tmp_path / "report.json"
    run(ranks_cmd(2, str(REPO / "tests/e2e/dist/compile_fsdp2.py"), str(out)), timeout=600)
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["names_equal"] and report["graphs"] >= 5, report
    assert report["forward_rel"] <= 1e-4 and report["grad_rel"] <= 1e-4, report
