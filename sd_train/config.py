"""Typed run configuration: dataclass defaults < YAML file < `section.key=value` CLI overrides.

Every field is documented where it is declared. `load_config` rejects unknown keys and wrong
types, and `TrainConfig.validate` checks everything that can be checked before any process group
starts, so a bad config fails in well under a second with a message naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


MODEL_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class ConfigError(ValueError):
    """A config value is wrong. The message names the field and says how to fix it."""


# --------------------------------------------------------------------------------------------
# Sections. Each owns its fields and its own checks.
# --------------------------------------------------------------------------------------------


@dataclass
class ModelArgs:
    pretrained_path: str = "models/tiny-sd"
    """A local diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/,
    scheduler/). The tiny demo model and a downloaded SD 1.5 / 2-base load through the same code."""
    init_unet: Literal["pretrained", "scratch"] = "pretrained"
    """`pretrained` loads the UNet weights in the folder; `scratch` builds the UNet from its
    config with fresh random weights (seeded by `seed`)."""
    gradient_checkpointing: bool = False
    """Recompute UNet block activations in backward: less memory, ~30% more compute."""


@dataclass
class ObjectiveArgs:
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    """What the UNet predicts. SD 1.x/2-base use epsilon; SD 2 (768) uses v_prediction."""
    caption_dropout: float = 0.1
    """Probability of replacing a caption by the empty string, for classifier-free guidance
    (SD used 10%)."""
    snr_gamma: Optional[float] = None
    """Min-SNR-gamma loss weighting (arXiv 2303.09556); 5.0 is the paper's value. None: off."""
    noise_offset: float = 0.0
    """Offset noise strength (adds per-channel constant noise); 0 disables, 0.05-0.1 typical."""


@dataclass
class DataArgs:
    train_shards: str = "data/emoji/train-{000000..000007}.tar"
    """Training shards: a brace pattern, a glob, a folder, a `.txt` list file, or a `pipe:`
    URL. Several sources are separated by `::`; each may carry a mixing weight as `SRC@0.3`."""
    val_shards: str = "data/emoji/val-000000.tar"
    """Held-out shards for the validation loss. Empty string disables validation."""
    resolution: int = 32
    """Square training resolution in pixels; a multiple of 8 (the SD VAE downsamples by 8)."""
    center_crop: bool = True
    """Center crop after the resize; False takes a random crop (seeded, so resumable)."""
    random_flip: bool = False
    """Horizontal flip with probability 0.5 (seeded)."""
    num_workers: int = 1
    """DataLoader worker processes per rank. Each worker reads its own shards."""
    shuffle_buffer: int = 256
    """Samples held in each worker's shuffle buffer; 0 keeps shard order."""
    mode: Literal["epoch", "resampled"] = "epoch"
    """`epoch`: every sample exactly once per epoch across ranks x workers (needs at least that
    many shards). `resampled`: shards drawn with replacement, an endless stream."""
    max_bad_fraction: float = 0.05
    """Stop the run when more than this share of samples read so far was bad (undecodable,
    no caption, truncated)."""
    min_samples_for_bad_check: int = 200
    """The bad-sample share is only judged after this many samples, so one early bad file
    does not stop a run."""
    precomputed: bool = False
    """Train from shards written by `sd-train precompute` (latents + text embeddings); the VAE
    and text encoder are not run during training."""
    log_keys: bool = False
    """Write every consumed sample key to `<output_dir>/keys/rank{R}.txt` (for audits/tests)."""


@dataclass
class OptimArgs:
    name: Literal["adamw", "sgd"] = "adamw"
    """Optimizer. `sgd` exists for exactness tests (Adam amplifies reduction-order noise)."""
    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 1e-2
    """Decoupled weight decay (AdamW) or L2 (SGD)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear LR warmup from 0 over this many optimizer steps."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """LR after warmup: constant, cosine to 0, or linear to 0 at `max_steps`."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still measured,
    because a non-finite norm is how a bad step is detected on every rank)."""


@dataclass
class EMAArgs:
    enabled: bool = True
    """Keep an exponential moving average of the UNet weights over the last part of the run."""
    decay: float = 0.9999
    """Per-step decay. Effective horizon 1/(1-decay) steps."""
    step_start_ema: Optional[int] = None
    """Absolute optimizer step at which the window opens. If unset, it is derived from
    `window_fraction`, or from `tolerance` when `window_from_tolerance` is true."""
    window_fraction: float = 0.035
    """Window length as a share of `max_steps`, used when `step_start_ema` is unset
    (MosaicML SD2: the last 50k of 1.4M batches, ~3.5%)."""
    window_from_tolerance: bool = False
    """Derive the window as the smallest N with decay^N <= tolerance."""
    tolerance: float = 0.01
    """Largest allowed share of the final EMA that may come from weights before the window.
    A config over it is refused at startup."""
    warmup: bool = False
    """Ramp the decay as in diffusers' EMAModel: min(decay, 1 - (1 + k/inv_gamma)^-power) at the
    k-th update of the window. The startup check then uses the real per-step decays."""
    inv_gamma: float = 1.0
    """Decay warmup inverse multiplicative factor (only with warmup)."""
    power: float = 2.0 / 3.0
    """Decay warmup exponent (only with warmup)."""
    update_every: int = 1
    """Update the EMA every this many optimizer steps (the window math counts updates)."""


@dataclass
class CheckpointArgs:
    every_steps: int = 500
    """Save a checkpoint every this many optimizer steps (and always at the last step)."""
    keep_last_k: int = 3
    """Keep this many newest complete checkpoints; 0 keeps all. Must be >= 2 otherwise: the
    newest may be mid-save when retention runs, so the one before it must survive."""
    async_save: bool = False
    """Write checkpoint shards in a background thread (torch.distributed.checkpoint.async_save);
    the loop blocks only for the copy to CPU."""
    resume: str = "auto"
    """`auto`: newest complete checkpoint in `<output_dir>/checkpoints` if any, else start fresh.
    `none`: start fresh (refuses if checkpoints exist, so nothing is overwritten by accident).
    Or a path to a checkpoint step folder."""
    load_step: Optional[int] = None
    """With resume=auto: load this step instead of the newest (must exist and be complete)."""


@dataclass
class DistArgs:
    strategy: Literal["auto", "fsdp2", "ddp", "deepspeed"] = "auto"
    """`fsdp2` shards the UNet with torch's fully_shard (also on one process and on CPU).
    `ddp` replicates it (small models). `deepspeed` runs ZeRO-2/3 through accelerate's DeepSpeed
    plugin (`dist.zero_stage`). `auto`: deepspeed when started by `accelerate launch` with a
    DeepSpeed config (launch/accelerate/zero2.yaml, zero3.yaml), taking its ZeRO stage; else fsdp2."""
    zero_stage: Optional[int] = None
    """DeepSpeed ZeRO stage, 2 or 3 (only with strategy deepspeed). 3 partitions parameters,
    gradients and optimizer state, and the EMA follows each rank's parameter partitions. 2
    partitions gradients and optimizer state; params and the EMA stay replicated. Unset: the
    accelerate launch config's `zero_stage`, else 3."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend. auto: nccl with CUDA, else gloo."""
    param_dtype: Literal["fp32", "bf16"] = "fp32"
    """FSDP2 mixed precision: dtype of the gathered params in forward/backward."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """FSDP2 mixed precision: dtype of gradient reduce-scatter."""
    reshard_after_forward: bool = True
    """FSDP2: free gathered params after forward (ZeRO-3 like) rather than keep them to
    backward (ZeRO-2 like: more memory, one all-gather fewer)."""
    timeout_s: int = 600
    """Collective timeout. A hung rank makes the job exit non-zero after this."""


@dataclass
class EvalArgs:
    every_steps: int = 200
    """Validation loss and sample grids every this many steps (and at the end). 0 disables."""
    num_val_samples: int = 64
    """Held-out samples in the validation loss (fixed: the first N of `data.val_shards`)."""
    val_timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])
    """Fixed timesteps of the validation denoising loss; each sample is scored at each one, with
    noise fixed by (seed, sample index), so the figure is comparable across runs."""
    prompts: list[str] = field(
        default_factory=lambda: [
            "an emoji of red apple",
            "an emoji of hamburger",
            "an emoji of grinning face",
            "an emoji of rocket",
        ]
    )
    """Fixed prompts for the sample grid."""
    sample_seed: int = 1234
    """Seed of the sample grid's initial noise."""
    num_inference_steps: int = 25
    """DDIM steps per sample."""
    guidance_scale: float = 4.0
    """Classifier-free guidance scale of the sample grid."""


@dataclass
class MetricsArgs:
    log_every: int = 10
    """Log scalars every this many optimizer steps."""
    wandb: bool = False
    """Also log to wandb. Offline works: set WANDB_MODE=offline. Without a key or mode the run
    goes on with the JSONL log and one warning."""
    wandb_project: str = "sd-train"
    """wandb project."""
    wandb_group: str = ""
    """wandb group (sweeps set this)."""
    tensorboard: bool = False
    """Also write tensorboard event files under `<output_dir>/tensorboard`."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    """Everything of a run goes here: config.yaml, metrics.jsonl, checkpoints/, samples/, export/."""
    run_name: str = ""
    """Human-readable run name (wandb); defaults to the output folder's name."""
    seed: int = 0
    """Base seed. Rank r seeds its generators with seed + r."""
    max_steps: int = 1000
    """Optimizer steps to train."""
    global_batch_size: int = 32
    """Samples per optimizer step over all ranks: world_size x micro_batch_size x accumulation."""
    micro_batch_size: int = 8
    """Samples per forward/backward on one rank."""
    mixed_precision: Literal["no", "bf16"] = "no"
    """bf16 autocast for the forward pass (weights and optimizer stay fp32)."""
    max_consecutive_skips: int = 5
    """Stop the run after this many optimizer steps in a row were skipped for a non-finite loss or
    gradient (one skipped step is survivable; a streak means diverged training)."""
    export_at_end: bool = True
    """Export a diffusers pipeline folder (raw and, if allocated, EMA UNet) at the end."""
    model: ModelArgs = field(default_factory=ModelArgs)
    objective: ObjectiveArgs = field(default_factory=ObjectiveArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    ema: EMAArgs = field(default_factory=EMAArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    dist: DistArgs = field(default_factory=DistArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    metrics: MetricsArgs = field(default_factory=MetricsArgs)

    def grad_accum_steps(self, world_size: int) -> int:
        return self.global_batch_size // (world_size * self.micro_batch_size)

    def validate(self, world_size: int) -> None:
        """Everything checkable without a process group. Raises ConfigError naming the field."""
        _validate(self, world_size)


# --------------------------------------------------------------------------------------------
# Loading: YAML + overrides into the dataclasses, with type checks and unknown-key errors.
# --------------------------------------------------------------------------------------------


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp` (as resolved by get_type_hints)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}={value!r} is not one of {list(args)}: set {path} to one of them")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list, got {value!r}: write it as [a, b, ...]")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} is a section; give it as a mapping of its keys, got {value!r}")
        return _build(tp, value, path + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-4` (no dot) as a string; accept what Python reads as a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported annotation {tp}")  # a bug in this file, not the user's


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    known = _fields(cls)
    hints = typing.get_type_hints(cls)
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" Did you mean {prefix}{close[0]}?" if close else f" Known keys: {sorted(known)}."
            raise ConfigError(f"unknown config key {prefix}{key}.{hint}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {k} is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=1 c=x` -> nested dict. Values are parsed as YAML, so `lr=1e-4`, `flag=true`,
    `prompts=[a, b]` and `step_start_ema=null` all work."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from e
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: Optional[str], overrides: list[str] = ()) -> TrainConfig:
    """Defaults < YAML at `path` < overrides. Raises ConfigError on unknown keys or bad types."""
    tree: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {path}: no such file. Pick one from configs/")
        with open(p) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: the top level must be a mapping of keys")
        tree = loaded
    tree = _merge(tree, parse_overrides(list(overrides)))
    return _build(TrainConfig, tree)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


def checkpoint_is_complete(folder: Path) -> bool:
    """A step folder that a resume may use: trainer_state.json plus the tensor part, DCP's
    `.metadata` (FSDP2/DDP, written last by DCP's coordinator) or `zero/` (DeepSpeed). Our writes
    make a folder with a final name complete by construction (see sd_train.checkpoint); this
    check guards against folders damaged or assembled by hand. Here, not in sd_train.checkpoint,
    because config validation must not import torch."""
    folder = Path(folder)
    return (folder / "trainer_state.json").is_file() and ((folder / ".metadata").is_file() or (folder / "zero").is_dir())


def env_world_size() -> int:
    """World size as set by torchrun / accelerate launch, before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name}={value} must be positive")


def _validate(cfg: TrainConfig, world_size: int) -> None:
    _positive("max_steps", cfg.max_steps)
    _positive("micro_batch_size", cfg.micro_batch_size)
    _positive("max_consecutive_skips", cfg.max_consecutive_skips)
    _positive("global_batch_size", cfg.global_batch_size)
    per_step = world_size * cfg.micro_batch_size
    if cfg.global_batch_size % per_step != 0:
        lo = max(per_step, cfg.global_batch_size // per_step * per_step)
        raise ConfigError(
            f"global_batch_size={cfg.global_batch_size} is not divisible by world_size ({world_size}) x "
            f"micro_batch_size ({cfg.micro_batch_size}) = {per_step}: set global_batch_size to a multiple "
            f"of {per_step} (e.g. {lo}) or change micro_batch_size"
        )

    d = cfg.data
    if d.resolution <= 0 or d.resolution % 8 != 0:
        raise ConfigError(f"data.resolution={d.resolution} must be a positive multiple of 8 (e.g. {max(8, d.resolution // 8 * 8)})")
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers={d.num_workers} must be >= 0")
    if d.shuffle_buffer < 0:
        raise ConfigError(f"data.shuffle_buffer={d.shuffle_buffer} must be >= 0")
    if not 0 <= d.max_bad_fraction <= 1:
        raise ConfigError(f"data.max_bad_fraction={d.max_bad_fraction} must be in [0, 1]")
    _check_shards("data.train_shards", d.train_shards, world_size, max(1, d.num_workers), d.mode == "epoch")
    if d.val_shards:
        _check_shards("data.val_shards", d.val_shards, 1, 1, False)

    o = cfg.objective
    if not 0 <= o.caption_dropout < 1:
        raise ConfigError(f"objective.caption_dropout={o.caption_dropout} must be in [0, 1)")
    if o.snr_gamma is not None and o.snr_gamma <= 0:
        raise ConfigError(f"objective.snr_gamma={o.snr_gamma} must be positive, or null to disable")
    if o.noise_offset < 0:
        raise ConfigError(f"objective.noise_offset={o.noise_offset} must be >= 0")

    op = cfg.optim
    _positive("optim.lr", op.lr)
    if op.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps={op.warmup_steps} must be >= 0")
    if op.max_grad_norm < 0:
        raise ConfigError(f"optim.max_grad_norm={op.max_grad_norm} must be >= 0 (0 disables clipping)")
    if len(op.betas) != 2 or not all(0 <= b < 1 for b in op.betas):
        raise ConfigError(f"optim.betas={op.betas} must be two numbers in [0, 1)")

    c = cfg.checkpoint
    _positive("checkpoint.every_steps", c.every_steps)
    if c.keep_last_k == 1 or c.keep_last_k < 0:
        raise ConfigError(
            f"checkpoint.keep_last_k={c.keep_last_k}: must be 0 (keep all) or >= 2, because the newest "
            "checkpoint may still be in flight when old ones are deleted"
        )
    if c.resume not in ("auto", "none"):
        if not Path(c.resume).is_dir():
            raise ConfigError(f"checkpoint.resume={c.resume!r}: no such checkpoint folder. Use auto, none, or an existing step folder")
        if not checkpoint_is_complete(Path(c.resume)):
            raise ConfigError(f"checkpoint.resume={c.resume!r} is not a complete checkpoint (no .metadata or zero/, or no trainer_state.json)")
    if c.load_step is not None:
        from sd_train.checkpoint import step_dir  # local: checkpoint imports torch

        want = step_dir(Path(cfg.output_dir) / "checkpoints", c.load_step)
        if not checkpoint_is_complete(want):
            raise ConfigError(f"checkpoint.load_step={c.load_step}: no complete checkpoint at {want}")

    _check_strategy(cfg, os.environ)
    _positive("dist.timeout_s", cfg.dist.timeout_s)

    e = cfg.eval
    if e.every_steps < 0:
        raise ConfigError(f"eval.every_steps={e.every_steps} must be >= 0 (0 disables)")
    _positive("eval.num_inference_steps", e.num_inference_steps)
    if any(not 0 <= t < 1000 for t in e.val_timesteps):
        raise ConfigError(f"eval.val_timesteps={e.val_timesteps} must lie in [0, 1000)")
    _positive("metrics.log_every", cfg.metrics.log_every)

    if not Path(cfg.model.pretrained_path).is_dir():
        raise ConfigError(
            f"model.pretrained_path={cfg.model.pretrained_path!r}: no such folder. Run `make tiny-sd` for the "
            "demo model, or point it at a local diffusers Stable Diffusion folder"
        )
    missing = [s for s in MODEL_SUBFOLDERS if not (Path(cfg.model.pretrained_path) / s).is_dir()]
    if missing:
        raise ConfigError(
            f"model.pretrained_path={cfg.model.pretrained_path!r} lacks {missing}: it must be a diffusers Stable "
            "Diffusion folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/). Run `make tiny-sd` for the demo model"
        )

    from sd_train.ema_plan import plan_from_config  # local: keeps config import light

    plan_from_config(cfg.ema, cfg.max_steps).check()


def _check_strategy(cfg: TrainConfig, environ: typing.Mapping[str, str]) -> None:
    """Resolve `dist.strategy=auto` and `dist.zero_stage` against the launcher, and refuse what
    DeepSpeed cannot do here. `accelerate launch` with a DeepSpeed config exports
    ACCELERATE_USE_DEEPSPEED and ACCELERATE_DEEPSPEED_ZERO_STAGE; the sd-train config must agree
    with them, because a launcher that says ZeRO-3 while the run shards with FSDP2 is a mistake
    worth stopping for. Idempotent: validate() may run more than once."""
    d = cfg.dist
    launched_ds = environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    launch_stage = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if d.strategy == "auto":
        d.strategy = "deepspeed" if launched_ds else "fsdp2"
    if launched_ds and d.strategy != "deepspeed":
        raise ConfigError(
            f"dist.strategy={d.strategy} but `accelerate launch` was given a DeepSpeed config (ZeRO stage "
            f"{launch_stage}): set dist.strategy=deepspeed (or auto), or launch with launch/accelerate/cpu2.yaml, "
            "gpu1node.yaml or multinode.yaml for FSDP2"
        )
    if d.strategy != "deepspeed":
        if d.zero_stage is not None:
            raise ConfigError(f"dist.zero_stage={d.zero_stage} applies only to dist.strategy=deepspeed (now {d.strategy}); remove it")
        return
    if d.zero_stage is None:
        d.zero_stage = int(launch_stage) if launch_stage and launch_stage.isdigit() else 3
    if d.zero_stage not in (2, 3):
        raise ConfigError(f"dist.zero_stage={d.zero_stage}: sd-train supports ZeRO stage 2 or 3")
    if launched_ds and launch_stage and launch_stage.isdigit() and int(launch_stage) != d.zero_stage:
        raise ConfigError(
            f"dist.zero_stage={d.zero_stage} but the accelerate launch config says zero_stage {launch_stage}: "
            f"make them agree (use launch/accelerate/zero{d.zero_stage}.yaml, or drop dist.zero_stage)"
        )
    import importlib.util  # the check must not import deepspeed (it pulls in torch)

    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("dist.strategy=deepspeed but the deepspeed package is not installed: "
                          "pip install -c constraints.txt deepspeed==0.19.8 (it is in requirements.txt; `make venv`)")
    if cfg.checkpoint.async_save:
        raise ConfigError("checkpoint.async_save=true is FSDP2-only (DCP async_save); DeepSpeed writes its "
                          "checkpoints synchronously: set checkpoint.async_save=false")
    if d.param_dtype != "fp32" or d.reduce_dtype != "fp32":
        raise ConfigError(
            f"dist.param_dtype={d.param_dtype} / dist.reduce_dtype={d.reduce_dtype} are FSDP2 settings; under DeepSpeed "
            "the UNet's params stay fp32 (the EMA and optimizer read them): use mixed_precision=bf16 for bf16 compute"
        )


def _check_shards(name: str, spec: str, world_size: int, workers: int, exact: bool) -> None:
    from sd_train.data.sources import check_epoch_shard_count, expand_sources  # local: data.sources imports config

    try:
        sources = expand_sources(spec)
    except ValueError as e:
        raise ConfigError(f"{name}={spec!r}: {e}") from e
    for src in sources:
        if not src.urls:
            raise ConfigError(f"{name}={spec!r}: pattern {src.pattern!r} matches no shard. Check the path, or run `make data`")
        if exact:
            check_epoch_shard_count(name, src, world_size, workers)
