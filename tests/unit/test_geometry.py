"""The geometry a decoded sample carries for SDXL's micro-conditioning: (H, W) of the image before
the resize, the crop's (top, left) in the resized image (mirrored after a flip), and (H, W) of the
training image. Checked against an independent reading of the pixels: cropping the resized image
(flipped as a whole when the sample was flipped) at the reported corner gives the training pixels."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd_train.data.bad_input import BadInputLog
from sd_train.data.decode import CROP_FIRST, ImageTransform, decode_image_sample, transform_image
from sd_train.data.tar import read_shards
from tests.support.streams import augmented_loader, take

RES = 16


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """An asymmetric image: any wrong corner or a forgotten mirror picks other pixels."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def resized(image: Image.Image) -> np.ndarray:
    """The resize the transform makes, computed here: shorter side to RES, bicubic."""
    w, h = image.size
    scale = RES / min(w, h)
    size = (max(RES, round(w * scale)), max(RES, round(h * scale)))
    return np.array(image.resize(size, Image.Resampling.BICUBIC) if size != (w, h) else image)


@pytest.mark.parametrize("width,height", [(40, 16), (16, 40), (37, 23), (16, 16), (100, 20)])
@pytest.mark.parametrize("center_crop,random_flip", [(True, False), (False, False), (False, True), (True, True)])
def test_geometry_locates_the_training_pixels(width, height, center_crop, random_flip):
    image = noise_image(width, height, seed=width * 1000 + height)
    full = resized(image)
    tf = ImageTransform(RES, center_crop=center_crop, random_flip=random_flip)
    flips = 0
    for seed in range(12):
        pixels, geo = transform_image(image, tf, random.Random(seed))
        assert geo.original_size == (height, width)  # (H, W), not PIL's (W, H)
        assert geo.target_size == (RES, RES) == pixels.shape[:2]
        top, left = geo.crop_top_left
        flipped = not np.array_equal(pixels, full[top : top + RES, left : left + RES])
        source = full[:, ::-1] if flipped else full
        assert np.array_equal(pixels, source[top : top + RES, left : left + RES]), (seed, geo)
        flips += flipped
    if random_flip and width != height:
        assert 0 < flips < 12  # both cases were seen
    if not random_flip:
        assert flips == 0


def test_crop_corner_is_top_left_in_height_width_order():
    """A wide image cropped at the center: the corner's second number (left) moves, the first (top) is 0."""
    image = noise_image(64, 16, seed=1)
    _, geo = transform_image(image, ImageTransform(RES, center_crop=True), None)
    assert geo.crop_top_left == (0, (64 - RES) // 2)
    _, geo = transform_image(noise_image(16, 64, seed=2), ImageTransform(RES, center_crop=True), None)
    assert geo.crop_top_left == ((64 - RES) // 2, 0)


def test_flip_mirrors_the_crop_left_edge():
    """A crop at the left edge of a wide image, flipped, sits at the right edge of the flipped image."""
    image = noise_image(64, 16, seed=3)
    tf = ImageTransform(RES, center_crop=False, random_flip=True)
    for seed in range(40):
        rng = random.Random(seed)
        left = random.Random(seed).randrange(64 - RES + 1)
        pixels, geo = transform_image(image, tf, rng)
        flipped = random.Random(seed)
        flipped.randrange(64 - RES + 1), flipped.randrange(1)
        if flipped.random() < 0.5:
            assert geo.crop_top_left == (0, 64 - RES - left)
        else:
            assert geo.crop_top_left == (0, left)


def test_loader_batches_carry_each_samples_geometry():
    """The stream's batches carry the geometry as int64 [B, 2] rows, in the batch's sample order:
    each row equals the one decoding that sample alone gives."""
    spec = str(Path(__file__).resolve().parents[1] / "assets" / "tiny-{000000..000005}.tar")
    loader = augmented_loader(spec, rank=0, world=1, workers=0, seed=3, batch=4, shuffle=0, max_epochs=1)
    batches = take(loader, 3)
    shards = sorted(str(p) for p in Path(spec.split("tiny-")[0]).glob("tiny-*.tar"))
    by_key = {raw.key: raw for raw in read_shards(shards, BadInputLog())}
    seen_wide = False
    for batch in batches:
        for name in ("original_size", "crop_top_left", "target_size"):
            assert batch[name].dtype == torch.int64 and tuple(batch[name].shape) == (len(batch["keys"]), 2)
        assert (batch["target_size"] == 16).all()
        for row, key in enumerate(batch["keys"]):
            alone = decode_image_sample(by_key[key], ImageTransform(16, center_crop=True), None).geometry
            assert tuple(batch["original_size"][row].tolist()) == alone.original_size
            seen_wide |= alone.original_size[0] != alone.original_size[1]
    assert seen_wide  # the assets hold non-square images, so (H, W) order is exercised


# --------------------------------------------------------------------------- aspect-ratio buckets


def covered(image: Image.Image, target: tuple[int, int]) -> np.ndarray:
    """The resize a bucket's transform makes, computed here: the smallest size that covers the
    target (H, W) with the image's aspect, bicubic."""
    (th, tw), (w, h) = target, image.size
    scale = max(tw / w, th / h)
    size = (max(tw, round(w * scale)), max(th, round(h * scale)))
    return np.array(image.resize(size, Image.Resampling.BICUBIC) if size != (w, h) else image)


@pytest.mark.parametrize("width,height", [(64, 48), (48, 64), (100, 21), (37, 91), (40, 40), (12, 9)])
@pytest.mark.parametrize("target", [(24, 40), (40, 24), (32, 32), (16, 64)])
@pytest.mark.parametrize("center_crop,random_flip", [(True, False), (False, True)])
def test_bucket_geometry_locates_the_training_pixels(width, height, target, center_crop, random_flip):
    """In a non-square bucket: target_size is the bucket, the corner is in the image resized to cover
    it, and cropping there (the resized image flipped as a whole when the sample was) gives the pixels:
    exactly, or within a few levels where the cover resize would hold more than CROP_FIRST times the
    bucket's pixels and the crop's region is resampled on its own (a 37 x 91 image in 16 x 64)."""
    image = noise_image(width, height, seed=width * 7 + height)
    full = covered(image, target)
    th, tw = target
    exact = full.shape[0] * full.shape[1] <= CROP_FIRST * th * tw
    tf = ImageTransform(RES, center_crop=center_crop, random_flip=random_flip)
    flips = 0
    for seed in range(10):
        pixels, geo = transform_image(image, tf, random.Random(seed), target)
        assert geo.original_size == (height, width) and geo.target_size == target == pixels.shape[:2]
        top, left = geo.crop_top_left
        assert 0 <= top <= full.shape[0] - th and 0 <= left <= full.shape[1] - tw
        error = [np.abs(pixels.astype(int) - f[top : top + th, left : left + tw]).mean() for f in (full, full[:, ::-1])]
        flipped = bool(error[1] < error[0])
        assert error[flipped] == 0 if exact else error[flipped] < 2.0, (seed, geo, error)
        flips += flipped
    assert (flips > 0) == random_flip


def test_an_extreme_image_is_cropped_before_the_resize_at_the_same_place():
    """400 x 6 into a 16 x 64 bucket: the cover resize (1067 x 16) would hold 17x the bucket's pixels,
    so the crop's region is resampled on its own: the same geometry, pixels within a few levels."""
    image = noise_image(400, 6, seed=5)
    full = covered(image, (16, 64))
    tf = ImageTransform(RES, center_crop=False)
    for seed in range(5):
        pixels, geo = transform_image(image, tf, random.Random(seed), (16, 64))
        top, left = geo.crop_top_left
        want = full[top : top + 16, left : left + 64].astype(int)
        assert pixels.shape == (16, 64, 3) and np.abs(pixels.astype(int) - want).mean() < 2.0


def test_bucketed_decode_reports_the_true_original_size_of_a_drafted_jpeg():
    """A JPEG at least twice its bucket decodes at a reduced DCT scale (draft): original_size is still
    the file's size, and the bucket is chosen from it (as on the square path)."""
    import io

    from sd_train.data.buckets import BucketSet
    from sd_train.data.tar import RawSample

    encoded = io.BytesIO()
    noise_image(160, 96, seed=9).save(encoded, format="JPEG")
    raw = RawSample("k", "s", {"jpg": encoded.getvalue(), "txt": b"a caption"})
    buckets = BucketSet.of([(16, 16), (12, 20), (20, 12)])
    for tf in (ImageTransform(RES, buckets=buckets), ImageTransform(RES)):
        geo = decode_image_sample(raw, tf, None).geometry
        assert geo.original_size == (96, 160)
        assert geo.target_size == ((12, 20) if tf.buckets else (RES, RES))
