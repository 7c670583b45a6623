"""Precomputed shards, training side: the member names, decoding and stacking a precomputed sample,
the config check (`check_precomputed`) and the posterior draw (`sample_posterior`).

The format and the reasons for it are documented with the writer, `sd_train.tools.precompute`
(`sd-train precompute`). Nothing here imports the model: the check compares a model folder's
fingerprint, it never loads it.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from sd_train.config import ConfigError
from sd_train.data.bad_input import BadInputLog, BadSample
from sd_train.data.buckets import bucket_name, bucket_set, pixel_factor
from sd_train.data.decode import ImageTransform, caption_of
from sd_train.data.sources import expand_sources
from sd_train.data.tar import RawSample, read_shards
from sd_train.model.family import SDXL_SUBFOLDERS, model_family

# The member names of `sd-train precompute` output (writer: sd_train.tools.precompute). Each array has a
# leading crop axis: [K, 4, h, w] for the posterior, K = 1 (center crop) or the `--crops` count.
LATENT_MEAN = "latent_mean.npy"
LATENT_STD = "latent_std.npy"
TEXT_EMBEDS = "text_embeds.npy"
# SDXL shards only: text_encoder_2's pooled projection [P], and each crop's geometry, int64
# [K, 3, 2]: rows original_size (H, W), crop_top_left (top, left), target_size (H, W).
POOLED_EMBEDS = "pooled_embeds.npy"
GEOMETRY = "geometry.npy"
GEOMETRY_ROWS = ("original_size", "crop_top_left", "target_size")


@dataclass
class PrecomputedSample:
    """One precomputed sample: the VAE posterior (unscaled mean and std, [4, h, w]) of one crop,
    the caption's text embeddings [77, D] (SD: the last hidden state; SDXL: both encoders'
    penultimate ones, concatenated), the caption and key; SDXL also the pooled embedding [P] and
    the crop's geometry [3, 2]."""

    key: str
    latent_mean: np.ndarray
    latent_std: np.ndarray
    text_embeds: np.ndarray
    caption: str
    pooled_embeds: Optional[np.ndarray] = None
    geometry: Optional[np.ndarray] = None


def _load_npy(data: bytes, kind: str = "f") -> np.ndarray:
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.dtype.kind != kind:
        raise ValueError(f"dtype {array.dtype}")
    return array


def decode_precomputed_sample(raw: RawSample, tf: ImageTransform, rng: Optional[random.Random]) -> PrecomputedSample:
    """Caption check, then the stored arrays; one crop of K, drawn with `rng` when there is one.

    The latents play the image's part in the bad-input counts: a sample without all three arrays is
    `missing_image`, one whose arrays do not load or do not fit together is `undecodable`. The
    geometry (`tf.resolution`, crops) was fixed at precompute time; `check_precomputed` holds the
    run's config to it before training starts, so `tf` is not consulted here.
    """
    if not all(m in raw.members for m in (LATENT_MEAN, LATENT_STD, TEXT_EMBEDS)):
        raise BadSample("missing_image")
    caption = caption_of(raw)
    try:
        mean, std = _load_npy(raw.members[LATENT_MEAN]), _load_npy(raw.members[LATENT_STD])
        text = _load_npy(raw.members[TEXT_EMBEDS])
    except (ValueError, OSError, EOFError):  # numpy's errors for a corrupt or truncated .npy
        raise BadSample("undecodable") from None
    if mean.ndim != 4 or mean.shape != std.shape or text.ndim != 2:
        raise BadSample("undecodable")
    # K > 1 crops exist only for random-crop training, where the stream hands us a position-seeded
    # rng: picking the crop with it keeps the choice resumable, like an online random crop.
    k = rng.randrange(mean.shape[0]) if rng is not None and mean.shape[0] > 1 else 0
    if POOLED_EMBEDS not in raw.members:
        return PrecomputedSample(raw.key, mean[k], std[k], text, caption)
    try:
        pooled, geometry = _load_npy(raw.members[POOLED_EMBEDS]), _load_npy(raw.members[GEOMETRY], kind="i")
    except (KeyError, ValueError, OSError, EOFError):
        raise BadSample("undecodable") from None
    if pooled.ndim != 1 or geometry.shape != (mean.shape[0], 3, 2):
        raise BadSample("undecodable")
    return PrecomputedSample(raw.key, mean[k], std[k], text, caption, pooled, geometry[k])


ARRAYS = ("latent_mean", "latent_std", "text_embeds", "pooled_embeds", "geometry")  # the last two SDXL's


def array_shapes(sample: PrecomputedSample) -> tuple[Optional[tuple[int, ...]], ...]:
    """The shapes of the sample's arrays (None for one it lacks): samples stack into one batch
    only when these agree."""
    return tuple(None if getattr(sample, a) is None else getattr(sample, a).shape for a in ARRAYS)


def stack_precomputed(samples: list[PrecomputedSample]) -> dict[str, Any]:
    """Precomputed samples -> float tensors latent_mean/latent_std [B,4,h,w] and text_embeds
    [B,77,D] in their stored dtype (SDXL: also pooled_embeds [B,P] and the geometry as int64 [B,2]
    rows, as image batches carry it). The posterior is sampled on device by the trainer, from its
    checkpointed global RNG, never here (a worker's RNG is not part of the resumable state)."""
    names = ARRAYS[:3] + (("pooled_embeds",) if samples[0].geometry is not None else ())
    out = {name: torch.from_numpy(np.stack([getattr(s, name) for s in samples])) for name in names}
    if samples[0].geometry is not None:
        geometry = torch.from_numpy(np.stack([s.geometry for s in samples])).to(torch.int64)
        out.update({name: geometry[:, i] for i, name in enumerate(GEOMETRY_ROWS)})
    return out


IDENTITY = "sd_train_precompute"  # the KEY.json entry check_precomputed reads
FAMILY_NAMES = {"sd": "SD 1.x/2.x", "sdxl": "SDXL"}
_FINGERPRINT_PARTS = ("vae", "text_encoder", "tokenizer")  # the UNet does not shape the stored arrays
_HEAD = 1 << 20


def model_fingerprint(path: str) -> str:
    """A hash of the VAE, text encoder and tokenizer files of a model folder (SDXL: both of each).

    Small files are hashed whole; weight files by size, first and last MiB: enough to tell two
    checkpoints apart in milliseconds, where hashing a real SD's 800 MB would cost every run's
    start seconds. A moved folder keeps its fingerprint; a re-saved one in another format does not.
    """
    h = hashlib.blake2b(digest_size=12)
    sdxl = model_family(path) == "sdxl"
    for part in _FINGERPRINT_PARTS + (SDXL_SUBFOLDERS if sdxl else ()):
        folder = Path(path) / part
        if not folder.is_dir():
            raise ConfigError(f"model.pretrained_path={path!r} has no {part}/: it must be a diffusers SD folder")
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            size = f.stat().st_size
            h.update(f"{f.relative_to(path)}\0{size}\0".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(_HEAD))
                if size > 2 * _HEAD:
                    fh.seek(size - _HEAD)
                    h.update(fh.read(_HEAD))
    return h.hexdigest()


def _first_sample(urls: list[str]) -> Optional[RawSample]:
    for raw in read_shards(urls, BadInputLog()):
        return raw
    return None


def check_precomputed(spec: str, cfg: Any) -> None:
    """Refuse a run whose config does not fit its precomputed shards. Raises ConfigError naming the field.

    `spec` is `data.train_shards` (any spec, or the precompute output folder); `cfg` a TrainConfig.
    Each source is judged by its first sample's `KEY.json` (that works for `pipe:` sources too).
    """
    d, field = cfg.data, "data.train_shards"
    if d.random_flip:
        raise ConfigError(
            "data.random_flip=true with data.precomputed=true: flips are not precomputed. Set data.random_flip=false"
        )
    fingerprint: Optional[str] = None  # hashed once, after the shards are known to be precomputed
    for src in expand_sources(spec, d.allow_pipe):
        raw = _first_sample(src.urls)
        if raw is None:
            raise ConfigError(f"{field}={spec!r}: no readable sample in {src.pattern!r}")
        if LATENT_MEAN not in raw.members:
            raise ConfigError(
                f"{field}: {raw.shard} holds no KEY.{LATENT_MEAN}: not `sd-train precompute` output. Precompute it, "
                "or set data.precomputed=false to train from images"
            )
        try:
            ident = json.loads(raw.members.get("json", b"{}")).get(IDENTITY)
        except (ValueError, AttributeError, RecursionError):
            ident = None
        if not isinstance(ident, dict):
            raise ConfigError(
                f"{field}: {raw.shard} has no `{IDENTITY}` record in its KEY.json; re-run `sd-train precompute`"
            )
        where = f"{raw.shard} was precomputed"
        family, stored = model_family(cfg.model.pretrained_path), ident.get("family", "sd")
        if stored != family:
            raise ConfigError(
                f"model.pretrained_path={cfg.model.pretrained_path!r} is an {FAMILY_NAMES[family]} folder but "
                f"{where} for an {FAMILY_NAMES[stored]} model: its embeddings do not fit this UNet. Train with the "
                f"{FAMILY_NAMES[stored]} model, or re-run `sd-train precompute --model {cfg.model.pretrained_path}`"
            )
        if ident["resolution"] != d.resolution:
            raise ConfigError(
                f"data.resolution={d.resolution} but {where} at resolution {ident['resolution']}: set "
                f"data.resolution={ident['resolution']}, or re-run `sd-train precompute --resolution {d.resolution}`"
            )
        fingerprint = fingerprint or model_fingerprint(cfg.model.pretrained_path)
        if ident["model_fingerprint"] != fingerprint:
            raise ConfigError(
                f"model.pretrained_path={cfg.model.pretrained_path!r}: its VAE/text encoder/tokenizer differ from those "
                f"{where} with (see precompute.json there): use that model, or re-run `sd-train precompute --model ...`"
            )
        _check_buckets(ident, cfg, where)
        if (ident["crops"] == 1) != d.center_crop:
            stored, fix = (
                ("the center crop", "true") if ident["crops"] == 1 else (f"{ident['crops']} random crops", "false")
            )
            raise ConfigError(
                f"data.center_crop={str(d.center_crop).lower()} but {where} with {stored}: set "
                f"data.center_crop={fix}, or re-run `sd-train precompute` with {'--crops 1' if d.center_crop else '--crops K > 1'}"
            )


def _check_buckets(ident: dict, cfg: Any, where: str) -> None:
    """The shards' bucket set (none: square) is the one `data.buckets` resolves to for this model."""
    d = cfg.data
    want = bucket_set(d, pixel_factor(cfg.model.pretrained_path)) if d.buckets != "none" else None
    stored = ident.get("buckets")
    names = [bucket_name((int(h), int(w))) for h, w in stored] if stored else None
    if want is None and names is None:
        return
    if want is None:
        raise ConfigError(
            f"data.buckets=none but {where} with aspect-ratio buckets {names}: set data.buckets to that set, or "
            "re-run `sd-train precompute` without --buckets"
        )
    if names is None:
        raise ConfigError(
            f"data.buckets={d.buckets!r} but {where} square (no buckets): set data.buckets=none, or re-run "
            "`sd-train precompute --buckets ...` with the same set"
        )
    if sorted(names) != sorted(want.names):
        raise ConfigError(
            f"data.buckets={d.buckets!r} resolves to {list(want.names)} but {where} with {names}: make them agree "
            "(data.buckets, data.bucket_max_aspect, data.bucket_side_multiple, data.resolution), or re-run "
            "`sd-train precompute` with this set"
        )


def sample_posterior(mean: torch.Tensor, std: torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled latents drawn from a stored posterior, bitwise as `encode_pixels` draws them.

    `DiagonalGaussianDistribution.sample` calls `randn_tensor(mean.shape, generator=None,
    device=..., dtype=...)`, i.e. `torch.randn` on the global RNG of the tensor's device, then
    mean + std * sample; `encode_pixels` multiplies by the scale after. Same calls here.
    """
    noise = torch.randn(mean.shape, generator=None, device=mean.device, dtype=mean.dtype, layout=torch.strided)
    return (mean + std * noise) * scale
