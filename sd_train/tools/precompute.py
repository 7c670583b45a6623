"""Precomputed latents: run the frozen VAE and text encoder once over a shard set, train from the result.

Why. SD training spends much of each step in the two frozen encoders: MosaicML report that
precomputing the latents and text embeddings made their SD2 training ~1.4x faster ("How We Trained
Stable Diffusion for Less than $50k, Part 3", databricks.com/blog/diffusion). The data are encoded
once here instead of once per epoch; the trainer then skips both encoders.

What is stored. One output shard per input shard, same base name, samples in the same order; per
key (no other members, and no image):
- `KEY.latent_mean.npy`, `KEY.latent_std.npy`: the VAE posterior N(mean, std^2), UNSCALED (the
  VAE's own output, before `scaling_factor`), shape [K, 4, h, w] with K crops (below).
- `KEY.text_embeds.npy`: the text encoder's last hidden state [77, D] of the caption (SDXL: the
  two encoders' penultimate hidden states, concatenated, [77, 2048], as training conditions on).
- SDXL only: `KEY.pooled_embeds.npy`, text_encoder_2's pooled projection [1280], and
  `KEY.geometry.npy`, int64 [K, 3, 2]: each crop's original (H, W), crop (top, left) and target
  (H, W), from which training builds the six micro-conditioning ids as it does for image shards.
- `KEY.txt`: the caption; `KEY.json`: the input's json, plus `key`, `caption` and, under
  `sd_train_precompute`, what the arrays depend on (model fingerprint, resolution, crops; SDXL
  shards add `family: sdxl`, and a run refuses shards of the other family).
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

Buckets. `--buckets generated|sdxl|HxW,HxW,...` (with `--bucket-max-aspect`, `--bucket-side-multiple`,
`--bucket-misfits`, as `data.buckets` and its fields) stores each sample at its aspect-ratio bucket:
the latents then have one shape per bucket ([K, 4, H/8, W/8] for bucket H x W), assigned and cropped
exactly as online training does (sd_train.data.buckets). The encoder batches group samples of one
bucket (a shard's samples are written in the order their batches fill, so grouped by bucket); a
misfit is skipped and counted per reason in the manifest's `filtered`, as training counts it. The
identity record lists the bucket set, and `check_precomputed` refuses a run whose `data.buckets`
resolves to another set; the training stream buckets precomputed samples by their stored shape.

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

Names. An output member is named after its input sample's key, which comes from the input tar's
member names: a key with a `..` part or an absolute path (`../../x.png`, `/etc/x.png`) would make
an output that writes outside its folder when unpacked, so such samples are skipped and counted as
`unsafe_name`, beside the training reader's bad-input categories.

Many processes. Under torchrun, `accelerate launch` or srun (`torchrun --nproc_per_node 8 -m
sd_train.cli precompute ...`), rank r encodes shards r, r + W, ... on its own GPU; rank 0 writes the
manifest with every process's throughput. Each shard is written to a temp file and renamed, then a
done marker (`.NAME.done.json`: the recipe it was made with and its counts) is written, so a re-run
on any number of processes skips the finished shards and redoes the rest; a changed recipe (model,
resolution, crops, seed, dtype, batch size) redoes them all.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import multiprocessing
import os
import random
import re
import sys
import tarfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Optional, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from sd_train.config import ConfigError, DataArgs, DistArgs, ModelArgs
from sd_train.config.launcher import read_launch_env
from sd_train.data.bad_input import BAD_CATEGORIES, BadInputLog, BadSample
from sd_train.data.buckets import MISFIT_REASONS, BucketSet, Misfit, bucket_name, bucket_set, pixel_factor
from sd_train.data.decode import (
    DecodedSample,
    ImageTransform,
    decode_image_sample,
    stack_pixels,
)
from sd_train.data.precomputed import (
    GEOMETRY,
    GEOMETRY_ROWS,
    IDENTITY,
    LATENT_MEAN,
    LATENT_STD,
    POOLED_EMBEDS,
    TEXT_EMBEDS,
    model_fingerprint,
)
from sd_train.data.sources import expand_sources
from sd_train.data.tar import RawSample, add_member, read_shards
from sd_train.errors import OutputRefusedError
from sd_train.model.parts import encode_text, load_sd_parts, uint8_to_unit_range
from sd_train.parallel.process_group import all_gather_object, destroy, init_distributed
from sd_train.preflight import vae_downsampling_factor

T = TypeVar("T")
MANIFEST = "precompute.json"
UNSAFE_NAME = "unsafe_name"
CATEGORIES = (*BAD_CATEGORIES, UNSAFE_NAME)
"""What precompute counts: the training reader's bad input, and input keys unfit for output names."""
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


def safe_key(key: str) -> bool:
    """Whether a sample key may name output members: relative, with no `..` part."""
    path = PurePosixPath(key)
    return bool(key) and not path.is_absolute() and ".." not in path.parts


def _safe_samples(raws: Iterator[RawSample], log: BadInputLog) -> Iterator[RawSample]:
    """`raws` without the samples whose keys are not `safe_key` (counted `unsafe_name`), before any decode."""
    for raw in raws:
        if safe_key(raw.key):
            yield raw
        else:
            log.add(UNSAFE_NAME, raw.shard)


def new_log() -> BadInputLog:
    return BadInputLog(dict.fromkeys(CATEGORIES, 0))


# --------------------------------------------------------------------------------------------
# Writing.
# --------------------------------------------------------------------------------------------


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _meta(raw: RawSample, caption: str, identity: dict) -> bytes:
    ours = {"key": raw.key, "caption": caption, IDENTITY: identity}
    try:
        meta = json.loads(raw.members["json"]) if "json" in raw.members else {}
        meta = (meta if isinstance(meta, dict) else {}) | ours
        return json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()
    except (ValueError, RecursionError):
        # An unreadable json (invalid, or nested past the parser's recursion limit) is not worth
        # dropping the sample for; training ignores it. Our own record is still written.
        return json.dumps(ours, ensure_ascii=False, sort_keys=True).encode()


class _Encoder:
    """Owns the frozen VAE and text encoder(s) of one precompute run and the output dtype."""

    def __init__(self, model_path: str, device: torch.device, dtype: np.dtype) -> None:
        # The trainer's own loader, so the encoders are set up exactly as online training sets them;
        # loaded on CPU, then only the encoders move. The UNet is never run here: it stays on the
        # meta device, with no memory.
        self.parts = load_sd_parts(ModelArgs(pretrained_path=model_path), torch.device("cpu"), seed=0, load_unet=False)
        for name in ("vae", *self.parts.text_encoder_names):
            self.parts.frozen(name).to(device)
        self.device, self.dtype = device, dtype
        self.shapes: dict[str, list[int]] = {}
        """Per-sample shapes of what was written: latent [K, C, h, w], text_embeds [L, D] (SDXL: pooled [P])."""

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, captions: list[str], crops: int) -> tuple[np.ndarray, ...]:
        """uint8 [N*K,3,R,R] (K crops per sample, adjacent) -> mean, std [N,K,4,h,w], text [N,77,D]
        and pooled [N,P] (None for SD)."""
        dist = self.parts.vae.encode(uint8_to_unit_range(pixels.to(self.device))).latent_dist
        cond = encode_text(self.parts, captions, self.device)

        def out(t: torch.Tensor) -> np.ndarray:
            return t.float().cpu().numpy().astype(self.dtype, copy=False)

        mean, std = (out(t).reshape(-1, crops, *t.shape[1:]) for t in (dist.mean, dist.std))
        text = cond.text_embeds
        self.shapes = {"latent_shape": list(mean.shape[1:]), "text_embeds_shape": list(text.shape[1:])}
        if cond.pooled is not None:
            self.shapes["pooled_embeds_shape"] = list(cond.pooled.shape[1:])
        return mean, std, out(text), None if cond.pooled is None else out(cond.pooled)


def _geometry(crops: list[DecodedSample]) -> np.ndarray:
    """int64 [K, 3, 2]: each crop's Geometry rows, in GEOMETRY_ROWS order."""
    return np.array([[getattr(d.geometry, row) for row in GEOMETRY_ROWS] for d in crops], dtype=np.int64)


def _crops_of(
    raw: RawSample, resolution: int, crops: int, seed: int, buckets: Optional[BucketSet] = None
) -> list[DecodedSample]:
    """The sample as training reads it: the center crop, or `crops` seeded random crops, of the
    square resolution or of the sample's bucket. Raises BadSample or Misfit."""
    if crops == 1:
        return [decode_image_sample(raw, ImageTransform(resolution, center_crop=True, buckets=buckets), None)]
    tf = ImageTransform(resolution, center_crop=False, buckets=buckets)
    return [decode_image_sample(raw, tf, random.Random(f"{seed}/{raw.key}/{k}")) for k in range(crops)]


Decoded = tuple[RawSample, "list[DecodedSample] | str"]
"""A raw sample with its decoded crops, or with the bad-input category (or bucket misfit reason) it
was dropped for."""

DECODE_CHUNK = 8  # samples per worker task: enough to amortise the pickling, small enough to keep order cheap


def _decode_chunk(
    raws: list[RawSample], resolution: int, crops: int, seed: int, buckets: Optional[BucketSet] = None
) -> list[Decoded]:
    """Decode a run of samples (in a worker process, or inline with no workers). A bad sample comes
    back with its category (a misfit with its reason) instead of crops, in its place, so the order
    is kept."""
    out: list[Decoded] = []
    for raw in raws:
        try:
            out.append((raw, _crops_of(raw, resolution, crops, seed, buckets)))
        except BadSample as e:
            out.append((raw, e.category))
        except Misfit as e:
            out.append((raw, e.reason))
    return out


class Decoder:
    """Owns the decode workers of one precompute run: `workers` processes (0: decode inline) fed
    chunks of raw samples read once by this process, with at most `2 * workers` chunks in flight,
    and results handed back in input order, so the output bytes do not depend on `workers`.

    Spawned, not forked: under torchrun the parent has initialised CUDA before the pool starts, and a
    forked child of a CUDA process is unusable. The workers import only the decoding code."""

    def __init__(
        self, workers: int, resolution: int, crops: int, seed: int, buckets: Optional[BucketSet] = None
    ) -> None:
        self.workers, self.args = workers, (resolution, crops, seed, buckets)
        self.pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 0 else None

    def decode(self, raws: Iterator[RawSample]) -> Iterator[Decoded]:
        def chunks() -> Iterator[list[RawSample]]:
            chunk: list[RawSample] = []
            for raw in raws:
                chunk.append(raw)
                if len(chunk) == DECODE_CHUNK:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk

        if self.pool is None:
            for chunk in chunks():
                yield from _decode_chunk(chunk, *self.args)
            return
        pending: collections.deque = collections.deque()
        for chunk in chunks():
            pending.append(self.pool.apply_async(_decode_chunk, (chunk, *self.args)))
            if len(pending) >= 2 * self.workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def _write_shard(
    url: str,
    out_path: str,
    enc: _Encoder,
    log: BadInputLog,
    identity: dict,
    batch_size: int,
    decoder: Decoder,
    counts: dict[str, int],
) -> int:
    """Encode one input shard into `out_path` (temp file, then rename); returns the samples written.
    `counts` gains the samples written per bucket (`HxW`) and the misfits skipped per reason."""
    crops = identity["crops"]
    tmp, written = out_path + ".tmp", 0
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        pending: dict[tuple[int, int], list[tuple[RawSample, list[DecodedSample]]]] = {}  # by training size

        def flush(size: tuple[int, int]) -> None:
            nonlocal written
            group = pending.pop(size, [])
            if not group:
                return
            pixels = stack_pixels([d for _, ds in group for d in ds], size)
            captions = [ds[0].caption for _, ds in group]
            mean, std, text, pooled = enc.encode(pixels, captions, crops)
            for i, (raw, ds) in enumerate(group):
                add_member(tar, f"{raw.key}.{LATENT_MEAN}", _npy(mean[i]))
                add_member(tar, f"{raw.key}.{LATENT_STD}", _npy(std[i]))
                add_member(tar, f"{raw.key}.{TEXT_EMBEDS}", _npy(text[i]))
                if pooled is not None:  # SDXL: the pooled embedding and each crop's geometry
                    add_member(tar, f"{raw.key}.{POOLED_EMBEDS}", _npy(pooled[i]))
                    add_member(tar, f"{raw.key}.{GEOMETRY}", _npy(_geometry(ds)))
                add_member(tar, f"{raw.key}.txt", ds[0].caption.encode())
                add_member(tar, f"{raw.key}.json", _meta(raw, ds[0].caption, identity))
            written += len(group)
            counts[bucket_name(size)] = counts.get(bucket_name(size), 0) + len(group)

        # Batches never span shards, so with shuffle_buffer=0 and micro_batch_size == batch_size a
        # training batch is a precompute batch, and the VAE sees the same batch composition (one
        # training size: with buckets a batch holds one bucket, so the composition differs).
        for raw, decoded in decoder.decode(_safe_samples(read_shards([url], log), log)):
            if decoded in MISFIT_REASONS:
                counts[decoded] = counts.get(decoded, 0) + 1  # type: ignore[index]
                continue
            if isinstance(decoded, str):
                log.add(decoded, raw.shard)
                continue
            size = decoded[0].geometry.target_size
            pending.setdefault(size, []).append((raw, decoded))
            if len(pending[size]) == batch_size:
                flush(size)
        for size in list(pending):
            flush(size)
    os.replace(tmp, out_path)
    return written


def check_out_apart_from_inputs(out_dir: str, urls: list[str]) -> None:
    """Refuse an output folder that is the folder of an input shard, lies inside it or contains it
    (compared as resolved paths, and with `os.path.samefile` for the same folder reached another
    way, such as a bind mount): the outputs take the inputs' names, so `--out` equal to `--src`
    would overwrite the image shards, and a folder nested in the other mixes the two sets. Remote
    and `pipe:` inputs are not local folders and are not compared."""
    out = Path(out_dir).resolve()
    for url in urls:
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", url):  # pipe:, http(s)://, s3:// ...
            continue
        folder = Path(url).resolve().parent
        if out == folder or (out.is_dir() and folder.is_dir() and os.path.samefile(out, folder)):
            relation = "the folder of"
        elif folder in out.parents:
            relation = "inside the folder of"
        elif out in folder.parents:
            relation = "a folder above"
        else:
            continue
        raise OutputRefusedError(
            f"--out {out_dir} is {relation} the input shard {url}: precompute writes its shards under the "
            f"inputs' names and would overwrite them or mix with them. Write to a folder of its own, e.g. "
            f"{folder.parent / (folder.name + '-latents')}"
        )


def done_marker(out_dir: str, name: str) -> str:
    """The marker written after shard `name` is complete: what it was made with, and its counts."""
    return os.path.join(out_dir, f".{name}.done.json")


def _done(out_dir: str, name: str, recipe: dict) -> dict | None:
    """The marker of a shard finished earlier with this exact recipe, or None (then it is redone)."""
    path, marker = done_marker(out_dir, name), None
    if os.path.isfile(path) and os.path.isfile(os.path.join(out_dir, name)):
        try:
            with open(path) as f:
                marker = json.load(f)
        except ValueError:
            return None
    return marker if marker is not None and marker.get("recipe") == recipe else None


class PrecomputeError(RuntimeError):
    """A rank failed; every rank stops with this, naming the rank, the shard and the error."""


def _agreed(gather: Callable[[Any], list[Any]], where: str, work: Callable[..., T], *args: Any) -> T:
    """`work(*args)`, then an agreement of every rank (a collective: each rank calls it as often): if
    any rank's work raised, every rank raises PrecomputeError naming it. The failing rank prints
    its traceback first. A rank that failed alone used to leave the others waiting in the final
    gather for `dist.timeout_s`."""
    result, failure = None, None
    try:
        result = work(*args)
    except Exception as e:  # noqa: BLE001 -- any failure must reach the other ranks
        traceback.print_exc()
        failure = f"{where}: {type(e).__name__}: {e}"
    failures = [f for f in gather(failure) if f]
    if failures:
        raise PrecomputeError(f"stopped on every rank after a failure: {'; '.join(failures)}")
    return result  # type: ignore[return-value]


def _shard(
    url: str | None,
    name: str | None,
    out_dir: str,
    recipe: dict,
    enc: _Encoder,
    identity: dict,
    batch_size: int,
    decoder: Decoder,
) -> tuple[dict, bool] | None:
    """(the done marker of shard `name`, whether it was encoded now rather than found done), or
    None with no shard (`url` None: this rank's last round)."""
    if url is None or name is None:
        return None
    marker = _done(out_dir, name, recipe)
    if marker is not None:
        return marker, False
    shard_log, shard_counts = new_log(), {}
    n = _write_shard(url, os.path.join(out_dir, name), enc, shard_log, identity, batch_size, decoder, shard_counts)
    marker = {"recipe": recipe, "written": n, "bad": shard_log.counts, "bad_shards": shard_log.shards}
    marker["counts"] = shard_counts  # per bucket written, per misfit reason skipped
    tmp = done_marker(out_dir, name) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(marker, f)
    os.replace(tmp, done_marker(out_dir, name))
    return marker, True


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
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[Any], list[Any]] = lambda part: [part],
    workers: int = 0,
    allow_pipe: bool = False,
    buckets: Optional[BucketSet] = None,
) -> dict[str, Any]:
    """Encode every sample of `src_spec` (any `expand_sources` spec) into shards in `out_dir`.

    With `world_size` processes, rank r encodes shards r, r + W, ... (`gather` collects every
    rank's counts, and after each shard whether any rank failed; rank 0 writes the manifest). A
    rank that fails stops every rank with PrecomputeError. Each finished shard leaves a done marker with the
    recipe it was made with, so a re-run, on any number of processes, skips it and redoes only the
    missing shards. Bad input is skipped and counted by the training reader's categories. Images are
    decoded in `workers` worker processes (0: in this one) while this process reads and encodes;
    the output bytes are the same for any `workers`. `pipe:` URLs in `src_spec` (or in a list file
    it names) only with `allow_pipe`. `buckets`: store each sample at its aspect-ratio bucket (see
    the module docstring). Returns the manifest, also written to `out_dir/precompute.json`.
    """
    if resolution <= 0:
        raise ValueError(f"resolution={resolution} must be positive")
    if crops < 1 or batch_size < 1 or workers < 0:
        raise ValueError(f"crops={crops} and batch_size={batch_size} must be >= 1, workers={workers} >= 0")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {list(DTYPES)}")
    urls = [u for s in expand_sources(src_spec, allow_pipe) for u in s.urls]
    if not urls:
        raise ValueError(f"no shards in {src_spec!r}")
    check_out_apart_from_inputs(out_dir, urls)
    names = [output_name(u) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError(f"{src_spec!r} holds two shards of the same base name; outputs would overwrite each other")
    factor = vae_downsampling_factor(model_path)
    if resolution % factor:
        raise ValueError(f"resolution={resolution} must be a multiple of {factor}, the VAE's downsampling factor")
    os.makedirs(out_dir, exist_ok=True)

    t0 = time.perf_counter()
    decoder = Decoder(workers, resolution, crops, seed, buckets)  # before the encoder: the workers start meanwhile
    try:
        enc, identity = _agreed(
            gather,
            f"rank {rank} loading {model_path}",
            lambda: (
                _Encoder(model_path, torch.device(device), np.dtype(DTYPES[dtype])),
                {"model_fingerprint": model_fingerprint(model_path), "resolution": resolution, "crops": crops},
            ),
        )
        start = time.perf_counter()  # throughput counts reading + encoding + writing, not the model load
        if enc.parts.family != "sd":  # SD shards keep the identity they always had
            identity["family"] = enc.parts.family
        if buckets is not None:  # check_precomputed holds data.buckets to the set
            identity |= {"buckets": [list(b) for b in buckets.sizes], "bucket_misfits": buckets.misfits}
        # Everything the bytes of a shard depend on (the VAE is not batch-invariant: batch size counts).
        recipe = {**identity, "seed": seed, "dtype": dtype, "batch_size": batch_size}
        log, written, encoded, skipped, counts = new_log(), 0, 0, 0, collections.Counter()
        mine = list(zip(urls, names))[rank::world_size]
        bar = tqdm(total=len(mine), desc=f"precompute rank {rank}", unit="shard", dynamic_ncols=True, disable=rank > 0)
        # The same number of rounds on every rank, each ending in an agreement: a rank that fails
        # stops every rank after the shard each is on, instead of leaving them in the final gather.
        for i in range(-(-len(urls) // world_size)):
            url, name = mine[i] if i < len(mine) else (None, None)
            where = f"rank {rank} on {url}"
            done = _agreed(gather, where, _shard, url, name, out_dir, recipe, enc, identity, batch_size, decoder)
            if done is None:  # this rank has no shard left this round
                continue
            bar.update()
            marker, fresh = done
            encoded, skipped = encoded + (marker["written"] if fresh else 0), skipped + (not fresh)
            written += marker["written"]
            counts.update(marker.get("counts", {}))
            for category, count in marker["bad"].items():
                log.counts[category] += count
            log.shards.extend(s for s in marker["bad_shards"] if s not in log.shards)
        bar.close()
        seconds = time.perf_counter() - start
    finally:
        decoder.close()
    part = {
        "rank": rank,
        "shards": len(mine),
        "shards_skipped": skipped,
        "samples_written": written,
        "samples_encoded": encoded,
        "bad": log.counts,
        "bad_shards": log.shards,
        "shapes": enc.shapes,
        "counts": dict(counts),
        "decode_workers": workers,
        "load_seconds": round(start - t0, 3),
        "seconds": round(seconds, 3),
        "samples_per_s": round(encoded / seconds, 2) if seconds > 0 else None,
    }
    parts = gather(part)
    written = sum(p["samples_written"] for p in parts)
    bad = {c: sum(p["bad"][c] for p in parts) for c in log.counts}
    shapes = next((p["shapes"] for p in parts if p["shapes"]), {})
    if buckets is not None:
        shapes = _bucket_shapes(
            buckets, shapes, factor, sum((collections.Counter(p["counts"]) for p in parts), collections.Counter())
        )
    vae = enc.parts.vae.config
    manifest = {
        "model_path": str(Path(model_path).resolve()),
        **identity,
        "center_crop": crops == 1,
        "seed": seed,
        "dtype": dtype,
        "latents": "unscaled VAE posterior; train on (latent_mean + latent_std * randn) * vae_scaling_factor",
        **shapes,
        "vae_scaling_factor": float(vae.scaling_factor),
        "text_hidden_size": enc.parts.text_width,
        "source": src_spec,
        "shards": names,
        "counts": {
            "samples_written": written,
            "samples_read": written + sum(bad.values()),
            "bad": bad,
            "bad_shards": sorted({s for p in parts for s in p["bad_shards"]}),
        },
        "load_seconds": max(p["load_seconds"] for p in parts),
        "seconds": max(p["seconds"] for p in parts),
        "samples_per_s": round(sum(p["samples_encoded"] for p in parts) / max(p["seconds"] for p in parts), 2)
        if max(p["seconds"] for p in parts) > 0
        else None,
        "processes": [
            {k: p[k] for k in ("rank", "shards", "shards_skipped", "samples_encoded", "samples_per_s")} for p in parts
        ],
        "device": device,
        "batch_size": batch_size,
        "decode_workers": workers,
    }
    if rank == 0:
        with open(os.path.join(out_dir, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
    return manifest


def _bucket_shapes(buckets: BucketSet, shapes: dict, factor: int, counts: collections.Counter) -> dict[str, Any]:
    """The manifest's shapes with buckets: the latent shape [K, C, H/f, W/f] of every bucket instead
    of one, the samples written per bucket and the misfits skipped per reason."""
    k, c = shapes.get("latent_shape", [0, 0])[:2]
    return {
        "latent_shapes": {bucket_name(b): [k, c, b[0] // factor, b[1] // factor] for b in buckets.sizes},
        "text_embeds_shape": shapes.get("text_embeds_shape"),
        "bucket_counts": {bucket_name(b): counts.get(bucket_name(b), 0) for b in buckets.sizes},
        "filtered": {r: counts.get(r, 0) for r in buckets.filter_reasons()},
    }


# --------------------------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------------------------


def default_workers(device: str) -> int:
    """Decode workers when `--workers` is not given. On a GPU the encoders run there and the host's
    cores are free to decode ahead. On CPU the encoders need those cores themselves: on the 2-core
    box, 1,849 72 px PNGs through the tiny VAE at 64 px went at 70 and 66 samples/s decoded inline
    against 56 and 49 with one worker and 46 and 56 with two (interleaved runs)."""
    return 4 if device.startswith("cuda") else 0


def _buckets_from_args(a: argparse.Namespace) -> Optional[BucketSet]:
    """The bucket set of `--buckets` and its options, validated as the data.buckets config is."""
    spec: Any = a.buckets
    if spec not in ("none", "generated", "sdxl"):
        try:
            spec = [[int(n) for n in item.lower().split("x")] for item in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"--buckets={a.buckets!r}: use none, generated, sdxl or a list like 512x768,768x512"
            ) from None
    d = DataArgs(
        resolution=a.resolution, buckets=spec, bucket_max_aspect=a.bucket_max_aspect,
        bucket_side_multiple=a.bucket_side_multiple, bucket_misfits=a.bucket_misfits,
    )  # fmt: skip
    d.validate()
    if d.buckets == "none":  # the UNet's factor only matters to buckets (a folder may hold no unet/)
        return None
    return bucket_set(d, pixel_factor(a.model))


def main_precompute(argv: list[str]) -> int:
    """`sd-train precompute`: see the module docstring."""
    p = argparse.ArgumentParser(prog="sd-train precompute", description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", required=True, help="diffusers SD or SDXL folder (its VAE, text encoder(s), tokenizer(s) are used)"
    )
    p.add_argument("--src", required=True, help="input image shards: any data.train_shards spec")
    p.add_argument(
        "--out", required=True, help="output folder: one shard per input shard, same names, + precompute.json"
    )
    p.add_argument("--resolution", type=int, required=True, help="training resolution (data.resolution)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per encoder call (x crops images)")
    p.add_argument("--crops", type=int, default=1, help="1: center crop; K>1: K seeded random crops per sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the random crops")
    p.add_argument(
        "--device", default=None, help="default: this process's GPU under torchrun/accelerate/srun, else cuda or cpu"
    )
    p.add_argument(
        "--dtype", choices=list(DTYPES), default="float32", help="float32: bitwise-exact training; float16: half size"
    )
    p.add_argument(
        "--buckets",
        default="none",
        help="aspect-ratio buckets, as data.buckets: none (square), generated, sdxl, or a list HxW,HxW,...",
    )
    p.add_argument("--bucket-max-aspect", type=float, default=4.0, help="as data.bucket_max_aspect")
    p.add_argument("--bucket-side-multiple", type=int, default=None, help="as data.bucket_side_multiple")
    p.add_argument("--bucket-misfits", choices=["resize", "filter"], default="resize", help="as data.bucket_misfits")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decode worker processes per process (0: decode inline; default 4 on a GPU, 0 on CPU); same bytes",
    )
    p.add_argument(
        "--allow-pipe", action="store_true", help="let `pipe:` URLs in --src (or its list files) run their commands"
    )
    a = p.parse_args(argv)
    try:
        launch = read_launch_env()
    except ConfigError as e:
        print(f"sd-train precompute: error: {e}", file=sys.stderr)
        return 2
    try:
        buckets = _buckets_from_args(a)
    except (ValueError, ConfigError) as e:
        print(f"sd-train precompute: error: {e}", file=sys.stderr)
        return 2
    info = init_distributed(DistArgs()) if launch.world_size > 1 else None
    device = a.device or (str(info.device) if info else "cuda" if torch.cuda.is_available() else "cpu")
    try:
        m = precompute(
            a.model, a.src, a.out, a.resolution, a.batch_size, a.crops, a.seed, device, a.dtype,
            rank=launch.rank, world_size=launch.world_size, gather=all_gather_object if info else lambda part: [part],
            workers=a.workers if a.workers is not None else default_workers(device), buckets=buckets,
            allow_pipe=a.allow_pipe,
        )  # fmt: skip
    except (ValueError, ConfigError) as e:
        print(f"sd-train precompute: error: {e}", file=sys.stderr)
        return 2
    except PrecomputeError as e:
        print(f"sd-train precompute: {e}", file=sys.stderr)
        return 1
    finally:
        if info is not None:
            destroy()
    if launch.rank > 0:
        return 0
    bad = {k: v for k, v in m["counts"]["bad"].items() if v}
    per_process = ", ".join(f"rank {p['rank']} {p['samples_per_s']}" for p in m["processes"])
    skipped = sum(p["shards_skipped"] for p in m["processes"])
    print(
        f"wrote {m['counts']['samples_written']} samples in {len(m['shards'])} shards to {a.out} "
        f"({m['samples_per_s']} samples/s on {device}; per process: {per_process}; {skipped} shards already done); "
        f"bad input skipped: {bad or 'none'}"
    )
    return 0
