"""An independent reading of the LAION-like test set's buckets: each image decoded in full with PIL
(EXIF orientation applied), its bucket the one nearest in log aspect by `math.log`, misfits judged
from float ratios. Shares nothing with sd_train.data.buckets but the rule it states."""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

from PIL import Image, ImageOps

LAION = Path(__file__).resolve().parents[1] / "assets" / "laion"
IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "webp")


def upright_sizes() -> dict[str, tuple[int, int] | None]:
    """key -> (H, W) of the decoded, upright image, or None where it does not decode."""
    sizes: dict[str, tuple[int, int] | None] = {}
    for path in sorted(LAION.glob("laion-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, suffix = member.name.split(".", 1)
                if suffix not in IMAGE_SUFFIXES:
                    continue
                try:
                    with Image.open(io.BytesIO(tar.extractfile(member).read())) as image:
                        upright = ImageOps.exif_transpose(image.convert("RGB") if image.mode == "P" else image)
                        sizes[key] = (upright.height, upright.width)
                except OSError:
                    sizes[key] = None
    return sizes


def expected_bucket(size: tuple[int, int], buckets: list[tuple[int, int]], max_aspect: float, misfits: str) -> str:
    """`HxW` of the bucket nearest in log aspect, or the misfit reason (misfits=filter)."""
    h, w = size
    if misfits == "filter":
        if w / h > max_aspect or h / w > max_aspect:
            return "bucket_aspect"
        if h * w < min(bh * bw for bh, bw in buckets):
            return "bucket_too_small"
    distance = {b: abs(math.log(w / h) - math.log(b[1] / b[0])) for b in buckets}
    best = min(distance.values())
    # A tie (an aspect at the geometric mean of two buckets', e.g. 2:1 between 5:3 and 12:5) goes to
    # the narrower bucket, the first in the set's order.
    bh, bw = min((b for b, d in distance.items() if d - best < 1e-12), key=lambda b: b[1] / b[0])
    return f"{bh}x{bw}"
