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
"""

from __future__ import annotations

import io
import json
import os
import tarfile

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


def shard_bytes(first_key: int, count: int, image_format: str) -> bytes:
    """One tar shard of `count` samples with keys first_key.. (zero-padded to 9 digits)."""
    buf = io.BytesIO()
    tar = tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT)
    for index in range(first_key, first_key + count):
        key = f"{index:09d}"
        image, caption = draw(index)
        encoded = io.BytesIO()
        if image_format == "png":
            image.save(encoded, format="PNG")
        else:
            image.save(encoded, format="JPEG", quality=75, optimize=True)
        _member(tar, f"{key}.{image_format}", encoded.getvalue())
        _member(tar, f"{key}.txt", caption.encode())
        meta = {"key": key, "caption": caption, "width": image.width, "height": image.height}
        _member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
    end = tar.offset
    tar.close()
    return buf.getvalue()[: end + 2 * tarfile.BLOCKSIZE]


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
    buf = io.BytesIO()
    tar = tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT)
    for j in range(shard * META_PER_SHARD, (shard + 1) * META_PER_SHARD):
        for name, data in meta_sample(j):
            _member(tar, name, data)
    end = tar.offset
    tar.close()
    return buf.getvalue()[: end + 2 * tarfile.BLOCKSIZE]


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


if __name__ == "__main__":
    main()
