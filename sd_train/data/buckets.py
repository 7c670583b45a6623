"""Aspect-ratio buckets (`data.buckets`): the bucket sets, the model's pixel factor, and the bucket an
image of a given size trains in. Torch-free: preflight builds and checks the set before anything starts.

A bucket is a training size (H, W) in pixels. Every side is a multiple of the model's pixel factor,
the VAE's downsampling times the UNet's (`pixel_factor`): 8 x 8 = 64 for SD 1/2, 8 x 4 = 32 for
SDXL, 2 x 2 = 4 for the tiny test model. Then the latent passes the UNet's down and up blocks with
skip connections of matching sizes.

The sets (`bucket_set`):
- `generated`: for each short side S, a multiple m of the pixel factor (`data.bucket_side_multiple`,
  default the factor itself), the long side L is the largest multiple of m with S x L <=
  `data.resolution`²; the pair is kept when L / S <= `data.bucket_max_aspect`, with its transpose.
  Every bucket's area is at most resolution², so no bucket needs more activation memory than the
  square run (kohya's `make_bucket_resolutions` builds its set the same way).
- `sdxl`: SDXL's nine standard buckets of about 1024² pixels (SDXL_BUCKETS, the four shapes and
  their transposes plus the square); needs `data.resolution=1024`.
- an explicit list `[[H, W], ...]`.

Assignment (`BucketSet.assign`): the bucket nearest in log aspect ratio, |log(w/h) - log(W/H)|,
compared exactly with integer cross products (no float ties), a tie going to the first bucket in
the set's order (by aspect, tall to wide). Misfits, judged from the size alone (before any decode):
an aspect outside [1/r, r] (r = `data.bucket_max_aspect`) is `bucket_aspect`; an area below the
smallest bucket's is `bucket_too_small`. With `data.bucket_misfits=resize` (the default) they train
in their nearest bucket, resized up or cropped harder; with `filter` they are dropped and counted
per reason like `data.filters` (never bad input).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from sd_train.config.schema import SDXL_RESOLUTION  # noqa: F401 (the named set's resolution, checked there)
from sd_train.errors import ConfigError

Size = tuple[int, int]  # (height, width) in pixels, the order of SDXL's micro-conditioning
Misfits = Literal["resize", "filter"]
MISFIT_REASONS = ("bucket_aspect", "bucket_too_small")

# SDXL's standard buckets, (H, W): the square and four shapes with their transposes, all about
# 1024² pixels with sides in multiples of 64 (SDXL report, arXiv 2307.01952, appendix; the sizes
# Stability lists for SDXL 1.0 inference).
SDXL_BUCKETS: tuple[Size, ...] = (
    (1024, 1024),
    (1152, 896),
    (896, 1152),
    (1216, 832),
    (832, 1216),
    (1344, 768),
    (768, 1344),
    (1536, 640),
    (640, 1536),
)


class Misfit(Exception):
    """A sample that fits no bucket (`data.bucket_misfits=filter`); `reason` is one of MISFIT_REASONS."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def bucket_name(size: Size) -> str:
    """`HxW`, the name in metrics (`data/bucket_512x768_samples`), logs and the data state."""
    return f"{size[0]}x{size[1]}"


def _wider(a: Size, b: Size) -> bool:
    """Whether bucket a is wider (W/H larger) than b, exactly."""
    return a[1] * b[0] > b[1] * a[0]


@dataclass(frozen=True)
class BucketSet:
    """Owns the bucket sizes (sorted by aspect, tall to wide), the aspect bound and the misfit policy;
    `assign` picks an image's bucket from its size."""

    sizes: tuple[Size, ...]
    max_aspect: float = 4.0
    misfits: Misfits = "resize"

    @classmethod
    def of(
        cls, sizes: list[Size] | tuple[Size, ...], max_aspect: float = 4.0, misfits: Misfits = "resize"
    ) -> BucketSet:
        unique = sorted({(int(h), int(w)) for h, w in sizes}, key=lambda s: (s[1] / s[0], s[0]))
        if not unique:
            raise ValueError("a bucket set needs at least one bucket")
        return cls(tuple(unique), float(max_aspect), misfits)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(bucket_name(s) for s in self.sizes)

    def index(self, size: Size) -> Optional[int]:
        """The bucket of exactly this (H, W), or None."""
        try:
            return self.sizes.index((int(size[0]), int(size[1])))
        except ValueError:
            return None

    def largest(self) -> int:
        """The bucket of the largest area (the activation peak); the first of equals."""
        areas = [h * w for h, w in self.sizes]
        return areas.index(max(areas))

    def nearest(self, height: int, width: int) -> int:
        """The bucket nearest in log aspect ratio (ties: the first). Exact: for a bucket (H, W) the
        distance is log(max(p, q) / min(p, q)) with p = w * H and q = h * W, and two such ratios
        compare by cross-multiplying integers."""
        best, best_ratio = 0, (0, 0)
        for i, (bh, bw) in enumerate(self.sizes):
            p, q = width * bh, height * bw
            ratio = (max(p, q), min(p, q))
            if i == 0 or ratio[0] * best_ratio[1] < best_ratio[0] * ratio[1]:
                best, best_ratio = i, ratio
        return best

    def misfit(self, height: int, width: int) -> Optional[str]:
        """Why an image of this size fits no bucket (a MISFIT_REASONS entry), or None."""
        if width > self.max_aspect * height or height > self.max_aspect * width:
            return "bucket_aspect"
        if height * width < min(h * w for h, w in self.sizes):
            return "bucket_too_small"
        return None

    def assign(self, height: int, width: int) -> int:
        """The bucket an image of (height, width) trains in. Raises Misfit under `misfits=filter`."""
        if height <= 0 or width <= 0:
            raise Misfit("bucket_too_small")
        reason = self.misfit(height, width)
        if reason is not None and self.misfits == "filter":
            raise Misfit(reason)
        return self.nearest(height, width)

    def filter_reasons(self) -> tuple[str, ...]:
        """The `filtered` counter names this set adds (none when misfits are resized)."""
        return MISFIT_REASONS if self.misfits == "filter" else ()

    def describe(self, gflops: Optional[list[float]] = None) -> str:
        """The startup line: the set, the largest bucket (the activation peak), the aspect range and
        misfit policy, and each bucket's forward+backward GFLOP per image when counted."""
        big = self.sizes[self.largest()]
        misfits = "filtered" if self.misfits == "filter" else "resized into the nearest bucket"
        line = (
            f"{len(self.sizes)} buckets (H x W): {', '.join(self.names)}; largest {bucket_name(big)} "
            f"({big[0] * big[1]:,} px: it sets the activation peak); aspect range 1:{self.max_aspect:g} to "
            f"{self.max_aspect:g}:1, misfits {misfits}"
        )
        if gflops:
            line += "; GFLOP per image (fwd+bwd): " + ", ".join(f"{n} {g:.3g}" for n, g in zip(self.names, gflops))
        return line


def generate_buckets(resolution: int, multiple: int, max_aspect: float) -> list[Size]:
    """The `generated` set: see the module docstring. Sorted (H, W) pairs, possibly empty."""
    area, sizes = resolution * resolution, set()
    short = multiple
    while short * short <= area:
        long = area // short // multiple * multiple
        if long >= short and long <= max_aspect * short:
            sizes |= {(short, long), (long, short)}
        short += multiple
    return sorted(sizes)


# ------------------------------------------------------------------------------ the model's factor


def downsampling_factor(model_path: str, part: str) -> int:
    """2 ** (len(block_out_channels) - 1) from `<model_path>/<part>/config.json`: the VAE's pixels per
    latent (every encoder block but the last halves the image), or the UNet's own downsampling
    (every down block but the last halves the latent). ConfigError if it cannot be read."""
    path = Path(model_path) / part / "config.json"
    try:
        channels = json.loads(path.read_text())["block_out_channels"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"model.pretrained_path={model_path!r}: cannot read block_out_channels from {path} ({e}); "
            "it must be a diffusers Stable Diffusion folder"
        ) from e
    return 2 ** (len(channels) - 1)


def pixel_factor(model_path: str) -> int:
    """Pixels per step of a bucket side: the VAE factor times the UNet's downsampling (64 for SD)."""
    return downsampling_factor(model_path, "vae") * downsampling_factor(model_path, "unet")


# ------------------------------------------------------------------------------ from the config


def bucket_set(data: Any, factor: int) -> Optional[BucketSet]:
    """The run's BucketSet from `data` (a DataArgs) and the model's pixel factor, or None for
    `data.buckets=none`. Raises ConfigError naming the field when a side is not a multiple of the
    factor, a listed bucket lies outside the aspect range, or nothing is generated."""
    spec, r = data.buckets, data.bucket_max_aspect
    if spec == "none":
        return None
    if spec == "generated":
        multiple = data.bucket_side_multiple or factor
        if multiple % factor:
            raise ConfigError(
                f"data.bucket_side_multiple={multiple} must be a multiple of {factor}, the model's pixel factor "
                f"(VAE x UNet downsampling): use {max(factor, multiple // factor * factor)} or unset it"
            )
        sizes = generate_buckets(data.resolution, multiple, r)
        if not sizes:
            raise ConfigError(
                f"data.buckets=generated: no bucket of sides in multiples of {multiple} with area <= "
                f"data.resolution²={data.resolution}² and aspect <= data.bucket_max_aspect={r:g}: raise "
                "data.resolution or data.bucket_max_aspect"
            )
        return BucketSet.of(sizes, r, data.bucket_misfits)
    sizes = list(SDXL_BUCKETS) if spec == "sdxl" else [(int(h), int(w)) for h, w in spec]
    off = [s for s in sizes if s[0] % factor or s[1] % factor]
    if off:
        h, w = off[0]
        raise ConfigError(
            f"data.buckets: {bucket_name(off[0])} has a side that is not a multiple of {factor}, the model's pixel "
            f"factor (VAE x UNet downsampling, from model.pretrained_path): e.g. "
            f"{max(factor, round(h / factor) * factor)}x{max(factor, round(w / factor) * factor)}"
        )
    wide = [s for s in sizes if max(s) > r * min(s)]
    if wide:
        raise ConfigError(
            f"data.buckets: {bucket_name(wide[0])} lies outside data.bucket_max_aspect={r:g}: raise "
            "data.bucket_max_aspect or drop the bucket"
        )
    return BucketSet.of(sizes, r, data.bucket_misfits)
