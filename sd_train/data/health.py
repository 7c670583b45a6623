"""The data figures a run logs, summed over ranks, and the bad-input judgement on them: samples
read, bad samples by kind and the shards they came from (judged against data.max_bad_fraction),
filtered samples per rule (reported, never judged: a filter is the user's choice), and with
data.mix=weighted or data.buckets the per-source and per-bucket counts. Every function here is a
collective: each rank calls it at the same steps."""

from __future__ import annotations

from typing import Any

import torch

from sd_train.config import DataArgs
from sd_train.data.bad_input import check_bad_fraction
from sd_train.data.loader import TrainLoader
from sd_train.parallel.process_group import all_gather_object, all_reduce_max, all_reduce_sum


def data_health(loader: TrainLoader, data: DataArgs, device: torch.device) -> dict[str, Any]:
    """Sum `loader`'s bad-sample and filtered counts over ranks and stop (BadDataError) above
    data.max_bad_fraction."""
    counts = loader.bad_counts()
    names = sorted(counts)
    filtered = loader.filtered_counts()
    rules = list(loader.dataset.filter_names)  # the same list on every rank
    local = [counts[n] for n in names] + [filtered.get(r, 0) for r in rules] + [sum(filtered.values())]
    summed = all_reduce_sum(local + [loader.samples_read()], device)
    totals = {n: int(v) for n, v in zip(names, summed)}
    per_rule = {f"data/filtered_{r}": int(v) for r, v in zip(rules, summed[len(names) :])}
    read = int(summed[-1])
    shards = sorted({s for lst in all_gather_object(loader.bad_shards()) for s in lst})
    check_bad_fraction(totals, read, data.max_bad_fraction, data.min_samples_for_bad_check, shards)
    bad = {f"data/bad_{n}": v for n, v in totals.items()}
    per_source: dict[str, int] = {}
    mixed = loader.source_counts()  # data.mix=weighted: per-source samples (sum) and epoch (max)
    if mixed:
        samples = all_reduce_sum([n for n, _ in mixed], device)
        epochs = all_reduce_max([e for _, e in mixed], device)
        for i, (n, e) in enumerate(zip(samples, epochs)):
            per_source |= {f"data/source{i}_samples": int(n), f"data/source{i}_epoch": int(e)}
    buckets = loader.bucket_counts()  # data.buckets: per-bucket samples and shares, carried
    per_bucket = bucket_figures(buckets, loader.bucket_carried(), device) if buckets else {}
    return {
        "data/samples_read": read,
        "data/bad_shards": shards,
        **bad,
        **per_rule,
        "data/filtered": int(summed[-2]),
        **per_source,
        **per_bucket,
    }


def bucket_figures(counts: dict[str, tuple[int, int]], carried: int, device: torch.device) -> dict[str, Any]:
    """`data.buckets` figures over all ranks (a collective): per bucket the samples trained
    (`data/bucket_HxW_samples`) and its share of the micro-batches (`data/bucket_HxW_share`: the
    steps' shares, ranks counted apart), and the samples carried over an epoch end
    (`data/bucket_carried`). `counts`: this rank's {bucket: (samples, micro-batches)}."""
    names = list(counts)
    summed = all_reduce_sum([counts[n][0] for n in names] + [counts[n][1] for n in names] + [carried], device)
    batches = summed[len(names) : 2 * len(names)]
    total = sum(batches) or 1.0
    figures: dict[str, Any] = {}
    for i, name in enumerate(names):
        figures[f"data/bucket_{name}_samples"] = int(summed[i])
        figures[f"data/bucket_{name}_share"] = batches[i] / total
    figures["data/bucket_carried"] = int(summed[-1])
    return figures
