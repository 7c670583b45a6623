"""The bucketed stream (data.buckets): one bucket per micro-batch, every sample exactly once per epoch
over 2 ranks x 2 workers across three epochs with the carry-over counted, an exact resume that
decodes nothing but the samples waiting in the buffers, and ranks holding different buckets at the
same step.

Ranks are emulated in one process (rank 0 and 1 of world 2), workers are real DataLoader worker
processes (or the main process, where a test counts decodes). The shards are the committed
LAION-like set (tests/assets/laion, 36 samples: 28 usable, 7 misfits, 1 undecodable).
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from sd_train.data.bad_input import BadInputLog
from sd_train.data.batching import BucketBuffers
from sd_train.data.decode import ImageTransform, decode_image_sample
from sd_train.data.health import bucket_figures
from tests.support.bucket_reference import expected_bucket, upright_sizes
from tests.support.streams import (
    ASSETS,
    LAION_SPEC,
    bucket_loader,
    keys_of,
    laion_buckets,
    make_loader,
    stop_and_resume,
    take,
)

EPOCHS = 3


def usable_keys() -> set[str]:
    buckets = list(laion_buckets().sizes)
    return {k for k, s in upright_sizes().items() if s and "x" in expected_bucket(s, buckets, 4.0, "filter")}


def test_every_sample_once_per_epoch_over_2_ranks_x_2_workers_across_three_epochs():
    """Each usable sample of each epoch exactly once (by its origin: the epoch it was read in), every
    micro-batch one bucket and full until the stream's end, and `carried` equal to the epoch ends
    the samples waited through, counted from their origins. The logged per-bucket figures (one rank
    at a time: the sum over ranks is its own) are the samples and micro-batch shares of the batches."""
    seen: Counter = Counter()
    carried_by_origin, carried, per_bucket = 0, 0, Counter()
    for rank in (0, 1):
        loader = bucket_loader(rank=rank, world=2, workers=2, batch=3, shuffle=4, max_epochs=EPOCHS)
        batches = list(loader)
        for b in batches:
            h, w = (int(x) for x in b["bucket"].split("x"))
            assert b["pixels"].shape[1:] == (3, h, w) and (b["target_size"] == torch.tensor([h, w])).all()
            end = b["position"]["epoch"] == EPOCHS  # the short batches after the last epoch
            assert len(b["keys"]) == 3 or end
            per_bucket[b["bucket"]] += len(b["keys"])
            for key, (epoch, _) in zip(b["keys"], b["origins"]):
                seen[(key, epoch)] += 1
                carried_by_origin += min(b["position"]["epoch"], EPOCHS - 1) - epoch
        carried += loader.bucket_carried()
        counts = loader.bucket_counts()
        assert sum(n for n, _ in counts.values()) == len(keys_of(batches))
        figures = bucket_figures(counts, loader.bucket_carried(), torch.device("cpu"))
        samples, micro = Counter(), Counter(b["bucket"] for b in batches)
        for b in batches:
            samples[b["bucket"]] += len(b["keys"])
        assert {n: figures[f"data/bucket_{n}_samples"] for n in counts} == {n: samples[n] for n in counts}
        shares = {n: figures[f"data/bucket_{n}_share"] for n in counts}
        assert shares == pytest.approx({n: micro[n] / len(batches) for n in counts})
        assert figures["data/bucket_carried"] == loader.bucket_carried()
    assert seen == Counter({(k, e): 1 for k in usable_keys() for e in range(EPOCHS)})
    assert carried == carried_by_origin > 0
    assert len(per_bucket) >= 6


@pytest.mark.parametrize(
    "rank,world,workers,cuts",
    [
        (0, 1, 2, [5, 11]),  # twice, across epoch ends, with samples carried in the buffers
        (1, 2, 2, [4]),
        (0, 2, 1, [3, 7, 9]),
    ],
)
def test_resume_replays_the_same_micro_batches(rank, world, workers, cuts):
    """Stop after N micro-batches, resume from the state: the same keys, pixels (torch.equal), buckets,
    origins and positions as an uninterrupted run. At some cut a buffer holds a sample carried over
    from an earlier epoch, so the restore must read back samples the replay of the current epoch
    never reaches."""
    total = 16
    kw = dict(rank=rank, world=world, workers=workers, batch=3, shuffle=4)
    reference = take(bucket_loader(**kw), total)
    resumed: list[dict] = []
    state, carried_waiting = None, False
    for stop in cuts + [total]:
        loader = bucket_loader(**kw)
        if state is not None:
            loader.load_state_dict(state)
        resumed += take(loader, stop - len(resumed))
        state = loader.state_dict()
        for w in state["workers"]:
            waiting = [item for items in w["buckets"]["waiting"].values() for item in items]
            carried_waiting |= any(item[3][0] < w["epoch"] for item in waiting)
    assert carried_waiting, "no cut saved a sample carried from an earlier epoch"
    assert keys_of(resumed) == keys_of(reference)
    for got, want in zip(resumed, reference):
        assert torch.equal(got["pixels"], want["pixels"])
        assert got["bucket"] == want["bucket"] and got["origins"] == want["origins"]
        assert got["position"] == want["position"] and got["worker"] == want["worker"]


def test_resume_decodes_only_the_samples_waiting_in_the_buffers():
    """In-process (one worker): the restore decodes the saved waiting samples, in their saved order,
    and the replay of the rest of the epoch decodes nothing; then the stream goes on as before."""
    first = bucket_loader(workers=0, batch=3, shuffle=4)
    head = take(first, 6)
    state = first.state_dict()
    (worker,) = state["workers"]
    waiting = [item for items in worker["buckets"]["waiting"].values() for item in items]
    assert len(waiting) >= 3
    decoded: list[str] = []

    def counting(raw, tf, rng):
        decoded.append(raw.key)
        return decode_image_sample(raw, tf, rng)

    second = bucket_loader(workers=0, batch=3, shuffle=4, decoder=counting)
    second.load_state_dict(state)
    tail = take(second, 1)
    assert decoded[: len(waiting)] == [item[2] for item in waiting]
    stream = second.dataset
    skipped = [raw.key for raw in stream.epoch_samples(0, worker["epoch"], BadInputLog())][: worker["offset"]]
    assert not set(decoded[len(waiting) :]) & set(skipped), "the replay decoded a sample it skips"
    assert keys_of(head + tail) == keys_of(take(bucket_loader(workers=0, batch=3, shuffle=4), 7))


def test_ranks_hold_different_buckets_at_the_same_step():
    """Each rank batches its own samples: at the same step the two ranks' micro-batches often have
    different shapes (the FSDP2/DDP/DeepSpeed collectives are on parameters, not activations)."""
    steps = [take(bucket_loader(rank=r, world=2, workers=1, batch=2, shuffle=0), 6) for r in (0, 1)]
    shapes = [(a["pixels"].shape, b["pixels"].shape) for a, b in zip(*steps)]
    assert any(sa != sb for sa, sb in shapes), shapes


def test_a_changed_bucket_set_starts_the_next_epoch():
    """The saved buffers belong to their bucket set: another set warns and starts every worker at
    the next epoch. (Another micro-batch size is an elastic resume: tests/unit/test_data_elastic.py.)"""
    old = bucket_loader(batch=3)
    take(old, 4)
    state = old.state_dict()
    changed = bucket_loader(batch=2)
    changed.load_state_dict(state)
    assert changed.reshard_epoch is None and changed.state_dict()["workers"][0]["plan"]
    square = make_loader(LAION_SPEC, batch=3)  # the square path would never emit the waiting samples
    with pytest.warns(UserWarning, match="buckets '64x16,"):
        square.load_state_dict(state)
    with pytest.raises(ValueError, match="not in this run's set"):
        BucketBuffers.saved_waiting({"waiting": {"1x1": []}}, laion_buckets().names)


def test_a_waiting_sample_that_cannot_be_read_back_is_skipped_with_a_warning():
    first = bucket_loader(workers=0, batch=3)
    take(first, 4)
    state = first.state_dict()
    (worker,) = state["workers"]
    name, items = next((n, i) for n, i in worker["buckets"]["waiting"].items() if i)
    items[0][2] = "000000999"  # another key at that place: the shards changed under the same names
    second = bucket_loader(workers=0, batch=3)
    second.load_state_dict(state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        take(second, 1)
    assert any("000000999" in str(w.message) and name in str(w.message) for w in caught)


def test_weighted_mix_in_buckets_resumes_exactly():
    """data.mix=weighted with buckets: the waiting samples are named by their draw, and come back."""
    spec = f"{ASSETS}/laion/laion-{{000000..000002}}.tar@0.7::{ASSETS}/laion/laion-{{000003..000005}}.tar@0.3"
    kw = dict(workers=2, batch=3, shuffle=4, spec=spec, mix="weighted")
    reference = take(bucket_loader(**kw), 14)
    resumed, _ = stop_and_resume(lambda: bucket_loader(**kw), 6, 8)
    assert keys_of(resumed) == keys_of(reference)
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(resumed, reference))
    assert all(o[0] == "mix" for b in reference for o in b["origins"])


def test_precomputed_samples_fall_into_the_bucket_of_their_stored_shape(tmp_path: Path) -> None:
    """Precomputed latents carry their bucket in their shape (latent size x the VAE factor): each
    batch holds one bucket's samples, and a shape that is no bucket of the run (64x64 here) is
    counted as undecodable input, not trained."""
    from sd_train.data.loader import TrainLoader, select_decoder
    from sd_train.data.sources import expand_sources
    from sd_train.data.stream import ShardStream
    from tests.unit.test_data import _precomputed_shard

    square, wide, none = ((1, 4, 8, 8), (77, 8)), ((1, 4, 4, 16), (77, 8)), ((1, 4, 16, 16), (77, 8))
    layout = [square, wide, square, none, wide, square, wide, square, none, wide]
    _precomputed_shard(tmp_path / "p-000000.tar", {f"k{i:02d}": shape for i, shape in enumerate(layout)})
    stream = ShardStream(
        expand_sources(str(tmp_path / "p-000000.tar")), rank=0, world_size=1, num_workers=0, seed=0, batch_size=2,
        transform=ImageTransform(32, buckets=laion_buckets()), max_epochs=1, decoder=select_decoder(True),
        pixels_per_latent=4,
    )  # fmt: skip
    loader = TrainLoader(stream, 0)
    shapes = sorted(tuple(b["latent_mean"].shape[-2:]) for b in loader)
    assert shapes == [(4, 16), (4, 16), (8, 8), (8, 8)], shapes
    assert loader.bad_counts()["undecodable"] == 2 and sum(loader.bad_counts().values()) == 2
