"""Decoding one raw sample into training pixels: caption check, PIL decode, resize/crop/flip, and
the geometry SDXL's micro-conditioning reads. The pixels stay uint8; the VAE's [-1, 1] input range
is the model's business (sd_train.model.parts.uint8_to_unit_range)."""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from sd_train.config.schema import parse_caption_key
from sd_train.data.bad_input import BadSample
from sd_train.data.tar import RawSample

IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "webp")


@dataclass(frozen=True)
class ImageTransform:
    """Owns the image geometry: shorter side to `resolution`, then a square crop, optional flip."""

    resolution: int
    center_crop: bool = True
    random_flip: bool = False

    @property
    def uses_rng(self) -> bool:
        return not self.center_crop or self.random_flip


@dataclass(frozen=True)
class Geometry:
    """Where a training image came from, as SDXL's micro-conditioning states it (arXiv 2307.01952,
    section 2.2), every pair in (height, width) / (top, left) order, the order of the released
    weights' `add_time_ids`:

    - `original_size`: the decoded image before any resize;
    - `crop_top_left`: the crop's corner in the resized image, as seen in the image the model is
      shown: after a horizontal flip the crop's left edge is measured from the flipped image's left
      (diffusers #6234, fixed in PR #6547);
    - `target_size`: the training image.

    Every path computes it (SD1/SD2 ignore it), so a sample carries it whatever model trains on it."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]


@dataclass
class DecodedSample:
    """A usable sample: HWC uint8 RGB pixels (resolution x resolution), caption, key, and where the
    pixels came from (`geometry`)."""

    key: str
    pixels: np.ndarray
    caption: str
    geometry: Geometry


@dataclass(frozen=True)
class CaptionSource:
    """Owns where captions come from (`data.caption_key`): the `.txt` member and/or `.json` fields.

    `resolve` puts the chosen caption in the sample's `txt` member, so every decoder reads one
    place and the bad-input categories stay those of a `.txt` (see `caption_of`).
    """

    fields: tuple[str, ...] = ("txt",)

    @classmethod
    def from_config(cls, caption_key: str) -> CaptionSource:
        return cls(parse_caption_key(caption_key))

    @property
    def uses_rng(self) -> bool:
        return len(self.fields) > 1

    def _candidates(self, raw: RawSample) -> list[bytes]:
        meta: dict = {}
        if any(f.startswith("json:") for f in self.fields) and "json" in raw.members:
            try:
                loaded = json.loads(raw.members["json"])
            except (ValueError, RecursionError):  # invalid, or nested past the parser's recursion limit
                loaded = {}  # an unreadable json holds no caption: missing_caption, if nothing else does
            meta = loaded if isinstance(loaded, dict) else {}
        found = []
        for f in self.fields:
            if f == "txt":
                if "txt" in raw.members:
                    found.append(raw.members["txt"])
            elif isinstance(meta.get(f[5:]), str):
                found.append(meta[f[5:]].encode())
        return found

    def resolve(self, raw: RawSample, rng: Optional[random.Random]) -> RawSample:
        """`raw` with its caption in `txt`: drawn by `rng` among the present, non-blank fields (the
        first one without an `rng`); without any field, no `txt` (missing_caption); all blank, blank."""
        if self.fields == ("txt",):
            return raw
        found = self._candidates(raw)
        members = {k: v for k, v in raw.members.items() if k != "txt"}
        usable = [c for c in found if c.decode("utf-8", "replace").strip()]
        if usable:
            members["txt"] = usable[rng.randrange(len(usable))] if rng is not None else usable[0]
        elif found:
            members["txt"] = found[0]  # blank: empty_caption
        return RawSample(raw.key, raw.shard, members)


def caption_of(raw: RawSample) -> str:
    """The `.txt` caption, stripped. Raises BadSample if it is missing or blank."""
    data = raw.members.get("txt")
    if data is None:
        raise BadSample("missing_caption")
    caption = data.decode("utf-8", "replace").strip()
    if not caption:
        raise BadSample("empty_caption")
    return caption


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I")  # 16-bit grayscale PNGs open as one of these
_ORIENTATION = 0x0112  # the EXIF tag; 1 (or absent) means the pixels are stored upright


def to_rgb(image: Image.Image) -> Image.Image:
    """Any decoded image -> 8-bit RGB, pixels upright."""
    if image.getexif().get(_ORIENTATION, 1) != 1:
        # Phones store pixels as the sensor read them and record the rotation in EXIF.
        image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT:
        # PIL's convert("RGB") clips 0..65535 to 0..255, turning a 16-bit image almost white:
        # scale to 8 bits instead (65535 / 257 = 255), rounding to nearest.
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), mode="L")
    # Transparent pixels carry arbitrary RGB (often black): composite on white, the background
    # `sd-train prepare` uses by default (its `to_square_rgb`), so both paths give the same pixels.
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def draft_jpeg(image: Image.Image, resolution: int) -> None:
    """Before the decode: let a JPEG at least 2x `resolution` on its shorter side decode at 1/2,
    1/4 or 1/8 scale in the DCT (the largest that keeps both sides >= resolution), which is several
    times faster and then resized down anyway (`bench/bench_loader.py` measures speed and PSNR).
    Other formats, and JPEGs under 2x, decode in full: PIL's draft is a no-op for them."""
    if image.format in ("JPEG", "MPO") and min(image.size) >= 2 * resolution:  # MPO: a camera JPEG
        image.draft("RGB", (resolution, resolution))


def transform_image(
    image: Image.Image, tf: ImageTransform, rng: Optional[random.Random]
) -> tuple[np.ndarray, Geometry]:
    """Resize (shorter side = resolution), crop square (center, or at `rng`'s offset), maybe flip.
    Returns the pixels and their `Geometry`."""
    res = tf.resolution
    original = image.size
    w, h = original
    scale = res / min(w, h)
    size = (max(res, round(w * scale)), max(res, round(h * scale)))
    if size != (w, h):
        image = image.resize(size, Image.Resampling.BICUBIC)
    w, h = size
    if tf.center_crop or rng is None:
        left, top = (w - res) // 2, (h - res) // 2
    else:
        left, top = rng.randrange(w - res + 1), rng.randrange(h - res + 1)
    if (w, h) != (res, res):
        image = image.crop((left, top, left + res, top + res))
    if tf.random_flip and rng is not None and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = w - left - res  # the crop's left edge in the flipped resized image
    geometry = Geometry((original[1], original[0]), (top, left), (res, res))
    return np.array(image), geometry  # a writable copy: torch.from_numpy warns on read-only PIL views


def decode_image_sample(raw: RawSample, tf: ImageTransform, rng: Optional[random.Random]) -> DecodedSample:
    """Caption check, then PIL decode and `transform_image`. Raises BadSample."""
    suffix = next((s for s in IMAGE_SUFFIXES if s in raw.members), None)
    if suffix is None:
        raise BadSample("missing_image")
    caption = caption_of(raw)  # checked before the costly decode
    try:
        with Image.open(io.BytesIO(raw.members[suffix])) as image:
            draft_jpeg(image, tf.resolution)
            rgb = to_rgb(image)
    except Exception:  # noqa: BLE001 -- PIL's format plugins raise many types on corrupt bytes
        raise BadSample("undecodable") from None
    pixels, geometry = transform_image(rgb, tf, rng)
    return DecodedSample(raw.key, pixels, caption, geometry)


def stack_pixels(samples: list[DecodedSample], resolution: int) -> torch.Tensor:
    """HWC uint8 samples -> one contiguous uint8 [B,3,R,R] tensor (a single copy per sample)."""
    pixels = torch.empty((len(samples), 3, resolution, resolution), dtype=torch.uint8)
    for i, s in enumerate(samples):
        pixels[i].copy_(torch.from_numpy(s.pixels).permute(2, 0, 1))
    return pixels


def stack_geometry(samples: list[DecodedSample]) -> dict[str, torch.Tensor]:
    """The batch's `Geometry` as int64 [B, 2] tensors, (height, width) / (top, left) per row:
    `original_size`, `crop_top_left`, `target_size` (SDXL's micro-conditioning reads them)."""
    return {
        name: torch.tensor([getattr(s.geometry, name) for s in samples], dtype=torch.int64).reshape(len(samples), 2)
        for name in ("original_size", "crop_top_left", "target_size")
    }
