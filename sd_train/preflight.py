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
import os
from collections.abc import Mapping
from pathlib import Path

from sd_train.config import TrainConfig
from sd_train.data.sources import check_epoch_shard_count, expand_sources
from sd_train.ema_plan import plan_from_config, posthoc_plan_from_config
from sd_train.errors import ConfigError
from sd_train.paths import check_model_folder, checkpoint_is_complete, step_dir


def preflight(cfg: TrainConfig, world_size: int, environ: Mapping[str, str] = os.environ) -> TrainConfig:
    """Check `cfg` against the machine and the launcher `environ`; return the resolved config.
    Raises ConfigError naming the field. Run after `cfg.validate(world_size)`."""
    d = cfg.data
    check_shards("data.train_shards", d.train_shards, world_size, max(1, d.num_workers), d.mode == "epoch")
    if d.val_shards:
        check_shards("data.val_shards", d.val_shards, 1, 1, False)
    check_checkpoint_folders(cfg)
    resolved = resolve_strategy(cfg, environ)
    check_model_folder(cfg.model.pretrained_path)
    plan_from_config(cfg.ema, cfg.max_steps).check()
    posthoc_plan_from_config(cfg.ema, cfg.max_steps).check()
    if cfg.ema.posthoc.sigma_rels and resolved.dist.strategy == "deepspeed":
        raise ConfigError(
            f"ema.posthoc.sigma_rels={cfg.ema.posthoc.sigma_rels} with dist.strategy=deepspeed: post-hoc EMA is built "
            "for FSDP2 and DDP only (not yet for DeepSpeed's per-partition files). Use dist.strategy=fsdp2, or set "
            "ema.posthoc.sigma_rels=[]"
        )
    return resolved


def check_shards(name: str, spec: str, world_size: int, workers: int, epoch_mode: bool) -> None:
    """Every source of the `name` spec matches at least one shard; in epoch mode each source has
    a shard for every one of the world_size x workers readers."""
    try:
        sources = expand_sources(spec)
    except ValueError as e:
        raise ConfigError(f"{name}={spec!r}: {e}") from e
    for src in sources:
        if not src.urls:
            raise ConfigError(
                f"{name}={spec!r}: pattern {src.pattern!r} matches no shard. Check the path, or run `make data`"
            )
        if epoch_mode:
            check_epoch_shard_count(name, src, world_size, workers)


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
    if c.load_step is not None:
        want = step_dir(Path(cfg.output_dir) / "checkpoints", c.load_step)
        if not checkpoint_is_complete(want):
            raise ConfigError(f"checkpoint.load_step={c.load_step}: no complete checkpoint at {want}")


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
    if cfg.checkpoint.async_save:
        raise ConfigError(
            "checkpoint.async_save=true is FSDP2-only (DCP async_save); DeepSpeed writes its "
            "checkpoints synchronously: set checkpoint.async_save=false"
        )
    if d.param_dtype != "fp32" or d.reduce_dtype != "fp32":
        raise ConfigError(
            f"dist.param_dtype={d.param_dtype} / dist.reduce_dtype={d.reduce_dtype} are FSDP2 settings; "
            "under DeepSpeed "
            "the UNet's params stay fp32 (the EMA and optimizer read them): use mixed_precision=bf16 for bf16 compute"
        )
    return dataclasses.replace(cfg, dist=dataclasses.replace(d, strategy=strategy, zero_stage=zero_stage))
