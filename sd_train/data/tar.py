"""Webdataset tar shards: the reader (members grouped into raw samples) and the one member writer.

The reader is our own (not webdataset's `tarfile_to_samples`) because the stream must (1) never
decode before the shuffle buffer, so a resume can replay raw bytes cheaply, (2) count every kind
of bad input exactly (`sd_train.data.bad_input`), and (3) never sleep on an error (webdataset's
`warn_and_continue` sleeps 0.5 s per error and keeps no count).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Optional

from webdataset.gopen import gopen

from sd_train.data.bad_input import BadInputLog

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_READ_BUFFER = 1 << 20  # big sequential reads: shards are read front to back exactly once
_MAX_MEMBER = 1 << 31  # no sample member is this big; a corrupt size field would allocate it


class TarFormatError(Exception):
    """A tar stream that is cut off or corrupt; `member` names the file being read, if known."""

    def __init__(self, message: str, member: Optional[str] = None) -> None:
        super().__init__(message if member is None else f"{message} ({member})")
        self.member = member


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
    """One sample's undecoded members (suffix -> bytes, e.g. "png", "txt", "json") and its origin:
    the shard and its place among that shard's samples (`ordinal`, 0-based; -1 when not read from
    a shard), which names it exactly even where a shard repeats a key."""

    key: str
    shard: str
    members: dict[str, bytes]
    ordinal: int = -1


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
    return gopen(url, "rb", bufsize=_READ_BUFFER)


def _samples_in_shard(f: BinaryIO, url: str) -> Iterator[RawSample]:
    """Group consecutive members by key. On a broken stream, only the sample whose member was
    being read is lost: a sample whose members were all read in full is still yielded."""
    current: Optional[RawSample] = None
    ordinal = 0
    try:
        for name, data in iter_tar_members(f):
            split = _split_name(name)
            if split is None:
                continue
            key, suffix = split
            if current is None or current.key != key:
                if current is not None:
                    yield current
                current = RawSample(key, url, {}, ordinal)
                ordinal += 1
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


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append one regular-file member with fixed metadata (mode 0644, mtime 0, uid/gid 0, no owner
    names): the same input gives the same shard bytes (diffable, cacheable)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
