"""Sample-level pieces of the data pipeline: tar reading, the shuffle buffer, decoding, bad-input counts.

Nothing here knows about ranks, workers or epochs; `sd_train.data` composes these into the
resumable per-rank stream. The reader is our own (not webdataset's `tarfile_to_samples`) because
the stream must (1) never decode before the shuffle buffer, so a resume can replay raw bytes
cheaply, (2) count every kind of bad input exactly, and (3) never sleep on an error (webdataset's
`warn_and_continue` sleeps 0.5 s per error and keeps no count).

Bad input categories (`BAD_CATEGORIES`), each counted once per occurrence:
- `undecodable`: the image member is not an image PIL can open.
- `missing_image`: a sample with no `.png/.jpg/.jpeg/.webp` member.
- `missing_caption`: no `.txt` member; `empty_caption`: a `.txt` that is blank.
- In precomputed shards (`sd-train precompute`) the stored latents stand in for the image: a
  sample without them is `missing_image`, one whose arrays do not load is `undecodable`.
- `truncated`: a shard that ends or breaks mid-archive (cut-off member, bad header, no
  end-of-archive block). Counted once per shard read; the sample whose member was being read
  is lost with it (and the rest of the shard: they are never seen, so never counted).
- `unreadable_shard`: a shard that cannot be opened (missing file, failing `pipe:`), or that is
  not a tar from its first header on. Counted once per shard per epoch.
The sample-level categories are samples; the two shard-level ones are events, each counted as one
bad unit when the bad-input share is judged (`check_bad_fraction`).
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Optional, TypeVar

import numpy as np
from PIL import Image

from sd_train.errors import BadDataError  # raised here; also importable from sd_train.samples

IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "webp")
BAD_CATEGORIES = ("undecodable", "missing_image", "missing_caption", "empty_caption", "truncated", "unreadable_shard")
MAX_BAD_SHARDS = 32  # names kept per worker; enough to find the culprits without growing state

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_READ_BUFFER = 1 << 20  # big sequential reads: shards are read front to back exactly once
_MAX_MEMBER = 1 << 31  # no sample member is this big; a corrupt size field would allocate it

T = TypeVar("T")


class BadSample(Exception):
    """A sample that cannot be used; `category` is one of BAD_CATEGORIES."""

    def __init__(self, category: str) -> None:
        super().__init__(category)
        self.category = category


class TarFormatError(Exception):
    """A tar stream that is cut off or corrupt; `member` names the file being read, if known."""

    def __init__(self, message: str, member: Optional[str] = None) -> None:
        super().__init__(message if member is None else f"{message} ({member})")
        self.member = member


# --------------------------------------------------------------------------- bad-input log


@dataclass
class BadInputLog:
    """Owns one worker's cumulative bad-input counts and the first MAX_BAD_SHARDS offending shards.

    `muted` is set while a resume replays already-counted input, so nothing is counted twice.
    """

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_CATEGORIES, 0))
    shards: list[str] = field(default_factory=list)
    muted: bool = False

    def add(self, category: str, shard: str) -> None:
        if self.muted:
            return
        self.counts[category] += 1
        if shard not in self.shards and len(self.shards) < MAX_BAD_SHARDS:
            self.shards.append(shard)

    def total(self) -> int:
        return sum(self.counts.values())

    def copy(self) -> BadInputLog:
        return BadInputLog(dict(self.counts), list(self.shards))


def check_bad_fraction(counts: dict[str, int], total: int, max_fraction: float, min_samples: int, shards: list[str]) -> None:
    """Raise BadDataError when the bad share of `total` input read exceeds `max_fraction`.

    `counts` and `total` are sums over all ranks (the trainer all-reduces them; see
    `TrainLoader.bad_counts`/`samples_read`). Nothing is judged before `min_samples`, so one bad
    file early in a run does not stop it.
    """
    bad = sum(counts.values())
    if total <= 0 or total < min_samples:
        return
    fraction = bad / total
    if fraction <= max_fraction:
        return
    detail = ", ".join(f"{k}={v}" for k, v in counts.items() if v)
    shown = ", ".join(shards[:10]) + (f" (and {len(shards) - 10} more)" if len(shards) > 10 else "")
    raise BadDataError(
        f"{bad} of {total} samples read were bad ({fraction:.2%} > data.max_bad_fraction={max_fraction:.2%}): "
        f"{detail}. Shards with bad input: {shown or 'none recorded'}. Fix or drop those shards, or raise "
        "data.max_bad_fraction"
    )


# --------------------------------------------------------------------------- tar reading


def _read_exact(f: BinaryIO, n: int) -> bytes:
    # Pipes may return short reads before their end; loop until n bytes or EOF.
    data = f.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = f.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _number(field_bytes: bytes) -> int:
    """A tar numeric field: octal text, or GNU base-256 when the high bit of the first byte is set."""
    if field_bytes[0] & 0x80:
        value = int.from_bytes(field_bytes[1:], "big")
        return value - (1 << (8 * (len(field_bytes) - 1))) if field_bytes[0] & 0x40 else value
    text = field_bytes.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError as e:
        raise TarFormatError(f"bad numeric field {field_bytes!r}") from e


def _text(field_bytes: bytes) -> str:
    return field_bytes.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_path(data: bytes) -> Optional[str]:
    """The `path` record of a pax extended header ("LEN path=VALUE\\n" records), if any."""
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError as e:
            raise TarFormatError("bad pax header") from e
        if length <= 0:
            raise TarFormatError("bad pax header")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None


def iter_tar_members(f: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """Yield (name, data) of each regular file in a tar stream, in order.

    Handles ustar prefixes, pax `path` records and GNU long names. Raises TarFormatError when the
    stream ends before the end-of-archive block or a header checksum is wrong: unlike tarfile's
    stream mode, which ends quietly when a file is cut exactly at a header.
    """
    long_name: Optional[str] = None
    while True:
        header = _read_exact(f, _BLOCK)
        if len(header) < _BLOCK:
            raise TarFormatError("archive ends without its end-of-archive block" if not header else "cut-off header")
        if header == _ZERO_BLOCK:
            return
        stored = _number(header[148:156])
        unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
        if stored != unsigned and stored != unsigned - 256 * sum(b >= 128 for b in header[:148] + header[156:]):
            raise TarFormatError("header checksum mismatch")
        size = _number(header[124:136])
        if not 0 <= size <= _MAX_MEMBER:
            raise TarFormatError(f"member size {size} out of range")
        typeflag = header[156:157]
        name = _text(header[0:100])
        if header[257:263] == b"ustar\0" and header[345] != 0:  # POSIX prefix field (GNU uses it otherwise)
            name = _text(header[345:500]) + "/" + name
        name = long_name or name
        padded = -(-size // _BLOCK) * _BLOCK
        data = _read_exact(f, size)
        if len(data) < size or len(_read_exact(f, padded - size)) < padded - size:
            raise TarFormatError("cut-off member data", member=name)
        if typeflag == b"x":
            long_name = _pax_path(data) or long_name
            continue
        if typeflag == b"L":
            long_name = _text(data)
            continue
        long_name = None
        if typeflag in (b"0", b"\0", b"7"):  # directories, links, global pax headers: no sample data
            yield name, data


@dataclass
class RawSample:
    """One sample's undecoded members (suffix -> bytes, e.g. "png", "txt", "json") and its origin."""

    key: str
    shard: str
    members: dict[str, bytes]


def _split_name(name: str) -> Optional[tuple[str, str]]:
    """img2dataset/webdataset naming: key = folder + basename up to its first dot; suffix = the rest."""
    folder, _, base = name.rpartition("/")
    if base.startswith(".") or base.startswith("__") or "." not in base:
        return None  # hidden/meta files and suffix-less names carry no sample member
    stem, _, suffix = base.partition(".")
    return (folder + "/" + stem if folder else stem), suffix.lower()


def open_shard(url: str) -> BinaryIO:
    """Open a local path or any URL webdataset's gopen understands (`pipe:`, http, ...)."""
    if "://" not in url and not url.startswith("pipe:"):
        return open(url, "rb", buffering=_READ_BUFFER)
    from webdataset.gopen import gopen  # lazy: only remote sources need it

    return gopen(url, "rb", bufsize=_READ_BUFFER)


def _samples_in_shard(f: BinaryIO, url: str) -> Iterator[RawSample]:
    """Group consecutive members by key. On a broken stream, only the sample whose member was
    being read is lost: a sample whose members were all read in full is still yielded."""
    current: Optional[RawSample] = None
    try:
        for name, data in iter_tar_members(f):
            split = _split_name(name)
            if split is None:
                continue
            key, suffix = split
            if current is None or current.key != key:
                if current is not None:
                    yield current
                current = RawSample(key, url, {})
            current.members[suffix] = data
    except TarFormatError as e:
        broken = _split_name(e.member) if e.member else None
        if current is not None and (broken is None or broken[0] != current.key):
            yield current
        raise
    if current is not None:
        yield current


def read_shards(
    urls: Iterable[str], log: BadInputLog, opener: Callable[[str], BinaryIO] = open_shard
) -> Iterator[RawSample]:
    """Raw samples of each shard in turn, grouped by key, undecoded. Bad shards are logged and skipped."""
    for url in urls:
        try:
            f = opener(url)
        except OSError:
            log.add("unreadable_shard", url)
            continue
        emitted = False
        try:
            for sample in _samples_in_shard(f, url):
                emitted = True
                yield sample
        except TarFormatError as e:
            # Broken before its first full header or sample: it never was a readable tar.
            log.add("truncated" if emitted or e.member else "unreadable_shard", url)
        except OSError:
            log.add("truncated" if emitted else "unreadable_shard", url)
        finally:
            try:
                f.close()
            except OSError:
                pass  # a `pipe:` whose command failed reports it again on close; already logged


# --------------------------------------------------------------------------- shuffle buffer


def shuffled(items: Iterator[T], size: int, rng: random.Random) -> Iterator[T]:
    """A shuffle buffer of `size` items; 0 or 1 keeps the order. Drains fully when `items` ends.

    Deterministic given `rng`: the k-th item out depends only on the first k + size - 1 items in,
    so replaying k items reproduces the buffer, the reader position and the RNG state exactly.
    """
    if size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    while buffer:
        i = rng.randrange(len(buffer))
        buffer[i], buffer[-1] = buffer[-1], buffer[i]
        yield buffer.pop()


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class ImageTransform:
    """Owns the image geometry: shorter side to `resolution`, then a square crop, optional flip."""

    resolution: int
    center_crop: bool = True
    random_flip: bool = False

    @property
    def uses_rng(self) -> bool:
        return not self.center_crop or self.random_flip


@dataclass
class DecodedSample:
    """A usable sample: HWC uint8 RGB pixels (resolution x resolution), caption, key."""

    key: str
    pixels: np.ndarray
    caption: str


def caption_of(raw: RawSample) -> str:
    """The `.txt` caption, stripped. Raises BadSample if it is missing or blank."""
    data = raw.members.get("txt")
    if data is None:
        raise BadSample("missing_caption")
    caption = data.decode("utf-8", "replace").strip()
    if not caption:
        raise BadSample("empty_caption")
    return caption


def _to_rgb(image: Image.Image) -> Image.Image:
    # Transparent pixels carry arbitrary RGB (often black): composite on white, as prepare.py does.
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def transform_image(image: Image.Image, tf: ImageTransform, rng: Optional[random.Random]) -> np.ndarray:
    """Resize (shorter side = resolution), crop square (center, or at `rng`'s offset), maybe flip."""
    res = tf.resolution
    w, h = image.size
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
    return np.array(image)  # a writable copy: torch.from_numpy warns on read-only PIL views


def decode_image_sample(raw: RawSample, tf: ImageTransform, rng: Optional[random.Random]) -> DecodedSample:
    """Caption check, then PIL decode and `transform_image`. Raises BadSample."""
    suffix = next((s for s in IMAGE_SUFFIXES if s in raw.members), None)
    if suffix is None:
        raise BadSample("missing_image")
    caption = caption_of(raw)  # checked before the costly decode
    try:
        with Image.open(io.BytesIO(raw.members[suffix])) as image:
            # JPEG can decode at 1/2, 1/4, 1/8 scale in the DCT: much faster, and still >= res.
            image.draft("RGB", (tf.resolution, tf.resolution))
            rgb = _to_rgb(image)
    except Exception:  # noqa: BLE001 -- PIL's format plugins raise many types on corrupt bytes
        raise BadSample("undecodable") from None
    return DecodedSample(raw.key, transform_image(rgb, tf, rng), caption)


# --------------------------------------------------------------------------- precomputed shards
# The member names of `sd-train precompute` output (writer: sd_train.precompute). Each array has a
# leading crop axis: [K, 4, h, w] for the posterior, K = 1 (center crop) or the `--crops` count.

LATENT_MEAN = "latent_mean.npy"
LATENT_STD = "latent_std.npy"
TEXT_EMBEDS = "text_embeds.npy"


@dataclass
class PrecomputedSample:
    """One precomputed sample: the VAE posterior (unscaled mean and std, [4, h, w]) of one crop,
    the caption's text-encoder last hidden state [77, D], the caption and key."""

    key: str
    latent_mean: np.ndarray
    latent_std: np.ndarray
    text_embeds: np.ndarray
    caption: str


def _load_npy(data: bytes) -> np.ndarray:
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.dtype.kind != "f":
        raise ValueError(f"dtype {array.dtype}")
    return array


def decode_precomputed_sample(raw: RawSample, tf: ImageTransform, rng: Optional[random.Random]) -> PrecomputedSample:
    """Caption check, then the stored arrays; one crop of K, drawn with `rng` when there is one.

    The latents play the image's part in the bad-input counts: a sample without all three arrays is
    `missing_image`, one whose arrays do not load or do not fit together is `undecodable`. The
    geometry (`tf.resolution`, crops) was fixed at precompute time; `check_precomputed` holds the
    run's config to it before training starts, so `tf` is not consulted here.
    """
    if not all(m in raw.members for m in (LATENT_MEAN, LATENT_STD, TEXT_EMBEDS)):
        raise BadSample("missing_image")
    caption = caption_of(raw)
    try:
        mean, std = _load_npy(raw.members[LATENT_MEAN]), _load_npy(raw.members[LATENT_STD])
        text = _load_npy(raw.members[TEXT_EMBEDS])
    except (ValueError, OSError, EOFError):  # numpy's errors for a corrupt or truncated .npy
        raise BadSample("undecodable") from None
    if mean.ndim != 4 or mean.shape != std.shape or text.ndim != 2:
        raise BadSample("undecodable")
    # K > 1 crops exist only for random-crop training, where the stream hands us a position-seeded
    # rng: picking the crop with it keeps the choice resumable, like an online random crop.
    k = rng.randrange(mean.shape[0]) if rng is not None and mean.shape[0] > 1 else 0
    return PrecomputedSample(raw.key, mean[k], std[k], text, caption)


Decoder = Callable[[RawSample, ImageTransform, Optional[random.Random]], DecodedSample | PrecomputedSample]


def select_decoder(precomputed: bool) -> Decoder:
    """The per-sample decode function for a shard layout: images + captions, or the latents and
    text embeddings `sd-train precompute` writes. The stream, replay and counting are the same."""
    return decode_precomputed_sample if precomputed else decode_image_sample
