"""Which checkpoint folders a launch may resume from, and what a rollback does with the rest.

A rollback is a launch that names its checkpoint: `checkpoint.load_step=N` (a step of this run) or
`checkpoint.resume=PATH` (any step folder, of this run or another). It starts a new branch of the
run at that checkpoint, and the old branch must stop counting: resume=auto and retention rank
folders by step number, so its later steps would otherwise win the next plain relaunch, and
`sd-train posthoc` would mix its snapshots into the reconstructions. So, once the named checkpoint
has loaded, rank 0:
- moves every checkpoint of the old branch (this run's steps after N; all of them when PATH is
  another run's) and every post-hoc snapshot after N (all, likewise) into
  `<output_dir>/abandoned-<N>-<time>/{checkpoints,posthoc}/`: moved, never deleted;
- appends the rollback to `<output_dir>/rollbacks.jsonl` (time, source folder, step, what moved).

A relaunch of the same command (a SLURM requeue repeats load_step=N) must continue the new branch,
not roll back again and throw its progress away. When the newest record names the same source
folder, the launch is such a relaunch: it resumes from the branch's newest loadable checkpoint after
N (falling back newest first, and last to the source itself), and nothing moves. This holds even
once retention has deleted step N. To roll back to the same checkpoint a second time, roll back to
another one first, or move the branch's later steps away by hand.

Folders a failed load left behind (`step_XXXXXXXX.broken-<time>`, kept for inspection) are listed by
`broken_folders` for the launch to report, and move with their step on a rollback. Torch-free:
preflight uses the same plan to refuse a resume before anything is written.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sd_train.paths import POSTHOC_DIR, STEP_RE, complete_steps, step_dir

ROLLBACKS = "rollbacks.jsonl"
CHECKPOINTS = "checkpoints"
_BROKEN_RE = re.compile(r"^step_(\d{8})\.broken-\d+$")


@dataclass
class ResumePlan:
    """The folders to try, newest first, and the named checkpoint this launch branches from (None
    when it continues a branch, or resumes plainly)."""

    candidates: list[Path]
    branch_from: Optional[Path] = None


def resume_plan(output_dir: str | Path, resume: str, load_step: Optional[int]) -> ResumePlan:
    """What `checkpoint.resume` / `checkpoint.load_step` mean for this output_dir right now."""
    root = Path(output_dir) / CHECKPOINTS
    if resume == "none":
        return ResumePlan([])
    if resume == "auto" and load_step is None:
        return ResumePlan([step_dir(root, s) for s in reversed(complete_steps(root))])
    source = Path(resume) if resume != "auto" else step_dir(root, load_step)
    last = read_rollbacks(output_dir)[-1:]
    if last and last[0]["source"] == str(source.resolve()):
        later = [step_dir(root, s) for s in reversed(complete_steps(root)) if s > last[0]["step"]]
        return ResumePlan(later + [source])
    return ResumePlan([source], branch_from=source)


def read_rollbacks(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / ROLLBACKS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def start_branch(output_dir: str | Path, source: Path, step: int) -> dict:
    """After `source` (at `step`) has loaded: move the old branch aside and record the rollback.
    Main process only. Returns the record."""
    out = Path(output_dir)
    root = out / CHECKPOINTS
    # Another run's checkpoint: nothing here is on the new branch.
    foreign = source.resolve().parent != root.resolve()
    after = -1 if foreign else step
    stamp = time.strftime("%Y%m%d-%H%M%S")
    abandoned = out / f"abandoned-{step:08d}-{stamp}"
    moved: dict[str, list[str]] = {CHECKPOINTS: [], POSTHOC_DIR: []}
    for kind, pattern in ((CHECKPOINTS, (STEP_RE, _BROKEN_RE)), (POSTHOC_DIR, (STEP_RE,))):
        folder = out / kind
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            m = next((p.match(entry.name) for p in pattern if p.match(entry.name)), None)
            if m and int(m.group(1)) > after:
                (abandoned / kind).mkdir(parents=True, exist_ok=True)
                os.rename(entry, abandoned / kind / entry.name)
                moved[kind].append(entry.name)
    record = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "source": str(source.resolve()),
        "step": step,
        "abandoned": abandoned.name if any(moved.values()) else None,
        "moved_checkpoints": moved[CHECKPOINTS],
        "moved_snapshots": moved[POSTHOC_DIR],
    }
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ROLLBACKS, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return record


def broken_folders(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders kept after they failed to load, oldest step first."""
    root = Path(output_dir) / CHECKPOINTS
    return sorted(e for e in root.iterdir() if _BROKEN_RE.match(e.name)) if root.is_dir() else []


def broken_note(output_dir: str | Path) -> Optional[str]:
    """What a resume says about the folders kept after a failed load (None when there are none)."""
    broken = broken_folders(output_dir)
    if not broken:
        return None
    shown = ", ".join(str(b) for b in broken[:5]) + (" ..." if len(broken) > 5 else "")
    return (
        f"note: {len(broken)} checkpoint folder(s) kept for inspection after they failed to load: {shown}; they "
        "never count for a resume: delete them when done"
    )


def describe_rollback(record: dict, output_dir: str | Path) -> str:
    moved = len(record["moved_checkpoints"]) + len(record["moved_snapshots"])
    where = (
        f"moved {moved} later checkpoint/snapshot folder(s) to {Path(output_dir) / record['abandoned']}"
        if moved
        else "no later checkpoints to move"
    )
    return (
        f"rollback to {record['source']} (step {record['step']}): a new branch starts here; {where}; recorded in "
        f"{Path(output_dir) / ROLLBACKS}. Relaunching this same command continues the new branch"
    )
