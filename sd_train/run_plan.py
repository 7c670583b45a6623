"""What `sd-train plan` and `train.py --plan` print: a validated config, previewed at any world size.

The plan is what a real start would say before it trains, without starting: the batch arithmetic
(ranks x micro-batch x accumulation), where everything goes (output_dir and what a run writes
there), the EMA window and the post-hoc EMA plans (`sd_train.ema.plan`). The config is checked at
the previewed world size by the same `validate` and `preflight` as a start, so a plan that says
"config OK" starts.

Torch-free, like the checks: the post-hoc plan's parameter count is read from the header of the
UNet's safetensors file, not from a model built in memory.

The memory plan (sd_train.memory) comes last: `memory_plan_for` plans the target's machine
(`--gpu-memory-gib`, `--host-memory-gib`, else this one's) and `memory_lines` prints its per-rank
peaks; the caller checks it after printing, so a refused plan still shows why.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sd_train.config import TrainConfig
from sd_train.ema.plan import plan_from_config, posthoc_plan_from_config
from sd_train.errors import ConfigError
from sd_train.memory.plan import GIB, MemoryPlan
from sd_train.memory.startup import startup_plan
from sd_train.paths import POSTHOC_DIR, complete_steps

# The ranks a node holds, assumed for a preview of a world larger than one node when neither the
# launcher nor --ranks-per-node says (8 GPUs per node, the common server).
DEFAULT_RANKS_PER_NODE = 8


@dataclass(frozen=True)
class PlanTarget:
    """The launch a plan previews: its world size (and who said so), ranks per node, and the
    machine the memory plan plans against."""

    world_size: int
    world_size_from: str  # "--world-size", "the launcher" or "one process"
    ranks_per_node: int
    gpu_memory_gib: Optional[float] = None  # --gpu-memory-gib: device memory per GPU (None: this machine's)
    host_memory_gib: Optional[float] = None  # --host-memory-gib: host memory per node (None: this machine's)
    estimate: bool = False  # --estimate: compute a missing step estimate now, whatever dist.memory_check says

    def launcher_environ(self, environ: dict[str, str]) -> dict[str, str]:
        """`environ` as a launcher of this world would set it (what preflight reads): the rank
        variables replaced, the rest (accelerate's DeepSpeed variables) kept."""
        keep = {k: v for k, v in environ.items() if not k.startswith("SLURM_")}
        keep.update(RANK="0", WORLD_SIZE=str(self.world_size), LOCAL_WORLD_SIZE=str(self.ranks_per_node))
        return keep


def plan_target(
    launcher_world: int,
    launcher_per_node: int,
    world_size: Optional[int],
    ranks_per_node: Optional[int],
    gpu_memory_gib: Optional[float],
    host_memory_gib: Optional[float] = None,
    estimate: bool = False,
) -> PlanTarget:
    """The target of a plan from the command line's flags and the launcher's environment."""
    if world_size is not None and world_size < 1:
        raise ConfigError(f"--world-size={world_size} must be at least 1")
    if ranks_per_node is not None and ranks_per_node < 1:
        raise ConfigError(f"--ranks-per-node={ranks_per_node} must be at least 1")
    for flag, value in (("--gpu-memory-gib", gpu_memory_gib), ("--host-memory-gib", host_memory_gib)):
        if value is not None and not value > 0:
            raise ConfigError(f"{flag}={value} must be a positive number of GiB")
    machine = {"gpu_memory_gib": gpu_memory_gib, "host_memory_gib": host_memory_gib, "estimate": estimate}
    if world_size is None:
        source = "the launcher" if launcher_world > 1 else "a plain start: one process"
        return PlanTarget(launcher_world, source, ranks_per_node or launcher_per_node, **machine)
    per_node = ranks_per_node or (launcher_per_node if launcher_world == world_size else None)
    per_node = per_node or min(world_size, DEFAULT_RANKS_PER_NODE)
    return PlanTarget(world_size, "--world-size", per_node, **machine)


def unet_param_count(model_path: str) -> Optional[int]:
    """The UNet's parameter count from its safetensors header(s) (the 8-byte length, then JSON with
    each tensor's shape), or None when the folder holds no safetensors weights."""
    unet = Path(model_path) / "unet"
    files = sorted(unet.glob("diffusion_pytorch_model*.safetensors"))
    plain = [f for f in files if f.name.count(".") == 1]  # not a variant (diffusion_pytorch_model.fp16.safetensors)
    total = 0
    for f in plain or files[:1]:
        try:
            with open(f, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
        except (OSError, ValueError, struct.error):
            return None
        for name, entry in header.items():
            if name != "__metadata__":
                n = 1
                for d in entry["shape"]:
                    n *= d
                total += n
    return total or None


def _output_lines(cfg: TrainConfig, posthoc_snapshots: int) -> list[str]:
    out = Path(cfg.output_dir)
    c = cfg.checkpoint
    existing = complete_steps(out / "checkpoints")
    if c.resume == "auto" and existing:
        start = f"resumes from its step {existing[-1]} checkpoint (checkpoint.resume=auto)"
    elif c.resume not in ("auto", "none"):
        start = f"resumes from {c.resume}"
    elif c.init_from:
        start = f"starts from the weights and optimizer of {c.init_from}"
    else:
        start = "starts at step 0"
    keep = "all" if c.keep_last_k == 0 else f"the newest {c.keep_last_k}"
    clock = f" and every {c.every_minutes:g} min" if c.every_minutes > 0 else ""
    lines = [
        f"  output_dir            {out}/ ({'exists: ' if out.exists() else 'new: '}{start})",
        "    config.yaml, metrics.jsonl, topology.json, ema_plan.json, data_summary.json",
        f"    checkpoints/          every {c.every_steps} steps{clock} and the last, keeping {keep}",
    ]
    if cfg.eval.every_steps > 0 and cfg.eval.prompts:
        grid = f"a grid of {len(cfg.eval.prompts)} prompts every {cfg.eval.every_steps} steps"
        lines.append(f"    samples/              {grid}")
    if posthoc_snapshots:
        snapshots = f"{posthoc_snapshots} post-hoc EMA snapshot{'s' if posthoc_snapshots != 1 else ''}"
        lines.append(f"    {POSTHOC_DIR}/              {snapshots} (then: sd-train posthoc --run {out})")
    if cfg.export_at_end:
        lines.append("    export/raw, export/ema  diffusers pipelines at the end (ema once the window opened)")
    if cfg.data.log_keys:
        lines.append("    keys/rank{R}.txt      every sample key consumed, per rank")
    sinks = [name for name, on in (("wandb", cfg.metrics.wandb), ("tensorboard", cfg.metrics.tensorboard)) if on]
    if sinks:
        lines.append(f"    {' and '.join(sinks)} logs beside metrics.jsonl")
    return lines


def memory_plan_for(cfg: TrainConfig, target: PlanTarget) -> MemoryPlan:
    """The memory plan of a resolved config at `target`: its device memory (`--gpu-memory-gib`,
    else this machine's GPU, else a CPU run) and host memory (`--host-memory-gib`, else this
    machine's). Unchecked: the caller prints it, then calls `check()`."""
    gib = lambda v: None if v is None else int(v * GIB)  # noqa: E731
    return startup_plan(
        cfg,
        target.world_size,
        estimate_now=True if target.estimate else None,
        device_memory=gib(target.gpu_memory_gib),
        host_memory=gib(target.host_memory_gib),
        ranks_per_node=target.ranks_per_node,
    )


def memory_lines(memory: Optional[MemoryPlan]) -> list[str]:
    """The memory plan's per-rank peaks, phase by phase (sd_train.memory.plan), or why there is none."""
    if memory is None:  # the model folder could not be sized (the warning above says why)
        return ["Memory plan: not made (see the warning above): nothing checked"]
    return memory.describe().splitlines()


def plan_lines(
    cfg: TrainConfig, target: PlanTarget, config_path: str, memory: Optional[MemoryPlan] = None
) -> list[str]:
    """The plan of a config that passed `validate` and `preflight` at `target.world_size`, with its
    memory plan (`memory_plan_for`) when there is one."""
    world = target.world_size
    accum = cfg.grad_accum_steps(world)
    d = cfg.dist
    strategy = d.strategy + (f" ZeRO-{d.zero_stage}" if d.strategy == "deepspeed" else "")
    if d.strategy == "fsdp2":
        group = d.shard_group_size or target.ranks_per_node
        if group < world:
            strategy += f", HSDP: {world // group} replicas x shard groups of {group}"
    nodes = "" if world <= target.ranks_per_node else f", {target.ranks_per_node} per node assumed"
    lines = [
        f"sd-train plan: {config_path} at world size {world} (from {target.world_size_from}{nodes})",
        f"  batch                 global {cfg.global_batch_size} = {world} rank{'s' if world != 1 else ''} "
        f"x micro-batch {cfg.micro_batch_size} x {accum} accumulation step{'s' if accum != 1 else ''}",
        f"  steps                 {cfg.max_steps} ({cfg.max_steps * cfg.global_batch_size} samples at "
        f"{cfg.data.resolution} px, data.mode={cfg.data.mode})",
        f"  sharding              {strategy}; params {d.param_dtype}, mixed_precision={cfg.mixed_precision}",
    ]
    posthoc = posthoc_plan_from_config(cfg.ema, cfg.max_steps)
    lines += _output_lines(cfg, len(posthoc.snapshot_steps()) if posthoc.enabled else 0)
    lines.append(plan_from_config(cfg.ema, cfg.max_steps).describe())
    if posthoc.enabled:
        params = unet_param_count(cfg.model.pretrained_path)
        if params is None:
            lines.append("Post-hoc EMA plan: (sizes unknown: no safetensors weights in the model's unet/)")
        else:
            lines.append(posthoc.describe(params, world))
    lines += memory_lines(memory)
    return lines
