"""DCP save planners that cache their plan, one class per kind of save.

Before a rank writes a single byte, `dcp.save` plans: every rank lists what it holds (one write
item per tensor: ~2,300 for the test UNet's model, Adam moments and steps, EMA and two post-hoc
profiles), the coordinator gathers and unpickles all the lists, deduplicates them, builds the
global plan and the metadata, and scatters the plan back. For small tensors that costs as much as
the writing itself (docs/performance.md). A run saves the same state again and again, so the plan
is the same every time: with `enable_plan_caching` a rank whose plan has not changed sends an
empty one, and the coordinator reuses the global plan and metadata it made last time. What is
written, and `.metadata`, are the same as without the cache (the file offsets are recorded anew
on every save; scripts/compare_commits.py checks the checkpoints bitwise).

torch keeps the cache per planner class (`SavePlanner._cached_*`, keyed by the class name), so
each kind of save has its own class: a checkpoint and a post-hoc snapshot hold different tensors,
and one planner shared between them would find its cached plan changed on every save. A plan that
did change (the EMA window opened, another world size) is planned in full, and cached anew.
"""

from __future__ import annotations

from torch.distributed.checkpoint import DefaultSavePlanner


class CheckpointSavePlanner(DefaultSavePlanner):
    """The plan of a checkpoint's tensors (model, optimizer, EMA, post-hoc profiles), cached."""

    def __init__(self) -> None:
        super().__init__(enable_plan_caching=True)


class SnapshotSavePlanner(DefaultSavePlanner):
    """The plan of a post-hoc EMA snapshot (the profiles alone), cached."""

    def __init__(self) -> None:
        super().__init__(enable_plan_caching=True)
