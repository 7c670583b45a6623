"""The Evaluator's order of work: every variant's forwards (collectives under FSDP2) come before
the main process writes a sample grid, and the grid is written on the background writer's thread,
so a slow disk never holds the other ranks inside a collective. And the writer itself."""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest

import sd_train.evaluation as evaluation
from sd_train.background_writer import BackgroundWriter
from sd_train.evaluation import Evaluator


def test_sample_grids_are_written_after_every_variants_forwards(tmp_path, monkeypatch):
    events: list[str] = []
    # The stand-ins tell raw from EMA by the swap: loss 0.25 and black samples with the raw weights,
    # 0.75 and white ones with the EMA's, so a variant that reports the other's figures fails.
    swapped = [False]

    class Validator:
        def loss(self, model) -> float:
            events.append("loss")
            return 0.75 if swapped[0] else 0.25

    class Sampler:
        def sample(self, model) -> np.ndarray:
            events.append("sample")
            return np.full((1, 8, 8, 3), 255 if swapped[0] else 0, dtype=np.uint8)

    class EMA:
        is_open = True

        @contextlib.contextmanager
        def swapped_in(self):
            events.append("swap in")
            swapped[0] = True
            yield
            swapped[0] = False
            events.append("swap out")

    logged: dict[str, int] = {}

    class Metrics:
        def log_image(self, step: int, name: str, path: str, image) -> None:
            assert image.size == (128, 128)  # the picture itself: the file may not be written yet
            logged[name] = image.getpixel((64, 64))[0]
            events.append(f"log {name}")

    released = threading.Event()
    writes: list[tuple[str, str]] = []

    def write_png(image, path, before_write):
        before_write()
        released.wait(10)  # a slow disk
        writes.append((path.name, threading.current_thread().name))

    monkeypatch.setattr(evaluation, "write_png", write_png)
    ev = Evaluator.__new__(Evaluator)  # the cadence and variants only: no model parts needed
    ev.validator, ev.sampler, ev.ema, ev.metrics, ev.out, ev.is_main = (
        Validator(),
        Sampler(),
        EMA(),
        Metrics(),
        tmp_path,
        True,
    )
    ev.writer, ev.fault_hook = BackgroundWriter(), lambda phase, step: events.append(f"{phase} {step}")
    ev.quality = None  # eval.quality_samples=0: no sample-quality figures
    assert ev.run(12, model=None) == {"val/loss_raw": 0.25, "val/loss_ema": 0.75}
    assert logged == {"samples/raw": 0, "samples/ema": 255}
    # run() returned with the disk still busy: nothing was written on the training thread.
    assert writes == [] and ev.writer.pending() == 2
    released.set()
    ev.close()
    assert [e for e in events if not e.startswith("grid_write")] == [
        "loss", "sample", "swap in", "loss", "sample", "swap out", "log samples/raw", "log samples/ema",
    ]  # fmt: skip
    assert events.count("grid_write 12") == 2
    assert [name for name, _ in writes] == ["step_00000012_raw.png", "step_00000012_ema.png"]
    assert all(thread.startswith("sd-train-writer") for _, thread in writes)


def test_background_writer_keeps_order_and_raises_a_failed_write():
    writer, done = BackgroundWriter(), []
    for i in range(5):
        writer.submit(done.append, i)
    writer.close()
    assert done == [0, 1, 2, 3, 4]

    def fail() -> None:
        raise OSError("disk full")

    writer = BackgroundWriter()
    writer.submit(fail)
    with pytest.raises(OSError, match="disk full"):
        writer.close()


def test_grid_png_is_written_whole(tmp_path):
    from PIL import Image

    image = evaluation.grid_image(np.full((2, 8, 8, 3), 200, dtype=np.uint8))
    path = tmp_path / "samples" / "step_00000001_raw.png"
    evaluation.write_png(image, path)
    assert Image.open(path).size == image.size and not list(path.parent.glob(".*partial"))
