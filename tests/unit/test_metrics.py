"""metrics.jsonl reads forward on resume: one row per step, in order, with a `resumed` event, and
wandb gets the same monotonic history (the steps it already holds are not sent again)."""

from __future__ import annotations

import json
from pathlib import Path

from sd_train.config import MetricsArgs
from sd_train.metrics import Metrics


class FakeWandb:
    """Records what `wandb.log` was given."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.config: dict = {}

    def log(self, values: dict, step: int) -> None:
        self.steps.append(step)

    def finish(self) -> None:
        pass


def launch(out: Path) -> tuple[Metrics, FakeWandb]:
    m = Metrics(MetricsArgs(log_every=1), str(out), "run")
    m.wandb = FakeWandb()
    return m, m.wandb


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_resumed_run_reads_forward_and_wandb_stays_monotonic(tmp_path):
    # Launch 1 logs steps 1..6 and dies after its step-4 checkpoint (the last line half-written).
    m, w1 = launch(tmp_path)
    m.log_config({"seed": 0}, {})
    m.start(0)
    for s in range(1, 7):
        m.log(s, {"train/loss": 1.0 / s})
    m.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "train/lo')
    # Launch 2 resumes from the step-4 checkpoint and logs steps 5..8 again / anew.
    m, w2 = launch(tmp_path)
    m.log_config({"seed": 0}, {})
    m.start(4, {"event": "resumed", "from": "checkpoints/step_00000004"})
    for s in range(5, 9):
        m.log(s, {"train/loss": 1.0 / s})
    m.close()

    logged = rows(tmp_path)
    steps = [r["step"] for r in logged if "train/loss" in r]
    assert steps == list(range(1, 9)), "one row per step, in order"
    events = [r for r in logged if r.get("event") == "resumed"]
    assert len(events) == 1 and events[0]["step"] == 4 and events[0]["dropped_rows"] == 3  # 5, 6, half 7
    assert [r["step"] for r in logged if "step" in r] == sorted(r["step"] for r in logged if "step" in r)
    assert sum("config" in r for r in logged) == 2, "each launch's config row stays"
    assert w1.steps + w2.steps == list(range(1, 9)), "wandb: each step once, increasing"
    assert m.latest["train/loss"] == (8, 1.0 / 8)


def test_a_restart_from_step_0_drops_every_step_row(tmp_path):
    """A launch that died before its first checkpoint: the next one starts over from step 0."""
    m, _ = launch(tmp_path)
    m.start(0)
    m.log(0, {"val/loss_raw": 1.0})
    m.log(1, {"train/loss": 1.0})
    m.close()
    m, w = launch(tmp_path)
    m.start(0)
    m.log(0, {"val/loss_raw": 1.0})
    m.close()
    assert [r["step"] for r in rows(tmp_path)] == [0]
    assert w.steps == [], "wandb already holds step 0 and 1"
