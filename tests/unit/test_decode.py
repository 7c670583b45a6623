"""Image decoding: JPEG draft mode only at >= 2x, EXIF orientation, 16-bit PNGs scaled (not
clipped), and transparency composited as `sd-train prepare` does. Every image is generated here;
each expectation is computed another way (numpy, or PIL without the decoder's code path)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sd_train.data.decode import ImageTransform, decode_image_sample
from sd_train.data.tar import RawSample
from sd_train.tools.prepare import to_square_rgb


def photo(w: int, h: int) -> Image.Image:
    """A smooth gradient with some edges: a stand-in for a photo that JPEG codes well."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    rgb = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin(x / 17.0) * np.cos(y / 23.0)], axis=-1)
    rgb[(x // 64 + y // 64) % 5 == 4] = (250, 250, 250)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def decode(data: bytes, suffix: str, res: int) -> np.ndarray:
    raw = RawSample("k", "s", {suffix: data, "txt": b"a caption"})
    return decode_image_sample(raw, ImageTransform(res), None).pixels


def full_decode(data: bytes, res: int) -> np.ndarray:
    """Reference: decode every pixel, then the same resize + center crop as the decoder."""
    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
    w, h = rgb.size
    scale = res / min(w, h)
    size = (max(res, round(w * scale)), max(res, round(h * scale)))
    if size != (w, h):
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - res) // 2, (size[1] - res) // 2
    return np.array(rgb.crop((left, top, left + res, top + res)))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("size,drafted", [((1024, 1024), True), ((512, 768), True), ((500, 700), False)])
def test_jpeg_draft_only_at_twice_the_target(size: tuple[int, int], drafted: bool) -> None:
    data = encode(photo(*size), "JPEG", quality=90)
    got, full = decode(data, "jpg", 256), full_decode(data, 256)
    assert got.shape == (256, 256, 3)
    if not drafted:  # 500 px is under 2 x 256: a full decode, bit for bit
        assert np.array_equal(got, full)
        return
    assert not np.array_equal(got, full)  # the reduced-scale DCT was used ...
    assert psnr(got, full) > 30  # ... at a small quality cost (bench/bench_loader.py reports it)


def test_png_never_drafts() -> None:
    data = encode(photo(1024, 1024), "PNG")
    assert np.array_equal(decode(data, "png", 256), full_decode(data, 256))


@pytest.mark.parametrize("orientation,k", [(3, 2), (6, -1), (8, 1)])  # 180, 90 clockwise, 90 counter-clockwise
def test_exif_orientation_is_applied(orientation: int, k: int) -> None:
    image = photo(24, 16)  # landscape as stored; 6 and 8 display it as portrait
    upright = encode(image, "JPEG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = orientation
    rotated = encode(image, "JPEG", quality=95, exif=exif.tobytes())
    with Image.open(io.BytesIO(upright)) as im:
        stored = np.array(im.convert("RGB"))  # the same coded pixels: EXIF does not change them
    shown = np.rot90(stored, k=k)
    h, w = shown.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    want = shown[top : top + side, left : left + side]
    assert np.array_equal(decode(rotated, "jpg", side), want)
    assert np.array_equal(decode(upright, "jpg", 16), stored[:, 4:20])  # no EXIF: untouched


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    ramp = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    data = encode(Image.fromarray(ramp), "PNG")
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode.startswith("I")  # PIL reads it as 16-bit ...
        assert np.array(im.convert("RGB")).mean() > 240  # ... and a plain convert clips it nearly white
    got = decode(data, "png", 16)
    want = np.rint(ramp / 257.0).astype(np.uint8)
    assert np.array_equal(got, np.repeat(want[..., None], 3, axis=-1))
    assert got.min() == 0 and got.max() == 255


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_as_prepare_does(mode: str) -> None:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, size=(16, 16, 4), dtype=np.uint8)
    rgba[:4, :, 3] = 0  # fully transparent rows, whose RGB is garbage
    rgba[4:8, :, 3] = 255
    image = Image.fromarray(rgba, mode="RGBA")
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "P":  # palette entry 0 is transparent; it fills the top rows
        index = rng.integers(1, 16, size=(16, 16), dtype=np.uint8)
        index[:4] = 0
        image = Image.fromarray(index, mode="P")
        image.putpalette(rng.integers(0, 256, size=16 * 3, dtype=np.uint8).tolist())
        image.info["transparency"] = 0
    data = encode(image, "PNG")
    got = decode(data, "png", 16)
    with Image.open(io.BytesIO(data)) as im:
        assert np.array_equal(got, np.array(to_square_rgb(im, 16)))  # the same pixels as `prepare`
        ref = np.array(im.convert("RGBA")).astype(np.float64)
    alpha = ref[..., 3:] / 255.0
    blend = ref[..., :3] * alpha + 255.0 * (1 - alpha)  # "over" a white background
    assert np.abs(got.astype(np.float64) - blend).max() <= 1
    assert (got[:4] == 255).all()  # transparent is white, whatever RGB it stored


def test_a_pngs_exif_orientation_counts_without_decoding_its_pixels() -> None:
    """The bucket of a PNG is chosen from its header: an EXIF orientation stored before the pixel
    data turns the size (40 wide, 20 high, rotated: 40 high), and a PNG without one is not decoded
    to look for it further on (PIL's getexif would decode the whole image)."""
    from sd_train.data.decode import upright_size

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to stand upright
    turned, plain = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (40, 20)).save(turned, "PNG", exif=exif.tobytes())
    Image.new("RGB", (40, 20)).save(plain, "PNG")
    assert upright_size(Image.open(io.BytesIO(turned.getvalue()))) == (40, 20)
    image = Image.open(io.BytesIO(plain.getvalue()))
    loads = []
    real_load = image.load
    image.load = lambda: loads.append(1) or real_load()
    assert upright_size(image) == (20, 40) and not loads
