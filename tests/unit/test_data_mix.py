"""Weighted mixing in epoch mode (`data.mix=weighted`): shares follow the weights, each source is
read exactly once per its own epoch over ranks x workers, and a resume continues exactly.

Two sources from the committed tiny set: A = shards 0-2 (keys 0..14), B = shards 3-5 (keys 15..27).
Expected epochs come from reading the shards each worker was given with `tarfile`.
"""

from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path
from typing import Optional

import pytest
import torch

from sd_train.config import ConfigError, TrainConfig
from sd_train.data.loader import TrainLoader
from sd_train.errors import BadDataError
from tests.support.streams import augmented_loader, keys_of, take

ASSETS = Path(__file__).resolve().parents[1] / "assets"
A, B = str(ASSETS / "tiny-{000000..000002}.tar"), str(ASSETS / "tiny-{000003..000005}.tar")
KEYS_A, KEYS_B = {f"{i:09d}" for i in range(15)}, {f"{i:09d}" for i in range(15, 28)}


def make_loader(
    wa: float = 3.0, wb: float = 1.0, *, rank: int = 0, world: int = 1, workers: int = 2, seed: int = 0,
    max_epochs: Optional[int] = None, mix: str = "weighted",
) -> TrainLoader:  # fmt: skip
    return augmented_loader(
        f"{A}@{wa}::{B}@{wb}", rank=rank, world=world, workers=workers, seed=seed, batch=3, shuffle=4,
        max_epochs=max_epochs, mix=mix,
    )  # fmt: skip


def shard_keys(url: str) -> list[str]:
    with tarfile.open(url) as tar:
        return sorted({m.name.split(".")[0] for m in tar.getmembers()})


def test_shares_follow_the_weights() -> None:
    # 3:1 -> 75% from A, though A holds only 15 of the 28 samples (54% under concatenation).
    # 600 samples, fixed seed: the binomial std of the share is 1.8 points; the tolerance is 5.
    keys = keys_of(take(make_loader(), 200))
    share_a = sum(k in KEYS_A for k in keys) / len(keys)
    assert len(keys) == 600 and abs(share_a - 0.75) < 0.05, share_a
    keys = keys_of(take(make_loader(1.0, 4.0), 200))
    share_b = sum(k in KEYS_B for k in keys) / len(keys)
    assert abs(share_b - 0.8) < 0.05, share_b


def test_each_source_is_read_once_per_its_own_epoch_over_ranks_and_workers() -> None:
    epochs: dict[tuple[int, int], Counter] = {}  # (source, epoch) -> keys seen, over ranks x workers
    for rank in (0, 1):
        loader = make_loader(rank=rank, world=2, workers=1)
        stream = loader.dataset
        batches = take(loader, 40)  # 120 samples of this rank: ~9 epochs of A's share, ~5 of B's
        per_source = {0: [k for k in keys_of(batches) if k in KEYS_A], 1: [k for k in keys_of(batches) if k in KEYS_B]}
        for source, seq in per_source.items():
            epoch, pos = 0, 0
            while True:
                want = [k for u in stream.source_shards(source, 0, epoch) for k in shard_keys(u)]
                if pos + len(want) > len(seq):
                    break
                # The worker's next len(want) samples of this source are exactly its share of this epoch.
                assert sorted(seq[pos : pos + len(want)]) == sorted(want), (rank, source, epoch)
                epochs.setdefault((source, epoch), Counter()).update(want)
                epoch, pos = epoch + 1, pos + len(want)
            assert epoch >= 3
        last = batches[-1]["position"]["sources"]
        assert [s[2] for s in last] == [len(per_source[0]), len(per_source[1])]  # per-source counts
        assert loader.source_counts() == [(len(per_source[0]), last[0][0]), (len(per_source[1]), last[1][0])]
    # Within any source epoch no key twice; in the epochs both ranks completed, every key once.
    for (source, _epoch), seen in epochs.items():
        assert max(seen.values()) == 1
        if sum(seen.values()) == len(KEYS_A if source == 0 else KEYS_B):
            assert seen == Counter(KEYS_A if source == 0 else KEYS_B)
    assert sum(sum(c.values()) == 15 for (s, _), c in epochs.items() if s == 0) >= 3


@pytest.mark.parametrize("rank,world,workers,cuts", [(0, 1, 2, [5]), (1, 2, 1, [4, 17])])
def test_weighted_resume_is_exact(rank: int, world: int, workers: int, cuts: list[int]) -> None:
    total = 30  # sources roll over several times in 90 samples
    ref_loader = make_loader(rank=rank, world=world, workers=workers)
    ref = take(ref_loader, total)
    assert max(s[0] for s in ref[-1]["position"]["sources"]) >= 2
    resumed: list[dict] = []
    state = None
    for stop in cuts + [total]:
        loader = make_loader(rank=rank, world=world, workers=workers)
        if state is not None:
            loader.load_state_dict(state)
        resumed += take(loader, stop - len(resumed))
        state = loader.state_dict()
    assert keys_of(resumed) == keys_of(ref)
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(resumed, ref))
    assert all(a["position"] == b["position"] for a, b in zip(resumed, ref))
    assert state["sources"] == ref_loader.state_dict()["sources"]  # per-source samples and epochs


def test_mix_is_deterministic_and_a_changed_mix_reshards() -> None:
    ref = keys_of(take(make_loader(), 10))
    assert keys_of(take(make_loader(), 10)) == ref
    assert keys_of(take(make_loader(seed=1), 10)) != ref
    old = make_loader()
    take(old, 4)
    state = old.state_dict()
    latest = max(s[0] for w in state["workers"] for s in w["sources"])
    with pytest.warns(UserWarning, match="weights are ignored"):
        concat = make_loader(mix="concat")
    for changed in (make_loader(wa=2.0), concat):
        with pytest.warns(UserWarning, match=f"beginning of epoch {latest + 1}"):
            changed.load_state_dict(state)
        assert changed.reshard_epoch == latest + 1


def test_concat_still_warns_and_weighted_is_checked() -> None:
    with pytest.warns(UserWarning, match="data.mix=weighted interleaves"):
        make_loader(mix="concat")
    with pytest.raises(
        ValueError, match="fewer than world_size x num_workers = 4 shards; each source's epoch gives every"
    ):
        make_loader(world=2, workers=2)
    assert make_loader(world=3, workers=1).dataset.mix == "weighted"  # 3 shards each for 3 slots: enough
    cfg = TrainConfig()
    cfg.data.mix, cfg.data.mode = "weighted", "resampled"
    with pytest.raises(ConfigError, match="data.mix=weighted applies to data.mode=epoch"):
        cfg.validate(world_size=1)


def test_trainer_logs_per_source_samples_and_epochs(tmp_path: Path) -> None:
    from types import SimpleNamespace

    import torch.distributed as dist

    from sd_train.trainer import Trainer

    loader = make_loader(workers=2)
    batches = take(loader, 20)
    cfg = TrainConfig()
    stub = SimpleNamespace(loader=loader, info=SimpleNamespace(device=torch.device("cpu")), cfg=cfg)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        health = Trainer.data_health(stub)
    finally:
        dist.destroy_process_group()
    keys = keys_of(batches)
    assert health["data/source0_samples"] == sum(k in KEYS_A for k in keys)
    assert health["data/source1_samples"] == sum(k in KEYS_B for k in keys)
    last = {b["worker"]: b["position"]["sources"] for b in batches}
    assert health["data/source0_epoch"] == max(s[0][0] for s in last.values()) >= 1


def test_weighted_mix_that_keeps_nothing_stops() -> None:
    from sd_train.data.filters import MetadataFilter

    loader = make_loader(workers=0)
    loader.dataset.sample_filter = MetadataFilter.from_config(["width>=100000"])  # the tiny set's json has width
    with pytest.raises(BadDataError, match="kept no sample in 3 epochs in a row"):
        take(loader, 1)
