"""Metadata filters (`data.filters`): judge a raw sample from its `.json` alone, before any decode.

img2dataset writes each sample's metadata into `KEY.json` (`width`, `height`, `original_width`,
`original_height`, and every column of the input parquet, e.g. `punsafe`, `aesthetic`). A rule is
FIELD<op>NUMBER (parsed and checked at startup by `sd_train.config.schema.parse_filter_rule`); a
dotted FIELD reads a nested object (`meta.width`). A sample is kept when every rule holds; it is
counted under the first rule that rejects it, so the per-rule counts add up to the total.

A filtered sample is the user's choice, not bad input: it still advances the stream position (so
exactly-once and resume are about raw samples, whatever the filters), but it is never decoded and
never counts toward `data.max_bad_fraction`.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from sd_train.config.schema import FilterRule, parse_filter_rule
from sd_train.data.tar import RawSample

_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}


def _lookup(meta: dict[str, Any], name: str) -> Optional[int | float]:
    """The number at `name` (dots go into nested objects), or None when absent or not a number.
    Integers stay integers: Python compares an int with the rule's float exactly, where float()
    of an integer above ~1.8e308 (valid JSON) raises OverflowError."""
    value: Any = meta
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # null, strings, lists: "missing", under filter_missing
    return value


def _metadata(raw: RawSample) -> dict[str, Any]:
    data = raw.members.get("json")
    if data is None:
        return {}
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError):
        # Invalid json (or utf-8), or nested deeper than the parser's recursion limit (a few
        # thousand `[`s): treated as a sample without metadata.
        return {}
    return meta if isinstance(meta, dict) else {}


@dataclass(frozen=True)
class MetadataFilter:
    """Owns the parsed rules and the missing-field policy; `rejecting_rule` judges one raw sample."""

    rules: tuple[FilterRule, ...] = ()
    drop_missing: bool = False

    @classmethod
    def from_config(cls, filters: list[str], filter_missing: str = "keep") -> MetadataFilter:
        return cls(tuple(parse_filter_rule(r) for r in filters), filter_missing == "drop")

    @property
    def names(self) -> tuple[str, ...]:
        """The rule texts, in order: the keys of the per-rule counts."""
        return tuple(r.text for r in self.rules)

    def rejecting_rule(self, raw: RawSample) -> Optional[str]:
        """The text of the first rule `raw` fails, or None when it is kept. Reads only the json."""
        if not self.rules:
            return None
        meta = _metadata(raw)
        for rule in self.rules:
            value = _lookup(meta, rule.field)
            if value is None:
                if self.drop_missing:
                    return rule.text
                continue
            if not _COMPARE[rule.op](value, rule.value):
                return rule.text
        return None
