"""`memory_plan(cfg, world_size, device_memory)`: the MemoryPlan of a resolved config (see
sd_train.memory.plan for what it holds and how each figure is obtained), and the fixes a refusal
names. Torch-free.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Literal, Optional, Union

from sd_train.config import TrainConfig
from sd_train.config.launcher import LaunchEnv, shard_group_size
from sd_train.data.workers import worker_start_method
from sd_train.ema.plan import resolve_step_start
from sd_train.memory.plan import CUDA_RESERVE, GIB, Item, Limits, MemoryPlan, Phase, gib
from sd_train.memory.record import StepEstimate, cached_estimate, estimate_key
from sd_train.memory.sizes import ModelSizes, UnsizedModel, read_model_sizes

# Step-estimate categories (FSDPMemTracker's names) -> plan items
STEP_ITEMS = {
    "sharded params": ("Sharded Param",),
    "gradients": ("Sharded Grad", "Unsharded Grad"),
    "optimizer state": ("OptState",),
    "gathered units": ("Unsharded Param", "All Gather"),
    "activations": ("Activation",),
    "backward temporaries": ("Temp",),
    "reduce-scatter buffers": ("Reduce Scatter",),
    "inputs and buffers": ("Inputs", "Buffer"),
}
STATE_CATEGORIES = ("Sharded Param", "Sharded Grad", "OptState")
BATCH_CATEGORIES = ("Activation", "Temp", "Inputs")

# What a rank holds beyond the imported runtime and its tensors: the process group, the loader's
# iterator and queues, the evaluation's fixed inputs, the autograd graph's and FSDP's Python
# objects, allocator slack. Measured on the 2-rank test run of the 1.7M-param tiny UNet (CPU,
# glibc mmap threshold 1 MiB): a peak RSS of 477 MiB, 362 MiB of it the imported runtime and 39 MiB
# tensors at the peak (FSDPMemTracker + EMA + frozen encoders). bench/bench_memory_plan.py checks it.
RANK_OVERHEAD = 76 * 2**20

EstimateArg = Union[StepEstimate, None, Literal["cached"]]


@dataclass
class StateSizes:
    """Per-rank model-state bytes under the run's strategy (closed forms of the parameter count)."""

    params: int
    grads: int
    optimizer: int
    ema: int
    posthoc: int
    swap_backup: int
    note: str


def model_states(cfg: TrainConfig, numel: int, world_size: int, shard_size: int) -> StateSizes:
    """fp32 master params, gradients and AdamW moments, the fp32 EMA and post-hoc shadows, per rank."""
    d = cfg.dist
    k = len(cfg.ema.posthoc.sigma_rels)
    adam = 2 if cfg.optim.name == "adamw" else 0  # SGD here has no momentum: no state
    if d.strategy == "fsdp2":
        s = shard_size
        params, grads, opt, shadow = 4 * numel // s, 4 * numel // s, adam * 4 * numel // s, 4 * numel // s
        note = f"fp32, 1/{s} of {numel:,} params"
    elif d.strategy == "ddp":
        # DDP keeps its gradient buckets beside .grad (gradient_as_bucket_view is off).
        params, grads, opt, shadow = 4 * numel, 8 * numel, adam * 4 * numel, 4 * numel
        note = f"fp32, {numel:,} params replicated; gradients x2 (DDP's buckets)"
    else:  # DeepSpeed's own formula: fp32 master partition + Adam moments (buckets not counted)
        w = world_size
        pd = 2 if d.param_dtype == "bf16" else 4
        if d.zero_stage == 3:
            params, grads, shadow = pd * numel // w, pd * numel // w, 4 * numel // w
        else:
            params, grads, shadow = 4 * numel, 4 * numel // w, 4 * numel
        opt = (4 + adam * 4) * numel // w
        note = f"DeepSpeed ZeRO-{d.zero_stage}: fp32 master + moments over {w} ranks (buckets not counted)"
    ema = shadow if cfg.ema.enabled else 0
    # The EMA swap trades values with the pieces the forward reads; only DeepSpeed's bf16 mode
    # (forward from bf16 partitions, fp32 EMA) copies those pieces first (sd_train.ema.sharded).
    bf16_mode = d.strategy == "deepspeed" and d.param_dtype == "bf16"
    backup = params if cfg.ema.enabled and cfg.eval.every_steps and bf16_mode else 0
    return StateSizes(params, grads, opt, ema, k * shadow, backup, note)


def gathered_note(cfg: TrainConfig, sizes: ModelSizes) -> str:
    """The closed form beside the tracker's figure: the largest unit, gathered in the params' dtype,
    times the units held at once (one, plus `dist.prefetch` ahead)."""
    name, n = sizes.largest_unit
    pd = 2 if cfg.dist.param_dtype == "bf16" else 4
    held = 1 + cfg.dist.prefetch
    return f"largest unit {name}: {n:,} params, {gib(n * pd)} gathered, x {held} with prefetch {cfg.dist.prefetch}"


def step_items(estimate: Optional[StepEstimate], states: StateSizes, fsdp: bool, gathered: str = "") -> list[Item]:
    """The training step's peak, item by item: FSDPMemTracker's snapshot at the peak. ddp and
    DeepSpeed are estimated as one unsharded replica, so their model states are the closed form's."""
    if estimate is None:
        return [
            Item("sharded params", states.params, states.note),
            Item("gradients", states.grads),
            Item("optimizer state", states.optimizer),
            Item("activations and gathered units", 0, "not estimated: a lower bound"),
        ]
    closed = {"sharded params": states.params, "gradients": states.grads, "optimizer state": states.optimizer}
    items = []
    for name, cats in STEP_ITEMS.items():
        value = int(sum(estimate.step.get(c, 0) for c in cats))
        if not fsdp and name in closed and (value or name != "gradients"):
            value = closed[name]
        note = {"sharded params": states.note, "gathered units": gathered}.get(name, "")
        items.append(Item(name, value, note))
    return items


def frozen_items(cfg: TrainConfig, sizes: ModelSizes) -> list[Item]:
    """The frozen encoders resident while training runs: the text encoder(s) in bf16 with
    mixed_precision=bf16 (else fp32), the VAE in `model.vae_dtype` (auto: the same)."""
    fb = 2 if cfg.mixed_precision == "bf16" else 4
    vb = {"fp32": 4, "bf16": 2, "fp16": 2}.get(cfg.model.vae_dtype, fb)
    sampling = bool(cfg.eval.every_steps and cfg.eval.prompts)
    out = []
    if not cfg.data.precomputed:
        out.append(Item("frozen text encoder(s)", fb * sizes.text_encoder_numel))
    if not cfg.data.precomputed or sampling:
        out.append(Item("frozen VAE", vb * sizes.vae_numel, "decodes the sample grids" if cfg.data.precomputed else ""))
    return out


def build_phases(
    cfg: TrainConfig,
    sizes: ModelSizes,
    estimate: Optional[StepEstimate],
    world_size: int,
    shard_size: int,
    async_save: bool,
    cpu: bool,
) -> tuple[list[Phase], int]:
    """The phases of the run, and the async staging bytes per rank."""
    p = sizes.unet_numel
    st = model_states(cfg, p, world_size, shard_size)
    runtime = Item(
        "runtime",
        estimate.runtime_rss + RANK_OVERHEAD if estimate else 0,
        "interpreter, torch, diffusers (measured) + process group, loader, evaluation state"
        if estimate
        else "not measured without an estimate",
    )
    cuda = [] if cpu else [Item("CUDA context and NCCL", CUDA_RESERVE, "assumed, not measured")]
    frozen = frozen_items(cfg, sizes)
    staging = st.params + st.optimizer + st.ema + st.posthoc if async_save else 0
    staged = [Item("async-save staging", staging, "a copy of the rank's state, kept for the run")] if staging else []
    # DCP's stager allocates the copy at the first async save and keeps it for the run. A run whose
    # only save is its last step (after the evaluation, the gradients freed) never trains beside it.
    c = cfg.checkpoint
    staged_in_steps = bool(staged) and (c.every_minutes > 0 or c.every_steps < cfg.max_steps)
    host = [runtime, *(staged if staged_in_steps else [])]
    fsdp = cfg.dist.strategy == "fsdp2"
    step = [*step_items(estimate, st, fsdp, gathered_note(cfg, sizes) if fsdp else ""), *frozen, *cuda]
    if not cfg.data.precomputed and estimate is not None and estimate.encode_transient:
        step.append(Item("online encoding", 0, f"{gib(estimate.encode_transient)} before the forward, not at the peak"))
    window = []
    if st.ema:
        window.append(Item("EMA", st.ema, f"from step {resolve_step_start(cfg.ema, cfg.max_steps)}"))
    if st.posthoc:
        window.append(Item("post-hoc profiles", st.posthoc, f"{len(cfg.ema.posthoc.sigma_rels)} x the EMA's size"))
    file_pages = sizes.unet_file_bytes if cfg.model.init_unet == "pretrained" else 0
    load_host = [runtime, *([Item("weight file pages", file_pages, "safetensors, read")] if file_pages else [])]
    if not cpu:
        load_host.append(Item("whole UNet, host copy", 4 * p, "loaded on the host, then moved"))
    phases = [
        Phase(
            "model load",
            "load",
            [Item("whole UNet", 4 * p, "on every rank, before it is sharded"), Item("first shards", st.params), *cuda],
            load_host,
        ),
        Phase("training step", "step", step, host),
    ]
    if window:
        phases.append(Phase("training step, EMA window open", "step+EMA", [*step, *window], host))
    states = [Item("sharded params", st.params), Item("optimizer state", st.optimizer), *window]
    if cfg.eval.every_steps:
        phases.append(eval_phase(estimate, st, states, [*frozen, *cuda], host))
    if staged and not staged_in_steps:
        phases.append(
            Phase("last save (its async staging copy)", "save", [*states, *frozen, *cuda], [runtime, *staged])
        )
    if cfg.export_at_end:
        export = [
            runtime,
            Item("whole UNet", 4 * p, "read from the final checkpoint, one UNet at a time"),
            Item("pipeline's VAE and text encoder(s)", 4 * (sizes.vae_numel + sizes.text_encoder_numel)),
        ]
        phases.append(Phase("export (rank 0, after training)", "export", [], export, rank0_only=True))
    return phases, staging


def eval_phase(
    estimate: Optional[StepEstimate], st: StateSizes, states: list[Item], resident: list[Item], host: list[Item]
) -> Phase:
    """The evaluation: the model states and shadows (no gradients: freed after the optimizer
    step), the larger of the no-grad forward and the VAE decode, the frozen encoders."""
    transient = max(estimate.eval_transient, estimate.decode_transient) if estimate else 0
    backup = (
        [Item("EMA swap copy", st.swap_backup, "raw pieces, while the EMA is swapped in")] if st.swap_backup else []
    )
    forward = Item("forward or VAE decode", transient, "no grad, the larger" if estimate else "not estimated")
    return Phase("evaluation", "eval", [*states, *backup, forward, *resident], host)


def worker_item(
    cfg: TrainConfig, sizes: ModelSizes, estimate: Optional[StepEstimate], world_size: int, shard_size: int
) -> Item:
    """The loader workers of one rank: from a forkserver, each holds the runtime of the data modules
    (measured); forked, each comes to hold its own copy of what the rank held when they started
    (its runtime, its UNet shard and frozen encoders), since the rank rewrites those pages."""
    n = cfg.data.num_workers
    st = model_states(cfg, sizes.unet_numel, world_size, shard_size)
    method = worker_start_method(cfg.data.worker_start, st.params)
    if method == "forkserver":
        server, per = (estimate.worker_server_anon, estimate.worker_uss) if estimate else (0, 0)
        note = f"forkserver {gib(server)} + {n} x {gib(per)} (measured on a probe loader): no copy of the model"
        return Item("loader workers", server + n * per if n else 0, note)
    frozen = sum(i.bytes for i in frozen_items(cfg, sizes))
    per = (estimate.runtime_rss if estimate else 0) + st.params + frozen
    return Item("loader workers", n * per, f"{n} x {gib(per)}, forked: each keeps a copy of the rank at its start")


# ---- the machine ----------------------------------------------------------------------------------


def host_memory_bytes() -> Optional[int]:
    """MemTotal of /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gpu_memory_bytes(backend: str) -> Optional[int]:
    """The smallest visible GPU's memory from nvidia-smi (torch-free), or None for a CPU run: no
    nvidia-smi, no GPU, or `dist.backend=gloo`."""
    if backend == "gloo" or shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    mib = [int(v) for v in out if v.strip().isdigit()]
    if visible:
        ids = [int(i) for i in visible.split(",") if i.strip().isdigit()]
        mib = [mib[i] for i in ids if i < len(mib)] or mib
    return min(mib) * 2**20 if mib else None


# ---- the plan -------------------------------------------------------------------------------------


def plan_shard_size(cfg: TrainConfig, world_size: int, ranks_per_node: int) -> int:
    """Ranks that shard the UNet: `dist.shard_group_size`, else one node's ranks (FSDP2); 1 for
    ddp; the world for DeepSpeed."""
    if cfg.dist.strategy == "fsdp2":
        return min(
            world_size,
            shard_group_size(
                cfg.dist.shard_group_size, LaunchEnv(0, world_size, 0, "plan", local_world_size=ranks_per_node)
            ),
        )
    return 1 if cfg.dist.strategy == "ddp" else world_size


def memory_plan(
    cfg: TrainConfig,
    world_size: int,
    device_memory: Optional[int] = None,
    *,
    host_memory: Optional[int] = None,
    ranks_per_node: Optional[int] = None,
    estimate: EstimateArg = "cached",
    sizes: Optional[ModelSizes] = None,
) -> MemoryPlan:
    """The memory plan of `cfg` (resolved by sd_train.preflight) on `world_size` ranks.

    `device_memory`: bytes of one GPU, or None for a CPU run (the device is the host). `host_memory`:
    bytes of one node (default: this machine's MemTotal). `ranks_per_node`: default
    min(world_size, 8). `estimate`: the step estimate to use; "cached" looks it up (None if there is
    none, which makes the plan a lower bound). `checkpoint.async_save=auto` is decided here: async
    when the plan fits with the staging copy. Raises UnsizedModel (a ConfigError) when the model
    folder cannot be sized."""
    if "auto" in (cfg.dist.strategy, cfg.dist.param_dtype, cfg.dist.fsdp_units):
        raise ValueError("memory_plan needs a resolved config (sd_train.preflight.preflight)")
    rpn = ranks_per_node or min(world_size, 8)
    shard = plan_shard_size(cfg, world_size, rpn)
    if estimate == "cached":
        estimate = cached_estimate(estimate_key(cfg, world_size, shard))
    if sizes is None:
        try:
            sizes = read_model_sizes(cfg.model.pretrained_path, cfg.dist.fsdp_units)
        except UnsizedModel:
            if estimate is None or not estimate.sizes:
                raise
            sizes = ModelSizes(**estimate.sizes).regroup(cfg.dist.fsdp_units)
    cpu = device_memory is None
    host = host_memory if host_memory is not None else host_memory_bytes()
    budget = cfg.dist.memory_budget_gb
    limits = Limits(
        device=device_memory,
        device_source="GPU's memory" if device_memory else "",
        host=host,
        host_source="host memory" + (" (MemTotal)" if host_memory is None else ""),
        ranks_per_node=rpn,
        budget=int(budget * GIB) if budget is not None else None,
    )
    mode = cfg.checkpoint.async_save

    def make(async_save: bool) -> MemoryPlan:
        phases, staging = build_phases(cfg, sizes, estimate, world_size, shard, async_save, cpu)
        workers = worker_item(cfg, sizes, estimate, world_size, shard)
        return MemoryPlan(world_size, shard, cpu, phases, workers, limits, estimate, async_save, staging)

    plan = make(mode is True or (mode == "auto" and cfg.dist.strategy != "deepspeed"))
    if mode == "auto" and plan.async_save and plan.overages():
        sync = make(False)
        sync.notes.append(
            f"checkpoint.async_save=auto: synchronous saves, the async staging copy ({gib(plan.staging)} per rank) "
            "would not fit"
        )
        plan = sync
    elif mode == "auto" and plan.async_save:
        plan.notes.append(f"checkpoint.async_save=auto: async saves (staging {gib(plan.staging)} per rank fits)")
    if estimate is None:
        plan.notes.append(
            "the step was not estimated (no cached estimate for this configuration): the peaks are lower bounds; "
            "`sd-train plan --estimate` (or dist.memory_check=estimate) estimates it on fake tensors"
        )
    else:
        plan.notes.append(
            f"step estimate: FSDPMemTracker on fake tensors, {estimate.seconds:.0f} s, "
            f"{estimate.cached_at or 'not cached'}"
        )
    plan.fix_finder = lambda p: find_fixes(cfg, p, world_size, device_memory, host_memory, rpn, sizes)
    return plan


# ---- fixes ---------------------------------------------------------------------------------------


def scaled(estimate: Optional[StepEstimate], batch: float = 1.0, states: float = 1.0) -> Optional[StepEstimate]:
    """The estimate with its batch-proportional categories (activations, temporaries, inputs)
    scaled by `batch` and its model states by `states`: every op of the step is batch-parallel, so
    activations are proportional to the micro-batch."""
    if estimate is None:
        return None
    step = dict(estimate.step)
    for cats, factor in ((BATCH_CATEGORIES, batch), (STATE_CATEGORIES, states)):
        for c in cats:
            if c in step:
                new = int(step[c] * factor)
                step["Total"] = step.get("Total", 0) + new - step[c]
                step[c] = new
    return dataclasses.replace(estimate, step=step, encode_transient=int(estimate.encode_transient * batch))


def _with(cfg: TrainConfig, section: str, **changes) -> TrainConfig:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


def find_fixes(
    cfg: TrainConfig,
    plan: MemoryPlan,
    world_size: int,
    device_memory: Optional[int],
    host_memory: Optional[int],
    rpn: int,
    sizes: ModelSizes,
) -> list[str]:
    """Single config changes after which the plan fits, each with its peak. Micro-batches are sized
    by scaling the estimate's activations; gradient checkpointing and resharding by their own
    cached estimates where those exist, else named without a figure."""

    def replan(alt: TrainConfig, est: EstimateArg, world: int = world_size) -> MemoryPlan:
        return memory_plan(
            alt, world, device_memory, host_memory=host_memory, ranks_per_node=rpn, estimate=est, sizes=sizes
        )

    def fits(alt: TrainConfig, est: EstimateArg, world: int = world_size) -> Optional[str]:
        p = replan(alt, est, world)
        return None if p.overages() else gib(p.device_peak()[0])

    out = []
    m = cfg.micro_batch_size
    for k in [m // 2**i for i in range(1, m.bit_length()) if m % 2**i == 0]:
        peak = fits(dataclasses.replace(cfg, micro_batch_size=k), scaled(plan.estimate, batch=k / m))
        if peak:
            out.append(f"micro_batch_size={k} (gradient accumulation x{m // k}; peak {peak}, activations scaled)")
            break
    d = cfg.dist
    for label, alt in (
        ("model.gradient_checkpointing=true", _with(cfg, "model", gradient_checkpointing=True)),
        ("dist.reshard_after_forward=true", _with(cfg, "dist", reshard_after_forward=True)),
    ):
        if alt == cfg or (label.startswith("dist.") and d.strategy != "fsdp2"):
            continue
        alt_plan = replan(alt, "cached")
        if alt_plan.complete and not alt_plan.overages():
            out.append(f"{label} (peak {gib(alt_plan.device_peak()[0])})")
        elif not alt_plan.complete and plan.complete:
            out.append(f"{label} (not sized: `sd-train plan --estimate ... {label}` estimates it)")
    if plan.async_save:
        peak = fits(_with(cfg, "checkpoint", async_save=False), plan.estimate)
        if peak:
            out.append(f"checkpoint.async_save=false (frees the {gib(plan.staging)} staging copy; peak {peak})")
    if cfg.ema.posthoc.sigma_rels:
        alt = _with(cfg, "ema", posthoc=dataclasses.replace(cfg.ema.posthoc, sigma_rels=[]))
        peak = fits(alt, plan.estimate)
        if peak:
            out.append(f"ema.posthoc.sigma_rels=[] (no post-hoc profiles; peak {peak})")
    if d.strategy == "fsdp2":
        # More GPUs sharding the UNet: model states shrink with the shard group; the step's own
        # transients (gathered units, activations) do not depend on it.
        for factor in (2, 4, 8, 16):
            s = plan.shard_size * factor
            alt = _with(cfg, "dist", shard_group_size=s)
            peak = fits(alt, scaled(plan.estimate, states=1 / factor), world_size * factor)
            if peak:
                out.append(f"{s} ranks sharding the UNet (more GPUs or nodes, dist.shard_group_size={s}; peak {peak})")
                break
    return out
