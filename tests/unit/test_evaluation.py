"""The Evaluator's order of work: every variant's forwards (collectives under FSDP2) come before
the main process writes a sample grid, so a slow disk never holds the other ranks inside them."""

from __future__ import annotations

import contextlib

import numpy as np

import sd_train.evaluation as evaluation
from sd_train.evaluation import Evaluator


def test_sample_grids_are_written_after_every_variants_forwards(tmp_path, monkeypatch):
    events: list[str] = []

    class Validator:
        def loss(self, model) -> float:
            events.append("loss")
            return 0.5

    class Sampler:
        def sample(self, model) -> np.ndarray:
            events.append("sample")
            return np.zeros((1, 8, 8, 3), dtype=np.uint8)

    class EMA:
        is_open = True

        @contextlib.contextmanager
        def swapped_in(self):
            events.append("swap in")
            yield
            events.append("swap out")

    class Metrics:
        def log_image(self, step: int, name: str, path: str) -> None:
            events.append(f"log {name}")

    monkeypatch.setattr(evaluation, "save_grid", lambda images, path: events.append(f"write {path.name}") or path)
    ev = Evaluator.__new__(Evaluator)  # the cadence and variants only: no model parts needed
    ev.validator, ev.sampler, ev.ema, ev.metrics, ev.out, ev.is_main = (
        Validator(),
        Sampler(),
        EMA(),
        Metrics(),
        tmp_path,
        True,
    )
    assert ev.run(12, model=None) == {"val/loss_raw": 0.5, "val/loss_ema": 0.5}
    assert events == [
        "loss", "sample", "swap in", "loss", "sample", "swap out",
        "write step_00000012_raw.png", "log samples/raw", "write step_00000012_ema.png", "log samples/ema",
    ]  # fmt: skip
