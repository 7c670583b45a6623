"""Write the tiny committed shard set the data tests read: `python tests/assets/make_assets.py`.

6 shards (`tiny-000000.tar` .. `tiny-000005.tar`) of 5, 5, 5, 5, 4 and 4 samples in the
img2dataset layout (`KEY.png` or `KEY.jpg`, `KEY.txt`, `KEY.json`, 9-digit keys). Images are
small synthetic shapes (16x16, 20x16 or 16x24, so random crops move), shard 5 holds JPEGs. The
output is byte-for-byte deterministic: fixed tar header fields, no record padding (keeps the set
under 100 KB; a tar needs only its two end-of-archive blocks).

A second set, `meta/meta-000000.tar` .. `meta/meta-000003.tar` (5 samples each, keys 000000100..000000119),
carries img2dataset-style metadata in each `.json` (`original_width`, `original_height`, `punsafe`,
`aesthetic` (absent in every 6th sample), `caption`, `recaption` (empty in every 7th)) for the
filter and caption-field tests, and known damage: the images of keys 104 and 113 are not images,
key 112 has no `.txt`. See `meta_sample`.

A third set, `laion/laion-000000.tar` .. `laion/laion-000005.tar` (6 samples each, keys
000000200..000000235), has web-like image sizes for the aspect-ratio bucket tests, scaled to the
tiny model's 32 px (`LAION_SAMPLES`): landscape 4:3, 3:2, 16:9 and 2:1, portraits, squares, an
exact 4:1 and a 1:3.7, two aspects whose nearest bucket differs in log and in linear aspect (81 x
40, 40 x 79), one at a tie of two buckets (80 x 40), tiny images (below the smallest 32 px
bucket's area), a 1 x 20000 banner, three outside 1:4..4:1, a JPEG stored sideways with an EXIF
orientation, a sample without `.json` and one whose image is not an image. Each picture is a
colour gradient with a dark corner mark, so a wrong crop or a missed flip shows in the pixels.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable

from PIL import Image, ImageDraw

SHARD_SIZES = (5, 5, 5, 5, 4, 4)
SIZES = ((16, 16), (20, 16), (16, 24))
COLORS = {"red": (200, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 200), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")


def draw(index: int) -> tuple[Image.Image, str]:
    """The index-th image and its caption (shape, colour and size cycle at different rates)."""
    w, h = SIZES[index % len(SIZES)]
    name, rgb = list(COLORS.items())[index % len(COLORS)]
    shape = SHAPES[(index // len(COLORS)) % len(SHAPES)]
    image = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(image)
    box = (2 + index % 3, 2, w - 3, h - 3)
    if shape == "circle":
        d.ellipse(box, fill=rgb)
    elif shape == "square":
        d.rectangle(box, fill=rgb)
    else:
        d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=rgb)
    return image, f"an emoji of a {name} {shape}"


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A tar of `members` (name, data) with fixed header fields, ending at its two end-of-archive
    blocks (no record padding)."""
    buf = io.BytesIO()
    tar = tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT)
    for name, data in members:
        _member(tar, name, data)
    end = tar.offset
    tar.close()
    return buf.getvalue()[: end + 2 * tarfile.BLOCKSIZE]


def shard_bytes(first_key: int, count: int, image_format: str) -> bytes:
    """One tar shard of `count` samples with keys first_key.. (zero-padded to 9 digits)."""
    return _tar_bytes(
        member for index in range(first_key, first_key + count) for member in _sample(index, image_format)
    )


def _sample(index: int, image_format: str) -> list[tuple[str, bytes]]:
    key = f"{index:09d}"
    image, caption = draw(index)
    encoded = io.BytesIO()
    if image_format == "png":
        image.save(encoded, format="PNG")
    else:
        image.save(encoded, format="JPEG", quality=75, optimize=True)
    meta = {"key": key, "caption": caption, "width": image.width, "height": image.height}
    return [
        (f"{key}.{image_format}", encoded.getvalue()),
        (f"{key}.txt", caption.encode()),
        (f"{key}.json", json.dumps(meta, sort_keys=True).encode()),
    ]


META_SHARDS, META_PER_SHARD, META_FIRST_KEY = 4, 5, 100


def meta_sample(j: int) -> list[tuple[str, bytes]]:
    """The members of the j-th sample of the metadata set (key META_FIRST_KEY + j)."""
    key = f"{META_FIRST_KEY + j:09d}"
    image, caption = draw(j)
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    png = b"not an image" if j in (4, 13) else encoded.getvalue()
    width = (256, 512, 1024, 640, 384)[j % 5]
    meta: dict = {
        "key": key,
        "caption": caption,
        "recaption": "" if j % 7 == 3 else caption.replace("an emoji of", "a flat icon of"),
        "width": image.width,
        "height": image.height,
        "original_width": width,
        "original_height": width if j % 2 == 0 else width * 3 // 4,
        "punsafe": round((j * 37 % 100) / 100, 2),
    }
    if j % 6 != 5:
        meta["aesthetic"] = round(4 + (j * 13 % 30) / 10, 1)
    members = [(f"{key}.png", png)]
    if j != 12:
        members.append((f"{key}.txt", caption.encode()))
    members.append((f"{key}.json", json.dumps(meta, sort_keys=True).encode()))
    return members


def meta_shard_bytes(shard: int) -> bytes:
    return _tar_bytes(
        member for j in range(shard * META_PER_SHARD, (shard + 1) * META_PER_SHARD) for member in meta_sample(j)
    )


LAION_SHARDS, LAION_PER_SHARD, LAION_FIRST_KEY = 6, 6, 200
# (width, height, format, what): stored sizes; "exif6" is stored sideways with EXIF orientation 6
# (upright it is height x width), "nojson" has no .json, "broken" is not an image.
LAION_SAMPLES: list[tuple[int, int, str, str]] = [
    (64, 48, "jpg", ""), (80, 60, "jpg", ""), (72, 48, "jpg", ""), (96, 64, "png", ""), (60, 40, "jpg", ""),
    (64, 36, "jpg", ""), (112, 63, "jpg", ""), (80, 40, "png", ""), (81, 40, "jpg", ""), (100, 75, "jpg", "nojson"),
    (48, 64, "jpg", ""), (36, 48, "png", ""), (40, 60, "jpg", ""), (40, 79, "jpg", ""), (36, 64, "jpg", ""),
    (32, 32, "png", ""), (48, 48, "jpg", ""), (64, 64, "jpg", ""), (40, 40, "png", ""), (100, 100, "jpg", ""),
    (50, 50, "jpg", ""), (120, 30, "png", ""), (30, 110, "jpg", ""), (12, 12, "png", ""), (20, 16, "jpg", ""),
    (24, 30, "png", ""), (20000, 1, "png", ""), (200, 10, "png", ""), (10, 160, "png", ""), (130, 30, "jpg", ""),
    (64, 48, "jpg", "exif6"), (56, 42, "jpg", ""), (42, 56, "jpg", ""), (88, 50, "jpg", ""), (64, 48, "jpg", "broken"),
    (54, 72, "png", ""),
]  # fmt: skip


def gradient(width: int, height: int, index: int) -> Image.Image:
    """A colour gradient (red across, green down, blue by index) with a dark mark in the top-left corner."""
    x = [round(255 * i / max(1, width - 1)) for i in range(width)]
    y = [round(255 * j / max(1, height - 1)) for j in range(height)]
    image = Image.new("RGB", (width, height))
    image.putdata([(r, g, (index * 37) % 256) for g in y for r in x])
    ImageDraw.Draw(image).rectangle((0, 0, max(0, width // 4 - 1), max(0, height // 4 - 1)), fill=(20, 20, 20))
    return image


def laion_sample(j: int) -> list[tuple[str, bytes]]:
    """The members of the j-th sample of the LAION-like set (key LAION_FIRST_KEY + j)."""
    key = f"{LAION_FIRST_KEY + j:09d}"
    width, height, fmt, what = LAION_SAMPLES[j]
    image = gradient(width, height, j)
    encoded = io.BytesIO()
    if fmt == "png":
        image.save(encoded, format="PNG", optimize=True)
    else:
        exif = Image.Exif()
        if what == "exif6":
            exif[0x0112] = 6  # rotate 90 degrees clockwise to view: upright it is height x width
            image = image.transpose(Image.Transpose.ROTATE_90)
        image.save(encoded, format="JPEG", quality=70, exif=exif.tobytes())
    data = b"not an image" if what == "broken" else encoded.getvalue()
    caption = f"a gradient picture number {j}"
    members = [(f"{key}.{fmt}", data), (f"{key}.txt", caption.encode())]
    if what != "nojson":
        meta = {"key": key, "caption": caption, "width": image.width, "height": image.height}
        members.append((f"{key}.json", json.dumps(meta, sort_keys=True).encode()))
    return members


def laion_shard_bytes(shard: int) -> bytes:
    return _tar_bytes(
        member for j in range(shard * LAION_PER_SHARD, (shard + 1) * LAION_PER_SHARD) for member in laion_sample(j)
    )


def main(out: str = os.path.dirname(os.path.abspath(__file__))) -> None:
    first = 0
    for i, count in enumerate(SHARD_SIZES):
        with open(os.path.join(out, f"tiny-{i:06d}.tar"), "wb") as f:
            f.write(shard_bytes(first, count, "jpg" if i == len(SHARD_SIZES) - 1 else "png"))
        first += count
    os.makedirs(os.path.join(out, "meta"), exist_ok=True)
    for i in range(META_SHARDS):
        with open(os.path.join(out, "meta", f"meta-{i:06d}.tar"), "wb") as f:
            f.write(meta_shard_bytes(i))
    os.makedirs(os.path.join(out, "laion"), exist_ok=True)
    for i in range(LAION_SHARDS):
        with open(os.path.join(out, "laion", f"laion-{i:06d}.tar"), "wb") as f:
            f.write(laion_shard_bytes(i))


if __name__ == "__main__":
    main()
