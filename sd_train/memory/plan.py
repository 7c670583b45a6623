"""The memory plan: per-rank device and host peaks of a run, phase by phase and item by item,
predicted before any process group starts, and `check()`, which refuses a run that cannot fit.

Where each figure comes from:
- model states (sharded params, gradients, optimizer state, the EMA and the post-hoc profiles, the
  async-save staging copy, the export's UNet) are closed forms of the parameter counts, which
  sd_train.memory.sizes reads from the model folder's safetensors headers: exact, torch-free;
- the step's own peak (gathered units, activations, temporaries, communication buffers, at the
  moment of the peak) comes from torch's FSDPMemTracker run on fake tensors and a fake process
  group (sd_train.memory.estimate), cached per configuration (sd_train.memory.record). Without a
  cached estimate the plan is a lower bound (model states only) and says so;
- the runtime (interpreter, torch, diffusers) and a loader worker's RSS are measured by the
  estimate's process.

Phases, each checked: the model load (the whole UNet on every rank before it is sharded), the
training step before and after the EMA window opens, the evaluation (the EMA swapped in), and the
export on rank 0 after the process group is gone. On a CPU run the device is the host: every
device item counts in the host's memory. The loader workers are processes of their own on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from sd_train.errors import ConfigError
from sd_train.memory.record import StepEstimate

GIB = 2**30
# What a CUDA process holds on its device besides tensors (context, cuBLAS workspace, NCCL
# buffers): an assumption, not a measurement (the CPU machine this was written on has no GPU).
CUDA_RESERVE = GIB


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


@dataclass(frozen=True)
class Item:
    name: str
    bytes: int
    note: str = ""


@dataclass
class Phase:
    """What one rank holds at the peak of one phase: `device` items (the host's, on a CPU run)
    and `host` items (host memory on a GPU run: runtime, staging buffers, the load's copies)."""

    name: str
    column: str
    """A short name, the phase's column in `describe`."""
    device: list[Item]
    host: list[Item]
    rank0_only: bool = False

    def device_bytes(self) -> int:
        return sum(i.bytes for i in self.device)

    def host_bytes(self, cpu: bool) -> int:
        return sum(i.bytes for i in self.host) + (self.device_bytes() if cpu else 0)

    def items(self, cpu: bool) -> list[Item]:
        return [*self.device, *self.host] if cpu else self.device


@dataclass
class Limits:
    """The memory a rank may use: `device` per rank (None on a CPU run), `host` per node."""

    device: Optional[int]
    device_source: str
    host: Optional[int]
    host_source: str
    ranks_per_node: int
    budget: Optional[int] = None  # dist.memory_budget_gb, per rank


@dataclass
class MemoryPlan:
    """The predicted per-rank peaks of a run, phase by phase. `check()` refuses what cannot fit."""

    world_size: int
    shard_size: int
    cpu: bool
    phases: list[Phase]
    workers: Item
    limits: Limits
    estimate: Optional[StepEstimate]
    async_save: bool
    staging: int
    notes: list[str] = field(default_factory=list)
    fix_finder: Optional[Callable[[MemoryPlan], list[str]]] = field(default=None, repr=False)
    """Set by sd_train.memory.build.memory_plan: the single config changes after which it fits."""

    @property
    def complete(self) -> bool:
        """False when the step's transients were not estimated: the peaks are then lower bounds."""
        return self.estimate is not None

    # ---- peaks --------------------------------------------------------------------------------

    def device_peak(self) -> tuple[int, Phase]:
        """(bytes, phase) of the largest per-rank device peak (the host's on a CPU run)."""
        phases = self.phases
        if self.cpu:
            return max(((p.host_bytes(True), p) for p in phases), key=lambda t: t[0])
        return max(((p.device_bytes(), p) for p in phases), key=lambda t: t[0])

    def host_peak(self, rank0: bool = True) -> tuple[int, Phase]:
        """(bytes, phase) of one rank's host peak, its loader workers not included."""
        phases = [p for p in self.phases if rank0 or not p.rank0_only]
        return max(((p.host_bytes(self.cpu), p) for p in phases), key=lambda t: t[0])

    def node_host_peak(self) -> int:
        """Host memory of a whole node: every rank at its training peak with its workers, or rank 0
        exporting alone after the others have exited."""
        training = [p.host_bytes(self.cpu) for p in self.phases if not p.rank0_only]
        alone = [p.host_bytes(self.cpu) for p in self.phases if p.rank0_only]
        return max([self.limits.ranks_per_node * (max(training) + self.workers.bytes), *alone])

    def overages(self) -> list[str]:
        """Each limit the plan exceeds, as a sentence; empty when it fits."""
        out = []
        peak, phase = self.device_peak()
        lim = self.limits
        if lim.budget is not None and peak > lim.budget:
            out.append(
                f"the per-rank peak {gib(peak)} ({phase.name}) exceeds dist.memory_budget_gb={lim.budget / GIB:g}"
            )
        if not self.cpu and lim.device is not None and peak > lim.device:
            out.append(
                f"the per-rank device peak {gib(peak)} ({phase.name}) exceeds the {lim.device_source}, "
                f"{gib(lim.device)}"
            )
        node = self.node_host_peak()
        if lim.host is not None and node > lim.host:
            out.append(
                f"the host needs {gib(node)} ({lim.ranks_per_node} ranks x {gib(self.host_peak(False)[0])} + "
                f"{self.workers.note}), more than the {lim.host_source}, {gib(lim.host)}"
            )
        return out

    # ---- refusing -----------------------------------------------------------------------------

    def check(self) -> None:
        """Raise ConfigError when a peak exceeds its limit, naming the largest items and the fixes
        that would fit."""
        over = self.overages()
        if not over:
            return
        peak, phase = self.device_peak()
        largest = sorted(phase.items(self.cpu), key=lambda i: -i.bytes)[:4]
        found = self.fixes()
        fixes = [f for f in found if "(not sized" not in f]
        unsized = [f for f in found if "(not sized" in f]
        raise ConfigError(
            "memory plan: "
            + "; ".join(over)
            + ". Largest items "
            + f"({phase.name}): "
            + ", ".join(f"{i.name} {gib(i.bytes)}" for i in largest)
            + ". "
            + (("Fixes that fit: " + "; ".join(fixes)) if fixes else "No single change of micro-batch, "
               "checkpointing, saving or EMA fits: use more ranks (a larger shard group) or a larger device")
            + (". Also worth estimating: " + "; ".join(unsized) if unsized else "")
            + (" (lower bound: the step was not estimated)" if not self.complete else "")
        )  # fmt: skip

    def fixes(self) -> list[str]:
        """Single changes of the config after which the plan fits, with the peak each gives."""
        return self.fix_finder(self) if self.fix_finder is not None else []

    # ---- output -------------------------------------------------------------------------------

    def describe(self) -> str:
        """The plan as a table: one row per item, one column per phase (GiB per rank)."""
        cols = [p.column for p in self.phases]
        sections = [("", [p.items(True) if self.cpu else p.device for p in self.phases])]
        if not self.cpu:
            sections.append(("host: ", [p.host for p in self.phases]))
        where = "CPU run: the device is the host" if self.cpu else "GPU run"
        lines = [f"Memory plan, GiB per rank (world {self.world_size}, shard group {self.shard_size}; {where}):"]
        lines.append(f"  {'':<34}" + "".join(f"{c:>10}" for c in cols))
        notes: dict[str, str] = {}
        for prefix, per_phase in sections:
            names: list[str] = []
            for items in per_phase:
                names += [i.name for i in items if i.name not in names]
            for name in names:
                cells = []
                for items in per_phase:
                    hit = [i for i in items if i.name == name]
                    cells.append(f"{hit[0].bytes / GIB:>10.2f}" if hit else f"{'':>10}")
                    if hit and hit[0].note and prefix + name not in notes:
                        notes[prefix + name] = hit[0].note
                lines.append(f"  {prefix + name:<34}" + "".join(cells))
            totals = [sum(i.bytes for i in items) for items in per_phase]
            lines.append(f"  {prefix + 'total':<34}" + "".join(f"{t / GIB:>10.2f}" for t in totals))
        lines.append(f"  {'loader workers (own processes)':<34}{self.workers.bytes / GIB:>10.2f}  {self.workers.note}")
        lines += [f"    {name}: {note}" for name, note in notes.items()]
        peak, phase = self.device_peak()
        lim = self.limits
        limit = lim.budget or (lim.device if not self.cpu else None)
        lines.append(f"  peak per rank: {gib(peak)} ({phase.name})" + (f" of {gib(limit)}" if limit else ""))
        if lim.host is not None:
            lines.append(
                f"  host, {lim.ranks_per_node} rank(s) per node with their workers: {gib(self.node_host_peak())} of "
                f"{gib(lim.host)} ({lim.host_source})"
            )
        lines += [f"  note: {n}" for n in self.notes]
        over = self.overages()
        lines.append("  memory verdict: " + ("fits" if not over else "does not fit: " + "; ".join(over)))
        return "\n".join(lines)
