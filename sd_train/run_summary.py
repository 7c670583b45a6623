"""The block the main process prints when a run ends: how far it got, how well, how fast, and where
everything went. Until it, those figures were only in metrics.jsonl.

Torch-free: the trainer gathers the figures (a collective for the data counts) and this formats them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _at(value: Optional[tuple[int, float]], digits: int) -> str:
    return "not logged" if value is None else f"{value[1]:.{digits}f} (step {value[0]})"


@dataclass
class RunSummary:
    """The figures of one launch's end (`step` is the run's, `start_step` where this launch began)."""

    output_dir: Path
    step: int
    start_step: int
    skipped_steps: int
    world_size: int
    wall_s: float
    img_per_s_per_device: Optional[float]
    train_loss: Optional[tuple[int, float]] = None  # (step, value), the last logged
    val_raw: Optional[tuple[int, float]] = None
    val_ema: Optional[tuple[int, float]] = None
    checkpoints: list[Path] = field(default_factory=list)
    exports: list[Path] = field(default_factory=list)
    samples_read: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    filtered: int = 0
    posthoc_snapshots: int = 0

    def lines(self) -> list[str]:
        speed = "n/a" if self.img_per_s_per_device is None else f"{self.img_per_s_per_device:.1f}"
        devices = f"{self.world_size} device" + ("s" if self.world_size > 1 else "")
        if not self.start_step:
            resumed = ""
        elif self.start_step < self.step:
            resumed = f" (this launch: steps {self.start_step + 1}..{self.step})"
        else:
            resumed = " (resumed at the last step: nothing left to train)"
        bad = sum(self.bad.values())
        bad_kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.bad.items()) if v)
        checkpoints = ", ".join(p.name for p in self.checkpoints) or "none"
        root = self.checkpoints[0].parent if self.checkpoints else self.output_dir / "checkpoints"
        rows = [
            ("steps", f"{self.step}{resumed}, {self.skipped_steps} skipped (non-finite)"),
            ("train loss", _at(self.train_loss, 4) + ", mean over ranks"),
            ("val loss", f"raw {_at(self.val_raw, 6)}; EMA {_at(self.val_ema, 6)}"),
            ("time", f"{_duration(self.wall_s)} wall; {speed} img/s per device over {devices} (training time only)"),
            ("checkpoints", f"{checkpoints} in {root}"),
            ("exports", ", ".join(str(p) for p in self.exports) or "none (export_at_end=false)"),
            (
                "data",
                f"{self.samples_read} samples read, {bad} bad"
                + (f" ({bad_kinds})" if bad_kinds else "")
                + f", {self.filtered} filtered out",
            ),
        ]
        if self.posthoc_snapshots:
            rows.append(
                (
                    "next",
                    f"sd-train posthoc --run {self.output_dir} --eval   "
                    f"(choose the EMA length from {self.posthoc_snapshots} post-hoc snapshots)",
                )
            )
        return [f"run summary: {self.output_dir}"] + [f"  {name:<12} {text}" for name, text in rows]

    def format(self) -> str:
        return "\n".join(self.lines())
