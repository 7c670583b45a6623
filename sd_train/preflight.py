"""Machine checks of a run's config, after `TrainConfig.validate` and before any process group starts.

`TrainConfig.validate` judges field values alone; `preflight` judges the config against this
machine and this launch: the shards exist (and are enough for data.mode=epoch), the model and
checkpoint folders are there, the launcher agrees with `dist.strategy`, and the EMA plan is safe.
It returns the resolved config (`dist.strategy=auto` and `dist.zero_stage` made concrete) and never
changes the one it is given. Torch-free, so a refusal costs well under a second.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from sd_train.config import TrainConfig
from sd_train.config.launcher import read_launch_env, shard_group_size
from sd_train.data.buckets import bucket_set, downsampling_factor, pixel_factor
from sd_train.data.sources import Source, check_epoch_shard_count, expand_sources
from sd_train.ema.plan import plan_from_config, posthoc_plan_from_config
from sd_train.errors import ConfigError
from sd_train.folders import refusal
from sd_train.model.family import DEFAULT_FSDP_UNITS, Family, model_family
from sd_train.paths import (
    checkpoint_is_complete,
    complete_steps,
    incompatibility,
    is_export,
    step_dir,
)
from sd_train.rollback import resume_plan

log = logging.getLogger(__name__)


def preflight(cfg: TrainConfig, world_size: int, environ: Mapping[str, str] = os.environ) -> TrainConfig:
    """Check `cfg` against the machine and the launcher `environ`; return the resolved config.
    Raises ConfigError naming the field. Run after `cfg.validate(world_size)`."""
    d = cfg.data
    check_shards(
        "data.train_shards", d.train_shards, world_size, max(1, d.num_workers), d.mode == "epoch", d.allow_pipe
    )
    if d.val_shards:
        check_shards("data.val_shards", d.val_shards, 1, 1, False, d.allow_pipe)
    check_checkpoint_folders(cfg)
    family = model_family(cfg.model.pretrained_path)  # refuses a folder whose parts contradict its family
    resolved = resolve_fsdp_units(resolve_precision(resolve_strategy(cfg, environ)), family)
    check_resume(resolved, world_size)
    check_export_folders(resolved)
    check_shard_group(resolved, world_size, environ)
    check_deepspeed_knobs(resolved)
    if resolved.checkpoint.init_from and resolved.dist.strategy == "deepspeed":
        raise ConfigError(
            "checkpoint.init_from reads an FSDP2/DDP (DCP) checkpoint; under dist.strategy=deepspeed export the "
            "stage-1 checkpoint (`sd-train export --checkpoint DIR --weights raw`) and start from it with "
            "model.pretrained_path instead (weights only)"
        )
    check_vae_dtype(cfg, family)
    check_resolution_fits_vae(cfg.data.resolution, cfg.model.pretrained_path)
    if cfg.data.buckets != "none":  # ConfigError naming the data.buckets fields
        bucket_set(cfg.data, pixel_factor(cfg.model.pretrained_path))
    plan_from_config(cfg.ema, cfg.max_steps).check()
    posthoc_plan_from_config(cfg.ema, cfg.max_steps).check()
    return resolved


def resolve_precision(cfg: TrainConfig) -> TrainConfig:
    """`dist.param_dtype=auto`: bf16 params with `mixed_precision=bf16` under FSDP2 and DeepSpeed
    ZeRO-3 (DeepSpeed's bf16 mode), fp32 otherwise (the one bf16 policy per strategy, see
    TrainConfig.mixed_precision). Runs after `resolve_strategy`."""
    d = cfg.dist
    if d.param_dtype != "auto":
        return cfg
    bf16_params = d.strategy == "fsdp2" or (d.strategy == "deepspeed" and d.zero_stage == 3)
    dtype = "bf16" if cfg.mixed_precision == "bf16" and bf16_params else "fp32"
    return dataclasses.replace(cfg, dist=dataclasses.replace(d, param_dtype=dtype))


def resolve_fsdp_units(cfg: TrainConfig, family: Family) -> TrainConfig:
    """`dist.fsdp_units=auto`: the family's default under FSDP2 (`blocks` for SD 1.x/2.x, `layers`
    for SDXL, whose largest block is 1.21B params); `blocks`, the value that does not apply, under
    DDP and DeepSpeed (check_shard_group refuses anything else there)."""
    d = cfg.dist
    if d.fsdp_units != "auto":
        return cfg
    units = DEFAULT_FSDP_UNITS[family] if d.strategy == "fsdp2" else "blocks"
    return dataclasses.replace(cfg, dist=dataclasses.replace(d, fsdp_units=units))


def check_vae_dtype(cfg: TrainConfig, family: Family) -> None:
    """SDXL's VAE overflows in fp16: its decoder's activations exceed fp16's 65504 and come back
    as NaN (the reason diffusers' SDXL VAE config carries force_upcast, and why the community's
    fp16-fix VAE exists)."""
    if family == "sdxl" and cfg.model.vae_dtype == "fp16":
        raise ConfigError(
            "model.vae_dtype=fp16 with an SDXL folder: the SDXL VAE produces NaNs in fp16 (its activations "
            "overflow fp16's range; diffusers marks it force_upcast). Use model.vae_dtype=bf16 or fp32 (or auto)"
        )


def check_shards(
    name: str, spec: str, world_size: int, workers: int, epoch_mode: bool, allow_pipe: bool = False
) -> None:
    """Every source of the `name` spec matches at least one shard; in epoch mode each source has
    a shard for every one of the world_size x workers readers. A `pipe:` URL, in the spec or in a
    list file it names, only with `allow_pipe` (`data.allow_pipe`)."""
    try:
        sources = expand_sources(spec, allow_pipe)
    except ValueError as e:
        raise ConfigError(f"{name}={spec!r}: {e}") from e
    for src in sources:
        if not src.urls:
            raise ConfigError(
                f"{name}={spec!r}: pattern {src.pattern!r} matches no shard. Check the path, or run `make data`"
            )
        warn_missing_shards(name, src)
        if epoch_mode:
            check_epoch_shard_count(name, src, world_size, workers)


def warn_missing_shards(name: str, src: Source) -> None:
    """A brace range that only partly exists (`train-{000000..000009}.tar` with 8 shards there) is
    allowed, since a download may have lost a few shards, which are then skipped and counted as bad
    input; but a range one past the end is as likely a typo, so the plan names what is missing."""
    missing = [u for u in src.urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
    if not missing:
        return
    shown = ", ".join(Path(u).name for u in missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    log.warning(
        f"{name}: {len(missing)} of the {len(src.urls)} shards {src.pattern!r} names are missing: {shown}. They will "
        "be skipped and counted as bad input (data/bad_shards); if the range is a typo, fix it"
    )


def vae_downsampling_factor(model_path: str) -> int:
    """The VAE's pixels-per-latent factor, 2 ** (len(block_out_channels) - 1) as diffusers builds an
    AutoencoderKL (every encoder block but the last halves the image): 8 for SD's VAE, 2 for the
    tiny demo one. Read from `<model_path>/vae/config.json`; ConfigError if it is missing or unreadable."""
    return downsampling_factor(model_path, "vae")


def check_resolution_fits_vae(resolution: int, model_path: str) -> None:
    """`data.resolution` is a multiple of the model's VAE downsampling factor, so that a latent
    pixel covers a whole block of image pixels and decode(encode(x)) has x's size."""
    factor = vae_downsampling_factor(model_path)
    if resolution % factor:
        lower = max(factor, resolution // factor * factor)
        raise ConfigError(
            f"data.resolution={resolution} must be a multiple of {factor}, the downsampling factor of the VAE in "
            f"model.pretrained_path={model_path!r} (2**(len(block_out_channels)-1) from vae/config.json): use "
            f"data.resolution={lower} or {lower + factor}"
        )


def check_checkpoint_folders(cfg: TrainConfig) -> None:
    """`checkpoint.resume` (a path) and `checkpoint.load_step` name complete checkpoint folders."""
    c = cfg.checkpoint
    if c.resume not in ("auto", "none"):
        if not Path(c.resume).is_dir():
            raise ConfigError(
                f"checkpoint.resume={c.resume!r}: no such checkpoint folder. Use auto, none, or an existing step folder"
            )
        if not checkpoint_is_complete(Path(c.resume)):
            raise ConfigError(
                f"checkpoint.resume={c.resume!r} is not a complete checkpoint (no .metadata or zero/, or "
                "no trainer_state.json)"
            )
    if c.resume == "none" and complete_steps(Path(cfg.output_dir) / "checkpoints"):
        raise ConfigError(
            f"checkpoint.resume=none but {Path(cfg.output_dir) / 'checkpoints'} holds checkpoints: use a new "
            "output_dir, or resume=auto"
        )
    if c.load_step is not None:
        want = step_dir(Path(cfg.output_dir) / "checkpoints", c.load_step)
        # A relaunch of a rollback continues its branch, even once retention has deleted `want`.
        if resume_plan(cfg.output_dir, c.resume, c.load_step).branch_from and not checkpoint_is_complete(want):
            raise ConfigError(f"checkpoint.load_step={c.load_step}: no complete checkpoint at {want}")
    if c.init_from:
        folder = Path(c.init_from)
        if not checkpoint_is_complete(folder) or not (folder / ".metadata").is_file():
            raise ConfigError(
                f"checkpoint.init_from={c.init_from!r} is not a complete FSDP2/DDP checkpoint step folder (it needs "
                "trainer_state.json and DCP's .metadata): point it at <stage-1 output_dir>/checkpoints/step_NNNNNNNN"
            )
        if c.resume not in ("auto",):
            raise ConfigError(
                f"checkpoint.init_from is set together with checkpoint.resume={c.resume!r}: init_from starts a new run "
                "(it applies only while this output_dir has no checkpoint), so leave checkpoint.resume=auto"
            )


def check_resume(cfg: TrainConfig, world_size: int) -> None:
    """The checkpoint a resume would load first is one this run can read: same backend (and, under
    DeepSpeed, the same world size), and the same post-hoc EMA settings. Refused here, before the
    launch writes anything into output_dir; a folder whose trainer_state.json is unreadable is left
    to the load, which reports it and falls back."""
    c = cfg.checkpoint
    first = next(
        (f for f in resume_plan(cfg.output_dir, c.resume, c.load_step).candidates if checkpoint_is_complete(f)), None
    )
    if first is None:
        return
    try:
        saved = json.loads((first / "trainer_state.json").read_text())
        int(saved["world_size"])  # as the load reads it: without it the folder is unreadable, not refused
        problem = incompatibility(first, saved, "zero" if cfg.dist.strategy == "deepspeed" else "dcp", world_size)
    except (OSError, ValueError, KeyError, TypeError):
        return
    if problem is not None:
        raise ConfigError(problem)
    posthoc = posthoc_plan_from_config(cfg.ema, cfg.max_steps)
    if posthoc.enabled:
        kept = saved.get("posthoc")
        if kept is None:
            raise ConfigError(
                f"{first} was written without post-hoc EMA profiles (ema.posthoc.sigma_rels was empty) and this run "
                "has them: resume with ema.posthoc.sigma_rels=[], or start a new run"
            )
        if list(kept["sigma_rels"]) != list(posthoc.sigma_rels) or kept["step_start"] != posthoc.step_start:
            raise ConfigError(
                f"{first} tracked post-hoc profiles sigma_rels={kept['sigma_rels']} from step {kept['step_start']}, "
                f"this run has ema.posthoc.sigma_rels={posthoc.sigma_rels} from step {posthoc.step_start}: resume "
                "with the same ema.posthoc settings"
            )


def check_export_folders(cfg: TrainConfig) -> None:
    """With `export_at_end`, the run's export folders are missing, empty or earlier exports: the
    export at the end replaces nothing else, and it is better refused now than after training."""
    if not cfg.export_at_end:
        return
    for kind in ("raw", "ema"):
        folder = Path(cfg.output_dir) / "export" / kind
        if not is_export(folder):
            problem = refusal(folder, "an earlier export", "move it away, or set export_at_end=false")
            if problem is not None:
                raise ConfigError(f"export_at_end: {problem}")


def check_shard_group(cfg: TrainConfig, world_size: int, environ: Mapping[str, str]) -> None:
    """`dist.shard_group_size` (default: one node) divides the world, and applies to FSDP2 only."""
    d = cfg.dist
    if d.strategy != "fsdp2":
        for name, defaults in (("fsdp_units", ("auto", "blocks")), ("prefetch", (0,))):
            if getattr(d, name) not in defaults:
                raise ConfigError(
                    f"dist.{name}={getattr(d, name)} applies to dist.strategy=fsdp2 only (now {d.strategy}): remove it"
                )
        if d.shard_group_size is not None:
            raise ConfigError(
                f"dist.shard_group_size={d.shard_group_size} applies to dist.strategy=fsdp2 only (now {d.strategy}): "
                "remove it"
            )
        if not isinstance(d.reshard_after_forward, bool):
            raise ConfigError(
                f"dist.reshard_after_forward={d.reshard_after_forward} (a group size) applies to dist.strategy=fsdp2 "
                f"only (now {d.strategy}): remove it"
            )
        return
    shard = shard_group_size(d.shard_group_size, read_launch_env(environ))
    if shard > world_size or world_size % shard:
        raise ConfigError(
            f"dist.shard_group_size={shard} must divide the world size {world_size} (the mesh is replicas x shard "
            f"group): set it to the ranks per node, to {world_size} for FSDP over every rank, or to a divisor of "
            f"{world_size}"
        )
    n = d.reshard_after_forward
    if not isinstance(n, bool) and (n >= shard or shard % n):
        divisors = [k for k in range(2, shard) if shard % k == 0]
        raise ConfigError(
            f"dist.reshard_after_forward={n} must divide the shard group size {shard} and be smaller than it "
            f"(FSDP2 reshards each block over groups of that many ranks after forward): "
            + (f"use one of {divisors}, " if divisors else "")
            + "or true (reshard over all of the shard group) or false (keep the gathered params)"
        )


DEEPSPEED_KNOBS = {  # field -> the ZeRO stages it applies to
    "zero_overlap_comm": (2, 3),
    "zero_reduce_bucket_size": (2, 3),
    "zero_allgather_bucket_size": (2,),
    "zero_prefetch_bucket_size": (3,),
    "zero_param_persistence_threshold": (3,),
}


def check_deepspeed_knobs(cfg: TrainConfig) -> None:
    """The `dist.zero_*` knobs are set only where DeepSpeed at that stage reads them."""
    d = cfg.dist
    for name, stages in DEEPSPEED_KNOBS.items():
        if getattr(d, name) is None:
            continue
        if d.strategy != "deepspeed" or d.zero_stage not in stages:
            where = f"dist.strategy=deepspeed with dist.zero_stage in {list(stages)}"
            now = f"dist.strategy={d.strategy}" + (f", zero_stage {d.zero_stage}" if d.strategy == "deepspeed" else "")
            raise ConfigError(f"dist.{name} applies only to {where} (now {now}): remove it")


def resolve_strategy(cfg: TrainConfig, environ: Mapping[str, str]) -> TrainConfig:
    """Resolve `dist.strategy=auto` and `dist.zero_stage` against the launcher, and refuse what
    DeepSpeed cannot do here. `accelerate launch` with a DeepSpeed config exports
    ACCELERATE_USE_DEEPSPEED and ACCELERATE_DEEPSPEED_ZERO_STAGE; the sd-train config must agree
    with them, because a launcher that says ZeRO-3 while the run shards with FSDP2 is a mistake
    worth stopping for. Returns a new config; a resolved config resolves to itself."""
    d = cfg.dist
    launched_ds = environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    launch_stage = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    strategy = d.strategy
    if strategy == "auto":
        strategy = "deepspeed" if launched_ds else "fsdp2"
    if launched_ds and strategy != "deepspeed":
        raise ConfigError(
            f"dist.strategy={strategy} but `accelerate launch` was given a DeepSpeed config (ZeRO stage "
            f"{launch_stage}): set dist.strategy=deepspeed (or auto), or launch with launch/accelerate/cpu2.yaml, "
            "gpu1node.yaml or multinode.yaml for FSDP2"
        )
    zero_stage = d.zero_stage
    if strategy != "deepspeed":
        if zero_stage is not None:
            raise ConfigError(
                f"dist.zero_stage={zero_stage} applies only to dist.strategy=deepspeed (now {strategy}); remove it"
            )
        return dataclasses.replace(cfg, dist=dataclasses.replace(d, strategy=strategy))
    if zero_stage is None:
        zero_stage = int(launch_stage) if launch_stage and launch_stage.isdigit() else 3
    if zero_stage not in (2, 3):
        raise ConfigError(f"dist.zero_stage={zero_stage}: sd-train supports ZeRO stage 2 or 3")
    if launched_ds and launch_stage and launch_stage.isdigit() and int(launch_stage) != zero_stage:
        raise ConfigError(
            f"dist.zero_stage={zero_stage} but the accelerate launch config says zero_stage {launch_stage}: "
            f"make them agree (use launch/accelerate/zero{zero_stage}.yaml, or drop dist.zero_stage)"
        )
    # find_spec, not import: deepspeed pulls in torch, which the startup checks must not pay for.
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "dist.strategy=deepspeed but the deepspeed package is not installed: "
            "pip install -c constraints.txt deepspeed==0.19.8 (it is in requirements.txt; `make venv`)"
        )
    if cfg.checkpoint.async_save is True:  # `auto` resolves to synchronous saves under DeepSpeed
        raise ConfigError(
            "checkpoint.async_save=true is FSDP2-only (DCP async_save); DeepSpeed writes its "
            "checkpoints synchronously: set checkpoint.async_save=false"
        )
    if d.reduce_dtype != "fp32":
        raise ConfigError(
            f"dist.reduce_dtype={d.reduce_dtype} is an FSDP2 setting; DeepSpeed reduces gradients in the "
            "params' dtype: remove it"
        )
    if d.param_dtype == "bf16" and zero_stage != 3:
        # ZeRO-2's fp32 master partition is a slice of one flat buffer that cuts through
        # parameters, while its bf16 params are replicated: an EMA of the fp32 master would need a
        # gather per update, and an EMA of the bf16 params loses 1 - decay below bf16's resolution.
        raise ConfigError(
            "dist.param_dtype=bf16 under DeepSpeed is its bf16 mode, which sd-train runs with ZeRO-3 only "
            "(the EMA reads the fp32 master partitions): use dist.zero_stage=3 (launch/accelerate/zero3.yaml), or "
            "dist.param_dtype=fp32 (or auto) for ZeRO-2 with mixed_precision=bf16 autocasting over fp32 params"
        )
    return dataclasses.replace(cfg, dist=dataclasses.replace(d, strategy=strategy, zero_stage=zero_stage))
