"""Shard lists: turn a `data.*_shards` spec into URLs.

A spec is one or more sources separated by `::`, each optionally weighted as `SRC@0.3`:
- a brace pattern `data-{000000..009999}.tar` (webdataset/img2dataset naming),
- a glob `shards/*.tar`,
- a folder (all `*.tar` in it, sorted),
- a list file `shards.txt` (one URL or path per line, `#` comments; a relative path is taken
  next to the list file when the shard is there, else relative to the working directory),
- a `pipe:` URL, e.g. `pipe:aws s3 cp s3://bucket/data-{000000..000099}.tar -` (braces expand inside).

A `pipe:` URL runs a shell command, so it is expanded only with `allow_pipe=True` (`data.allow_pipe`),
whether the spec names it or a list file does; otherwise ValueError with the fix.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from braceexpand import braceexpand

from sd_train.config import ConfigError


PIPE = "pipe:"


class PipeRefused(ValueError):
    """A `pipe:` URL where pipes are not allowed: `where` (the spec, or a list file it names) and `url`."""

    def __init__(self, where: str, url: str) -> None:
        super().__init__(
            f"{where}: {url!r} is a `pipe:` URL, which runs its command through /bin/sh. Pipes run only when "
            "allowed: set data.allow_pipe=true (the commands' --allow-pipe) if you trust where it comes from; a "
            "list file shipped with a data set, or a config received with a run, must not run commands by itself"
        )
        self.where, self.url = where, url


@dataclass
class Source:
    """One shard source: its spec text, expanded URLs, and mixing weight."""

    pattern: str
    urls: list[str]
    weight: float = 1.0


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def _relative_to_list(url: str, folder: str) -> str:
    """A relative entry of a list file names a shard next to the list, if one is there (so the
    list works from any working directory); otherwise it stays relative to the working directory."""
    if _is_remote(url) or os.path.isabs(url):
        return url
    beside = os.path.join(folder, url)
    return beside if os.path.exists(beside) or not os.path.exists(url) else url


def _expand_one(pattern: str, allow_pipe: bool) -> list[str]:
    if pattern.startswith(PIPE) and not allow_pipe:
        raise PipeRefused("the shard spec", pattern)
    if _is_remote(pattern):
        return list(braceexpand(pattern))
    if os.path.isdir(pattern):
        return sorted(glob.glob(os.path.join(pattern, "*.tar")))
    if pattern.endswith(".txt"):
        if not os.path.isfile(pattern):
            return []
        with open(pattern) as f:
            lines = [ln.strip() for ln in f]
        urls = [u for ln in lines if ln and not ln.startswith("#") for u in braceexpand(ln)]
        piped = [u for u in urls if u.startswith(PIPE)]
        if piped and not allow_pipe:
            raise PipeRefused(f"the list file {pattern}", piped[0])
        return [_relative_to_list(u, os.path.dirname(pattern)) for u in urls]
    if any(ch in pattern for ch in "*?["):
        # Braces first, so `data/{a,b}/*.tar` works; glob alone leaves them literal.
        return sorted({u for part in braceexpand(pattern) for u in glob.glob(part)})
    urls = list(braceexpand(pattern))
    # A brace pattern may name shards that are gone: they are kept, and reported and skipped at
    # read time (a missing shard is bad input, not a config error), unless none exists at all.
    if not any(os.path.exists(u) for u in urls):
        return []
    return urls


def expand_sources(spec: str, allow_pipe: bool = False) -> list[Source]:
    """Parse a spec into sources. Raises ValueError for a malformed weight, or for a `pipe:` URL (in
    the spec or in a list file it names) unless `allow_pipe`."""
    sources = []
    for part in [p.strip() for p in spec.split("::") if p.strip()]:
        weight = 1.0
        head, sep, tail = part.rpartition("@")
        if sep:
            try:
                weight = float(tail)
            except ValueError:
                pass  # an "@" that is part of the URL, not a weight
            else:
                part = head
                if weight <= 0:
                    raise ValueError(f"source {part!r} has weight {weight}; weights must be positive")
        sources.append(Source(pattern=part, urls=_expand_one(part, allow_pipe), weight=weight))
    if not sources:
        raise ValueError("no shard source given")
    return sources


def check_epoch_shard_count(name: str, source: Source, world_size: int, workers: int) -> None:
    """In data.mode=epoch every worker of every rank reads a shard of each source: ConfigError naming
    the config field `name` when `source` has fewer than world_size x workers shards."""
    if len(source.urls) < world_size * workers:
        raise ConfigError(
            f"{name}: {len(source.urls)} shards in {source.pattern!r} is fewer than world_size x data.num_workers = "
            f"{world_size} x {workers}; in data.mode=epoch every worker needs a shard. Write more shards, "
            f"lower data.num_workers, or set data.mode=resampled"
        )
