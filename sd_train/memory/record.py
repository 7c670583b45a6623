"""The fake-tensor step estimate as a stored record: what it was computed for (its key), what it
found, and where it is cached. Torch-free: the startup check reads a cached record in milliseconds,
while computing one (sd_train.memory.estimate) imports torch, builds the UNet on fake tensors and
runs a training step under torch's FSDPMemTracker (seconds for the test UNet, a minute or more for
SD2 and SDXL on a CPU).

A record is keyed by everything the step's memory depends on: the UNet, VAE and text encoder
configs, the micro-batch and latent size, the shard group size, the FSDP2 settings, the dtypes,
gradient checkpointing, the optimizer, what evaluation runs, and the torch and diffusers versions.
The world size enters only through the shard group size. Records live in
`$SD_TRAIN_CACHE/memory/` (default `~/.cache/sd-train/memory/`), one JSON file per key.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from sd_train.config import TrainConfig
from sd_train.data.buckets import bucket_set, pixel_factor

RECORD_VERSION = 4
VAL_BATCH = 16  # sd_train.evaluation.VAL_BATCH: the validation loss's forward batch


def cache_dir() -> Path:
    base = os.environ.get("SD_TRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sd-train")
    return Path(base) / "memory"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def uses_fused_adamw(cfg: TrainConfig) -> bool:
    """sd_train.perf.use_fused_adamw without a device: `auto` is fused on CPU and CUDA, the only
    devices sd-train runs on."""
    return cfg.optim.name == "adamw" and cfg.perf.optimizer_impl in ("auto", "fused")


def latent_factor(model_path: str) -> int:
    channels = _json(Path(model_path) / "vae" / "config.json").get("block_out_channels", [0, 0, 0, 0])
    return 2 ** (len(channels) - 1)


def step_shape(cfg: TrainConfig) -> tuple[int, int]:
    """(H, W) in pixels of the estimated step: the bucket with the most pixels when it holds more
    than `data.resolution`² (a listed set may), else the square. Activations grow with the pixels,
    and the `generated` and `sdxl` sets keep every bucket within resolution² (sd_train.data.buckets),
    so for them the square is the largest."""
    r = cfg.data.resolution
    if cfg.data.buckets == "none":
        return r, r
    buckets = bucket_set(cfg.data, pixel_factor(cfg.model.pretrained_path))
    if buckets is None:
        return r, r
    largest = max(buckets.sizes, key=lambda s: s[0] * s[1])
    return largest if largest[0] * largest[1] > r * r else (r, r)


def eval_batches(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(validation forward batch, sampling forward batch) of sd_train.evaluation on one rank; 0 when
    that part does not run."""
    if not cfg.eval.every_steps:
        return 0, 0
    per_rank = -(-cfg.eval.num_val_samples // world_size) if cfg.data.val_shards else 0
    return min(VAL_BATCH, per_rank), 2 * len(cfg.eval.prompts)


def estimate_key(cfg: TrainConfig, world_size: int, shard_size: int) -> dict[str, Any]:
    """Everything the step estimate depends on (cfg resolved by sd_train.preflight: no `auto` left
    in dist.strategy or dist.param_dtype). ddp and DeepSpeed are estimated as one unsharded replica
    (shard size 1): their model states are the plan's closed form, the estimate gives the rest."""
    d = cfg.dist
    root = Path(cfg.model.pretrained_path)
    fsdp = d.strategy == "fsdp2"
    text = _json(root / "text_encoder" / "config.json")
    text_2 = _json(root / "text_encoder_2" / "config.json")
    shape = step_shape(cfg)
    key = {
        "version": RECORD_VERSION,
        "torch": _version("torch"),
        "diffusers": _version("diffusers"),
        "unet": _json(root / "unet" / "config.json"),
        "vae": _json(root / "vae" / "config.json"),
        "text": [
            {k: t.get(k) for k in ("hidden_size", "num_hidden_layers", "max_position_embeddings")}
            for t in (text, text_2)
        ],
        "micro_batch_size": cfg.micro_batch_size,
        "micro_batches": min(2, cfg.grad_accum_steps(world_size)),
        "resolution": cfg.data.resolution,
        "precomputed": cfg.data.precomputed,
        "layout": "fsdp2" if fsdp else "replica",
        "shard_size": shard_size if fsdp else 1,
        "fsdp_units": d.fsdp_units if fsdp else None,
        "reshard_after_forward": d.reshard_after_forward if fsdp else None,
        "prefetch": d.prefetch if fsdp else None,
        "param_dtype": d.param_dtype if fsdp else "fp32",
        "reduce_dtype": d.reduce_dtype if fsdp else "fp32",
        "autocast_bf16": cfg.autocast_bf16() if fsdp else cfg.mixed_precision == "bf16",
        "frozen_bf16": cfg.mixed_precision == "bf16",
        "vae_dtype": cfg.model.vae_dtype,
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "channels_last": cfg.perf.channels_last,
        "optimizer": cfg.optim.name,
        "fused": uses_fused_adamw(cfg),
        "eval_batches": list(eval_batches(cfg, world_size)),
        "prompts": len(cfg.eval.prompts) if cfg.eval.every_steps else 0,
    }
    if shape != (cfg.data.resolution,) * 2:  # only then: the square runs' cached estimates stay valid
        key["bucket"] = list(shape)
    return key


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class StepEstimate:
    """What the fake-tensor run found, in bytes per rank. `step` is FSDPMemTracker's snapshot at the
    peak of a training step (category -> bytes, "Total" included); the `*_transient` figures are
    what a phase adds above the model states held then."""

    key: dict[str, Any]
    step: dict[str, int]
    eval_transient: int = 0
    """The largest no-grad UNet forward of the evaluation (validation batch or the sampler's
    classifier-free-guidance batch): gathered params, activations and temporaries."""
    decode_transient: int = 0
    """The VAE decode of the sample grid (the sampler's batch at the training resolution)."""
    encode_transient: int = 0
    """Online encoding (data.precomputed=false): the VAE encode and text encoder of a micro-batch."""
    runtime_rss: int = 0
    """RSS of a process once the trainer's modules are imported (interpreter, torch, diffusers)."""
    worker_server_anon: int = 0
    """Anonymous RSS of the loader's forkserver (torch and the data modules, preloaded once a rank)."""
    worker_uss: int = 0
    """Unique memory (USS) of one loader worker forked from that server, after 40 batches of a probe
    loader: what each worker adds (its libraries and the server's pages stay shared)."""
    sizes: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    cached_at: Optional[str] = None

    @property
    def step_peak(self) -> int:
        return int(self.step.get("Total", 0))

    def step_states(self) -> dict[str, int]:
        """The model-state categories of the peak snapshot: sharded params, sharded grads, optimizer."""
        return {
            "params": int(self.step.get("Sharded Param", 0)),
            "grads": int(self.step.get("Sharded Grad", 0)),
            "optimizer": int(self.step.get("OptState", 0)),
        }

    def to_json(self) -> str:
        out = asdict(self)
        out.pop("cached_at")
        return json.dumps(out, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, path: Optional[Path] = None) -> StepEstimate:
        data = json.loads(text)
        return cls(**data, cached_at=str(path) if path else None)


def cached_estimate(key: dict[str, Any]) -> Optional[StepEstimate]:
    """The cached record of `key`, or None (also for a record of an older format)."""
    path = cache_dir() / f"{key_hash(key)}.json"
    try:
        record = StepEstimate.from_json(path.read_text(), path)
    except (OSError, ValueError, TypeError):
        return None
    return record if record.key == key else None


def store_estimate(record: StepEstimate) -> Path:
    """Write `record` into the cache atomically (several ranks of a node may write the same key)."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key_hash(record.key)}.json"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".partial-")
    with os.fdopen(fd, "w") as f:
        f.write(record.to_json())
    os.replace(tmp, path)
    return path
