"""Decoding one raw sample into training pixels: caption check, PIL decode, resize/crop/flip, and
the geometry SDXL's micro-conditioning reads. The pixels stay uint8; the VAE's [-1, 1] input range
is the model's business (sd_train.model.parts.uint8_to_unit_range).

The training size is the square `resolution`, or with `data.buckets` the bucket the image's size
picks (sd_train.data.buckets), judged from the image header before the pixels are decoded, so a
misfit costs no decode. Either way the image is resized to cover the target and cropped; an
extreme image (a 1 x 20000 banner) is cropped before the resize instead (`CROP_FIRST`)."""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from sd_train.config.schema import parse_caption_key
from sd_train.data.bad_input import BadSample
from sd_train.data.buckets import BucketSet, Misfit, Size
from sd_train.data.tar import RawSample

IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "webp")
# Crop before resizing when the resize that covers the target would hold more than this many times
# the target's pixels: a 1 x 20000 banner at 512 px would otherwise become 512 x 10,240,000 (15 GB)
# before the crop. Below it the image is resized whole, then cropped, as it always was, so those
# pixels are bitwise what they were; the crop-first pixels are the same region resampled from the
# crop box (PIL's resize with `box`), within a few levels of the whole-image resize.
CROP_FIRST = 8


@dataclass(frozen=True)
class ImageTransform:
    """Owns the image geometry: the target (the square `resolution`, or the image's bucket in
    `buckets`), a cover resize and crop (center or random), an optional flip."""

    resolution: int
    center_crop: bool = True
    random_flip: bool = False
    buckets: Optional[BucketSet] = None

    @property
    def uses_rng(self) -> bool:
        return not self.center_crop or self.random_flip

    def target(self, size: Size) -> Size:
        """The training (H, W) of an image of `size` (H, W). Raises Misfit (data.bucket_misfits=filter)."""
        if self.buckets is None:
            return (self.resolution, self.resolution)
        return self.buckets.sizes[self.buckets.assign(*size)]


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
        return replace(raw, members=members)


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


_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def upright_size(image: Image.Image) -> Size:
    """(H, W) of an opened, not yet decoded image as it will stand once upright: from the header,
    swapped when the EXIF orientation turns it. A PNG's EXIF counts only when it sits before the
    pixel data (PIL would decode the image to look further): a later one is rare, and then the
    pixels still fill the chosen bucket exactly, only from a less fitting shape."""
    w, h = image.size
    exif = image.getexif() if image.format != "PNG" else Image.Exif()
    if image.format == "PNG" and "exif" in image.info:
        exif.load(image.info["exif"])
    return (w, h) if exif.get(_ORIENTATION, 1) in _TRANSPOSED else (h, w)


def draft_jpeg(image: Image.Image, target: int | Size) -> None:
    """Before the decode: let a JPEG at least 2x the target (H, W), or 2x `target` on its shorter
    side for a square, decode at 1/2, 1/4 or 1/8 scale in the DCT (the largest that keeps both sides
    >= the target), which is several times faster and then resized down anyway
    (`bench/bench_loader.py` measures speed and PSNR). Other formats, and JPEGs under 2x, decode in
    full: PIL's draft is a no-op for them."""
    th, tw = (target, target) if isinstance(target, int) else target
    w, h = image.size
    if image.format in ("JPEG", "MPO") and w >= 2 * tw and h >= 2 * th:  # MPO: a camera JPEG
        image.draft("RGB", (tw, th))


def cover_crop(
    size: tuple[int, int], target: Size, rng: Optional[random.Random]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """For an image of PIL `size` (W, H): the (W, H) it is resized to, the smallest that covers
    `target` (H, W) keeping its aspect, and the crop's (left, top) in it: centered, or drawn by `rng`
    (left first, then top)."""
    (w, h), (th, tw) = size, target
    scale = max(tw / w, th / h)
    resized = (max(tw, round(w * scale)), max(th, round(h * scale)))
    if rng is None:
        return resized, ((resized[0] - tw) // 2, (resized[1] - th) // 2)
    left = rng.randrange(resized[0] - tw + 1)
    return resized, (left, rng.randrange(resized[1] - th + 1))


def transform_image(
    image: Image.Image,
    tf: ImageTransform,
    rng: Optional[random.Random],
    target: Optional[Size] = None,
    original: Optional[Size] = None,
) -> tuple[np.ndarray, Geometry]:
    """Resize to cover `target` (H, W; default the square resolution), crop it (center, or at
    `rng`'s offset), maybe flip. `original` is the (H, W) to report as the original size (default
    the image's: pass the size before a JPEG draft). Returns the pixels and their `Geometry`."""
    th, tw = target or (tf.resolution, tf.resolution)
    if original is None:
        original = (image.size[1], image.size[0])
    size, (left, top) = cover_crop(image.size, (th, tw), None if tf.center_crop else rng)
    w, h = image.size
    if size[0] * size[1] > CROP_FIRST * tw * th:
        # Only the crop's region is resampled, straight to the target: nothing the size of `size`.
        box = (left * w / size[0], top * h / size[1], (left + tw) * w / size[0], (top + th) * h / size[1])
        image = image.resize((tw, th), Image.Resampling.BICUBIC, box=box)
    else:
        if size != (w, h):
            image = image.resize(size, Image.Resampling.BICUBIC)
        if size != (tw, th):
            image = image.crop((left, top, left + tw, top + th))
    if tf.random_flip and rng is not None and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = size[0] - left - tw  # the crop's left edge in the flipped resized image
    geometry = Geometry(original, (top, left), (th, tw))
    return np.array(image), geometry  # a writable copy: torch.from_numpy warns on read-only PIL views


def decode_image_sample(raw: RawSample, tf: ImageTransform, rng: Optional[random.Random]) -> DecodedSample:
    """Caption check, the image header (its size picks the target: Misfit here costs no decode),
    then PIL decode and `transform_image`. Raises BadSample or Misfit."""
    suffix = next((s for s in IMAGE_SUFFIXES if s in raw.members), None)
    if suffix is None:
        raise BadSample("missing_image")
    caption = caption_of(raw)  # checked before the costly decode
    try:
        with Image.open(io.BytesIO(raw.members[suffix])) as image:  # reads the header only
            original, stored = upright_size(image), image.size
            target = tf.target(original)
            draft_jpeg(image, tf.resolution if tf.buckets is None else target)
            drafted = image.size != stored
            rgb = to_rgb(image)
    except (Misfit, BadSample):
        raise
    except Exception:  # noqa: BLE001 -- PIL's format plugins raise many types on corrupt bytes
        raise BadSample("undecodable") from None
    if not drafted:  # the decoded image is the truth (a PNG's late EXIF, say); a draft shrank it
        original = (rgb.size[1], rgb.size[0])
    pixels, geometry = transform_image(rgb, tf, rng, target, original)
    return DecodedSample(raw.key, pixels, caption, geometry)


def stack_pixels(samples: list[DecodedSample], resolution: int | Size) -> torch.Tensor:
    """HWC uint8 samples of one size -> one contiguous uint8 [B,3,H,W] tensor (a single copy per
    sample); `resolution` is R for R x R, or (H, W)."""
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    pixels = torch.empty((len(samples), 3, h, w), dtype=torch.uint8)
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
