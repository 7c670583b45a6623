"""Bad input: the categories, one worker's counts (`BadInputLog`), and the run-stopping share check.

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
- `mismatched_shape`: a precomputed sample whose arrays' shapes differ from those of the batch it
  would join (latents precomputed at another resolution, embeddings of another text encoder); the
  first sample of each batch sets its shapes. A stream that batches several shapes apart (aspect
  buckets) meets this check batch by batch.
The sample-level categories are samples; the two shard-level ones are events, each counted as one
bad unit when the bad-input share is judged (`check_bad_fraction`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sd_train.errors import BadDataError

BAD_CATEGORIES = (
    "undecodable",
    "missing_image",
    "missing_caption",
    "empty_caption",
    "truncated",
    "unreadable_shard",
    "mismatched_shape",
)
MAX_BAD_SHARDS = 32  # names kept per worker; enough to find the culprits without growing state


class BadSample(Exception):
    """A sample that cannot be used; `category` is one of BAD_CATEGORIES."""

    def __init__(self, category: str) -> None:
        super().__init__(category)
        self.category = category


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


def check_bad_fraction(
    counts: dict[str, int], total: int, max_fraction: float, min_samples: int, shards: list[str]
) -> None:
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
