"""Aspect-ratio bucket sets and assignment (sd_train.data.buckets), checked against independent
computations: the generated sets against a brute-force enumeration, the assignment of the committed
LAION-like set (tests/assets/laion) against a full PIL decode and `math.log`
(tests/support/bucket_reference.py), and a 1 x 20000 banner within a small memory bound."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from sd_train.config import ConfigError, DataArgs
from sd_train.data import decode
from sd_train.data.buckets import SDXL_BUCKETS, BucketSet, Misfit, bucket_set, generate_buckets, pixel_factor
from sd_train.data.decode import ImageTransform, decode_image_sample
from sd_train.data.tar import RawSample
from tests.support.bucket_reference import expected_bucket, upright_sizes
from tests.support.launch import REPO
from tests.support.streams import bucket_loader, laion_buckets


def enumerated(resolution: int, multiple: int, max_aspect: float) -> set[tuple[int, int]]:
    """Every (H, W) of multiples of `multiple` with H * W <= resolution², aspect within the bound,
    whose long side cannot grow by one step without passing the area: brute force over all pairs."""
    area, sides = resolution * resolution, range(multiple, 64 * resolution, multiple)
    found = set()
    for short in sides:
        for long in sides:
            if short <= long and short * long <= area < short * (long + multiple) and long / short <= max_aspect:
                found |= {(short, long), (long, short)}
    return found


@pytest.mark.parametrize(
    "resolution,multiple,max_aspect", [(32, 4, 4.0), (512, 64, 4.0), (1024, 64, 2.0), (1024, 32, 4.0)]
)
def test_generated_sets_match_a_brute_force_enumeration(resolution, multiple, max_aspect):
    sizes = generate_buckets(resolution, multiple, max_aspect)
    assert set(sizes) == enumerated(resolution, multiple, max_aspect)
    assert all(h * w <= resolution**2 and h % multiple == 0 == w % multiple for h, w in sizes)
    if resolution % multiple == 0:
        assert (resolution, resolution) in sizes  # the square is the largest: no bucket needs more memory


def fake_model(root: Path, vae_blocks: int, unet_blocks: int) -> str:
    for part, n in (("vae", vae_blocks), ("unet", unet_blocks)):
        (root / part).mkdir(parents=True)
        (root / part / "config.json").write_text(json.dumps({"block_out_channels": [64] * n}))
    return str(root)


def test_pixel_factor_named_and_listed_sets(tmp_path):
    sd = fake_model(tmp_path / "sd", vae_blocks=4, unet_blocks=4)  # SD 1/2: VAE 8 x UNet 8
    sdxl = fake_model(tmp_path / "sdxl", vae_blocks=4, unet_blocks=3)  # SDXL: VAE 8 x UNet 4
    assert pixel_factor(sd) == 64 and pixel_factor(sdxl) == 32
    generated = bucket_set(DataArgs(buckets="generated", resolution=512), pixel_factor(sd))
    tall = ["1024x256", "768x320", "640x384", "576x448"]
    assert generated.names == (*tall, "512x512", *[f"{s.split('x')[1]}x{s.split('x')[0]}" for s in reversed(tall)])
    # SDXL's standard sizes as its report lists them, width x height.
    standard = [
        "1024x1024",
        "1152x896",
        "896x1152",
        "1216x832",
        "832x1216",
        "1344x768",
        "768x1344",
        "1536x640",
        "640x1536",
    ]
    named = bucket_set(DataArgs(buckets="sdxl", resolution=1024), pixel_factor(sdxl))
    assert (
        sorted(named.sizes)
        == sorted(tuple(int(x) for x in s.split("x")[::-1]) for s in standard)
        == sorted(SDXL_BUCKETS)
    )
    assert named.sizes[named.largest()] == (1024, 1024)
    listed = bucket_set(DataArgs(buckets=[[512, 768], [768, 512], [512, 512]], resolution=512), 64)
    assert listed.names == ("768x512", "512x512", "512x768")  # sorted tall to wide
    with pytest.raises(ConfigError, match=r"data.buckets: 500x768 .* multiple of 64.* e\.g\. 512x768"):
        bucket_set(DataArgs(buckets=[[500, 768]], resolution=512), 64)
    with pytest.raises(ConfigError, match=r"data.buckets: 256x1280 lies outside data.bucket_max_aspect=4"):
        bucket_set(DataArgs(buckets=[[256, 1280]], resolution=512), 64)
    with pytest.raises(ConfigError, match=r"data.bucket_side_multiple=96 must be a multiple of 64"):
        bucket_set(DataArgs(buckets="generated", resolution=512, bucket_side_multiple=96), 64)
    with pytest.raises(ConfigError, match=r"data.buckets=sdxl .* set data.resolution=1024"):
        DataArgs(buckets="sdxl", resolution=512).validate()
    with pytest.raises(ConfigError, match=r"data.buckets='square' is not one of"):
        DataArgs(buckets="square").validate()
    with pytest.raises(ConfigError, match=r"lists a bucket twice"):
        DataArgs(buckets=[[64, 64], [64, 64]]).validate()


@pytest.mark.parametrize("misfits", ["filter", "resize"])
def test_assignment_equals_an_independent_computation(misfits):
    """One epoch of the LAION-like set through the stream, one sample per batch: each sample's bucket,
    each misfit reason and the bad input are those of a full PIL decode and `math.log`."""
    sizes = upright_sizes()
    buckets = laion_buckets(misfits)
    want = {k: expected_bucket(s, list(buckets.sizes), 4.0, misfits) if s else "undecodable" for k, s in sizes.items()}
    loader = bucket_loader(workers=0, batch=1, shuffle=0, max_epochs=1, misfits=misfits)
    got, original = {}, {}
    for batch in loader:
        (key,) = batch["keys"]
        got[key] = batch["bucket"]
        assert batch["pixels"].shape[2:] == tuple(int(x) for x in batch["bucket"].split("x"))
        original[key] = tuple(batch["original_size"][0].tolist())
    filtered = {k: v for k, v in loader.filtered_counts().items() if v}
    bad = {k: v for k, v in loader.bad_counts().items() if v}
    assert got == {k: v for k, v in want.items() if "x" in v}
    assert filtered == dict(Counter(v for v in want.values() if v.startswith("bucket_")))
    assert bad == {"undecodable": 1}
    assert original == {k: sizes[k] for k in got}  # EXIF-rotated and banner sizes included
    assert len(set(got.values())) >= 6 and (misfits == "resize" or len(filtered) == 2), "the set spans the buckets"


def test_nearest_is_exact_and_misfits_judged_from_size():
    b = BucketSet.of([(16, 64), (32, 32), (64, 16)], 4.0, "filter")
    assert b.nearest(10, 20) == b.index((32, 32))  # 2:1 is the geometric mean of 1:1 and 4:1: a tie, to the narrower
    assert b.nearest(10, 21) == b.index((16, 64))  # just past it
    assert b.misfit(1, 20000) == "bucket_aspect" and b.misfit(10, 10) == "bucket_too_small" and b.misfit(16, 64) is None
    with pytest.raises(Misfit, match="bucket_aspect"):
        b.assign(1, 20000)


def _rss(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def peak_extra_bytes(fn) -> int:
    """Peak resident memory `fn` adds: the kernel's high-water mark is reset first (clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss("VmRSS")
    fn()
    return _rss("VmHWM") - before


BOUND = 16 * 2**20


def _banner_peaks() -> dict[str, int]:
    """The peaks `peak_extra_bytes` measures for the banner's decodes (see the test below)."""
    encoded = io.BytesIO()
    Image.new("RGB", (20000, 1), (200, 30, 30)).save(encoded, format="PNG")
    raw = RawSample("banner", "s", {"png": encoded.getvalue(), "txt": b"a banner"})
    square, resize = ImageTransform(32), ImageTransform(32, buckets=laion_buckets("resize"))
    assert decode_image_sample(raw, resize, None).pixels.shape == (16, 64, 3)  # the 4:1 bucket

    def decode_filtered() -> None:
        try:
            decode_image_sample(raw, ImageTransform(32, buckets=laion_buckets("filter")), None)
        except Misfit as e:
            assert "bucket_aspect" in str(e)
        else:
            raise AssertionError("the banner was not filtered")

    peaks = {
        "square": peak_extra_bytes(lambda: decode_image_sample(raw, square, None)),
        "resize": peak_extra_bytes(lambda: decode_image_sample(raw, resize, None)),
        "filter": peak_extra_bytes(decode_filtered),
    }
    decode.CROP_FIRST = 10**12  # resize the whole banner, then crop (this process is the test's own)
    peaks["whole"] = peak_extra_bytes(lambda: decode_image_sample(raw, square, None))
    return peaks


def test_a_1x20000_banner_stays_within_a_small_memory_bound():
    """The banner (1 px high, 20000 wide) on the square path and in buckets (resized in, or filtered
    from its header) adds well under 16 MiB; resized whole before the crop, it adds 4x that at 32 px
    (at 512 px, 15 GB). Measured in a fresh process: in a long-lived one the allocator hands back
    pages already resident, so neither bound would see what the decode allocates."""
    code = "import json; from tests.unit.test_buckets import _banner_peaks; print(json.dumps(_banner_peaks()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    peaks = json.loads(out.splitlines()[-1])
    assert max(peaks["square"], peaks["resize"], peaks["filter"]) < BOUND, peaks
    assert peaks["whole"] > 4 * BOUND, peaks
