"""Precomputed latents: run the frozen VAE and text encoder once over a shard set, train from the result.

Why. SD training spends much of each step in the two frozen encoders: MosaicML report that
precomputing the latents and text embeddings made their SD2 training ~1.4x faster ("How We Trained
Stable Diffusion for Less than $50k, Part 3", databricks.com/blog/diffusion). The data are encoded
once here instead of once per epoch; the trainer then skips both encoders.

What is stored. One output shard per input shard, same base name, samples in the same order; per
key (no other members, and no image):
- `KEY.latent_mean.npy`, `KEY.latent_std.npy`: the VAE posterior N(mean, std^2), UNSCALED (the
  VAE's own output, before `scaling_factor`), shape [K, 4, h, w] with K crops (below).
- `KEY.text_embeds.npy`: the text encoder's last hidden state [77, D] of the caption.
- `KEY.txt`: the caption; `KEY.json`: the input's json, plus `key`, `caption` and, under
  `sd_train_precompute`, what the arrays depend on (model fingerprint, resolution, crops).
Arrays are float32 by default: then training is bitwise identical to online encoding (see below).
`--dtype float16` halves the size (at 512 px: 231 KiB -> 116 KiB of text embeddings, 128 -> 64 KiB
of posterior per sample) at a rounding error of ~2^-11 relative, which tests/e2e/test_precompute.py
measures. `precompute.json` in the output folder records the model, resolution, dtype, shapes,
VAE scaling_factor, text hidden size and the counts.

Why the posterior, not one sample of it. Online training draws a fresh latent every epoch:
`latent_dist.sample()` = mean + std * randn, from the global RNG that every checkpoint saves. The
trainer does the same with the stored pair: `(mean + std * torch.randn(mean.shape, dtype, device))
* vae_scale`, the same call diffusers' `DiagonalGaussianDistribution.sample` makes, at the same
point of the step. So a precomputed run consumes the same random numbers as an online one and keeps
the per-epoch latent noise (a stored sample would freeze it). Unscaled, because scaling after the
sum is what online training computes; (mean*s) + (std*s)*eps rounds differently.

Exactness. Same device, batch composition and float32 storage: the stored mean/std are bitwise
the online ones, hence so are latents and losses (`Trainer._encode` makes both paths' latents
contiguous, since the objective's noise draw depends on the layout). The VAE is not
batch-invariant (a sample encoded in a batch of 4 differs from one in a batch of 32 by ~1e-6 on
CPU), so with other batching (any shuffle buffer) the match is to float32 rounding, not bitwise.

Crops. `--crops 1` (default) stores the center crop: train with `data.center_crop=true`.
`--crops K` (K > 1) stores K random crops, seeded by (`--seed`, key, k); train with
`data.center_crop=false` and each epoch picks one of the K with the stream's position-seeded RNG
(resumable, like an online random crop). Flips are not stored: `data.random_flip` is refused.
`check_precomputed` holds a run's config to all of this before training starts.

Use:
    sd-train precompute --model models/tiny-sd --src 'data/emoji/train-{000000..000007}.tar' \\
        --out data/emoji-latents --resolution 32
    python train.py --config configs/demo.yaml data.precomputed=true \\
        data.train_shards='data/emoji-latents/train-{000000..000007}.tar'
Validation (`data.val_shards`) and sample grids still use image shards and the online encoders.
A re-run overwrites the output shards (each is written to a temp file, then renamed).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sd_train.config import ConfigError, ModelArgs
from sd_train.data.bad_input import BadInputLog, BadSample
from sd_train.data.decode import (
    DecodedSample,
    ImageTransform,
    decode_image_sample,
    pixels_to_float,
    stack_pixels,
)
from sd_train.data.precomputed import (
    IDENTITY,
    LATENT_MEAN,
    LATENT_STD,
    TEXT_EMBEDS,
    model_fingerprint,
)
from sd_train.data.sources import expand_sources
from sd_train.data.tar import RawSample, add_member, read_shards
from sd_train.model.parts import encode_text, load_sd_parts

MANIFEST = "precompute.json"
DTYPES = {"float32": np.float32, "float16": np.float16}


# --------------------------------------------------------------------------------------------
# Output names (what the arrays depend on: sd_train.data.precomputed.model_fingerprint).
# --------------------------------------------------------------------------------------------


def output_name(url: str) -> str:
    """The base name of an input shard (`.../train-000001.tar`, also inside a `pipe:` command)."""
    names = re.findall(r"([^/\s?]+\.tar)\b", url)
    if not names:
        raise ValueError(f"cannot tell the shard name of {url!r}: it names no .tar file")
    return names[-1]


# --------------------------------------------------------------------------------------------
# Writing.
# --------------------------------------------------------------------------------------------


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _meta(raw: RawSample, caption: str, identity: dict) -> bytes:
    try:
        meta = json.loads(raw.members["json"]) if "json" in raw.members else {}
    except ValueError:
        meta = {}  # an unreadable json is not worth dropping the sample for; training ignores it
    meta = (meta if isinstance(meta, dict) else {}) | {"key": raw.key, "caption": caption, IDENTITY: identity}
    return json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()


class _Encoder:
    """Owns the frozen VAE and text encoder of one precompute run and the output dtype."""

    def __init__(self, model_path: str, device: torch.device, dtype: np.dtype) -> None:
        # The trainer's own loader, so the encoders are set up exactly as online training sets them;
        # loaded on CPU, then only the two encoders move: the UNet is never run here.
        self.parts = load_sd_parts(ModelArgs(pretrained_path=model_path), torch.device("cpu"), seed=0)
        self.parts.vae.to(device)
        self.parts.text_encoder.to(device)
        self.device, self.dtype = device, dtype
        self.shapes: dict[str, list[int]] = {}
        """Per-sample shapes of what was written: latent [K, C, h, w] and text_embeds [L, D]."""

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, captions: list[str], crops: int) -> tuple[np.ndarray, ...]:
        """uint8 [N*K,3,R,R] (K crops per sample, adjacent) -> mean, std [N,K,4,h,w] and text [N,77,D]."""
        dist = self.parts.vae.encode(pixels_to_float(pixels.to(self.device))).latent_dist
        text = encode_text(self.parts, captions, self.device)

        def out(t: torch.Tensor) -> np.ndarray:
            return t.float().cpu().numpy().astype(self.dtype, copy=False)

        mean, std = (out(t).reshape(-1, crops, *t.shape[1:]) for t in (dist.mean, dist.std))
        self.shapes = {"latent_shape": list(mean.shape[1:]), "text_embeds_shape": list(text.shape[1:])}
        return mean, std, out(text)


def _crops_of(raw: RawSample, resolution: int, crops: int, seed: int) -> list[DecodedSample]:
    """The sample as training reads it: the center crop, or `crops` seeded random crops."""
    if crops == 1:
        return [decode_image_sample(raw, ImageTransform(resolution, center_crop=True), None)]
    tf = ImageTransform(resolution, center_crop=False)
    return [decode_image_sample(raw, tf, random.Random(f"{seed}/{raw.key}/{k}")) for k in range(crops)]


def _write_shard(
    url: str, out_path: str, enc: _Encoder, log: BadInputLog, identity: dict, batch_size: int, seed: int
) -> int:
    """Encode one input shard into `out_path` (temp file, then rename); returns the samples written."""
    crops, resolution = identity["crops"], identity["resolution"]
    tmp, written = out_path + ".tmp", 0
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        pending: list[tuple[RawSample, list[DecodedSample]]] = []

        def flush() -> None:
            nonlocal written
            if not pending:
                return
            pixels = stack_pixels([d for _, ds in pending for d in ds], resolution)
            captions = [ds[0].caption for _, ds in pending]
            mean, std, text = enc.encode(pixels, captions, crops)
            for i, (raw, ds) in enumerate(pending):
                add_member(tar, f"{raw.key}.{LATENT_MEAN}", _npy(mean[i]))
                add_member(tar, f"{raw.key}.{LATENT_STD}", _npy(std[i]))
                add_member(tar, f"{raw.key}.{TEXT_EMBEDS}", _npy(text[i]))
                add_member(tar, f"{raw.key}.txt", ds[0].caption.encode())
                add_member(tar, f"{raw.key}.json", _meta(raw, ds[0].caption, identity))
            written += len(pending)
            pending.clear()

        # Batches never span shards, so with shuffle_buffer=0 and micro_batch_size == batch_size a
        # training batch is a precompute batch, and the VAE sees the same batch composition.
        for raw in read_shards([url], log):
            try:
                pending.append((raw, _crops_of(raw, resolution, crops, seed)))
            except BadSample as e:
                log.add(e.category, raw.shard)
                continue
            if len(pending) == batch_size:
                flush()
        flush()
    os.replace(tmp, out_path)
    return written


def precompute(
    model_path: str,
    src_spec: str,
    out_dir: str,
    resolution: int,
    batch_size: int = 32,
    crops: int = 1,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """Encode every sample of `src_spec` (any `expand_sources` spec) into shards in `out_dir`.

    Bad input is skipped and counted by the training reader's categories. Returns the manifest,
    also written to `out_dir/precompute.json`.
    """
    if resolution <= 0 or resolution % 8:
        raise ValueError(f"resolution={resolution} must be a positive multiple of 8")
    if crops < 1 or batch_size < 1:
        raise ValueError(f"crops={crops} and batch_size={batch_size} must be >= 1")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {list(DTYPES)}")
    urls = [u for s in expand_sources(src_spec) for u in s.urls]
    if not urls:
        raise ValueError(f"no shards in {src_spec!r}")
    names = [output_name(u) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError(f"{src_spec!r} holds two shards of the same base name; outputs would overwrite each other")
    os.makedirs(out_dir, exist_ok=True)

    t0 = time.perf_counter()
    enc = _Encoder(model_path, torch.device(device), np.dtype(DTYPES[dtype]))
    start = time.perf_counter()  # throughput counts reading + encoding + writing, not the model load
    identity = {"model_fingerprint": model_fingerprint(model_path), "resolution": resolution, "crops": crops}
    log, written = BadInputLog(), 0
    for url, name in zip(tqdm(urls, desc="precompute", unit="shard", dynamic_ncols=True), names):
        written += _write_shard(url, os.path.join(out_dir, name), enc, log, identity, batch_size, seed)
    seconds = time.perf_counter() - start

    vae, text_encoder = enc.parts.vae.config, enc.parts.text_encoder.config
    manifest = {
        "model_path": str(Path(model_path).resolve()),
        **identity,
        "center_crop": crops == 1,
        "seed": seed,
        "dtype": dtype,
        "latents": "unscaled VAE posterior; train on (latent_mean + latent_std * randn) * vae_scaling_factor",
        **enc.shapes,
        "vae_scaling_factor": float(vae.scaling_factor),
        "text_hidden_size": int(text_encoder.hidden_size),
        "source": src_spec,
        "shards": names,
        "counts": {
            "samples_written": written,
            "samples_read": written + sum(log.counts.values()),
            "bad": log.counts,
            "bad_shards": log.shards,
        },
        "load_seconds": round(start - t0, 3),
        "seconds": round(seconds, 3),
        "samples_per_s": round(written / seconds, 2) if seconds > 0 else None,
        "device": device,
        "batch_size": batch_size,
    }
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


# --------------------------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------------------------


def main_precompute(argv: list[str]) -> int:
    """`sd-train precompute`: see the module docstring."""
    p = argparse.ArgumentParser(prog="sd-train precompute", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="diffusers SD folder (its VAE, text encoder, tokenizer are used)")
    p.add_argument("--src", required=True, help="input image shards: any data.train_shards spec")
    p.add_argument(
        "--out", required=True, help="output folder: one shard per input shard, same names, + precompute.json"
    )
    p.add_argument("--resolution", type=int, required=True, help="training resolution (data.resolution)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per encoder call (x crops images)")
    p.add_argument("--crops", type=int, default=1, help="1: center crop; K>1: K seeded random crops per sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the random crops")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", choices=list(DTYPES), default="float32", help="float32: bitwise-exact training; float16: half size"
    )
    a = p.parse_args(argv)
    try:
        m = precompute(a.model, a.src, a.out, a.resolution, a.batch_size, a.crops, a.seed, a.device, a.dtype)
    except (ValueError, ConfigError) as e:
        print(f"sd-train precompute: {e}")
        return 2
    bad = {k: v for k, v in m["counts"]["bad"].items() if v}
    print(
        f"wrote {m['counts']['samples_written']} samples in {len(m['shards'])} shards to {a.out} "
        f"({m['samples_per_s']} samples/s on {a.device}); bad input skipped: {bad or 'none'}"
    )
    return 0
