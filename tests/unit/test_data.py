"""Data stream tests: exactly-once epochs, exact resume, reshard, bad input, resampling, shard specs.

Ranks are emulated in one process (rank=0/1 of world_size=2); workers are real DataLoader worker
processes. The shards are the committed tiny set in tests/assets (28 samples in 6 shards, keys
000000000..000000027; see tests/assets/make_assets.py).
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from sd_train.config import ConfigError, TrainConfig
from sd_train.data.bad_input import check_bad_fraction
from sd_train.data.decode import ImageTransform
from sd_train.data.loader import build_train_loader, val_samples
from sd_train.data.sources import expand_sources
from sd_train.errors import BadDataError
from tests.support.streams import ASSETS, SPEC, augmented_loader, keys_of, make_loader, stop_and_resume, take

ALL_KEYS = {f"{i:09d}" for i in range(28)}


# --------------------------------------------------------------------------- 1. exactly once


@pytest.mark.parametrize("shuffle", [0, 8])
def test_one_epoch_every_key_exactly_once(shuffle: int) -> None:
    seen: list[str] = []
    for rank in (0, 1):
        loader = make_loader(rank=rank, world=2, workers=2, shuffle=shuffle, max_epochs=1)
        batches = list(loader)
        seen += keys_of(batches)
        assert all(b["pixels"].dtype == torch.uint8 and b["pixels"].shape[1:] == (3, 16, 16) for b in batches)
        assert loader.samples_seen() == len(keys_of(batches))
    assert Counter(seen) == Counter(ALL_KEYS)


# --------------------------------------------------------------------------- 2. exact resume


@pytest.mark.parametrize(
    "rank,world,cuts",
    [
        (0, 1, [4]),  # mid-epoch
        (0, 1, [11]),  # one worker already in epoch 1, the other still in epoch 0
        (1, 2, [3, 7]),  # resume twice, on rank 1 of 2, across epoch boundaries
    ],
)
def test_resume_is_exact(rank: int, world: int, cuts: list[int]) -> None:
    total = 26  # ~2.5 epochs of 28 samples in batches of 3 at world 1; more epochs at world 2
    reference = take(make_loader(rank=rank, world=world), total)
    assert len({b["position"]["epoch"] for b in reference}) >= 3  # the run crosses epoch boundaries
    resumed: list[dict] = []
    state = None
    for stop in cuts + [total]:
        loader = make_loader(rank=rank, world=world)
        if state is not None:
            loader.load_state_dict(state)
        resumed += take(loader, stop - len(resumed))
        state = loader.state_dict()
    assert keys_of(resumed) == keys_of(reference)
    for got, want in zip(resumed, reference):
        assert torch.equal(got["pixels"], want["pixels"])
        assert got["worker"] == want["worker"] and got["position"] == want["position"]


def test_resume_in_process_continues_a_one_worker_run() -> None:
    # num_workers=0 reads in the main process as worker 0 of 1: the same stream as one worker.
    reference = take(make_loader(workers=1), 12)
    resumed, _ = stop_and_resume(lambda: make_loader(workers=1), 5, 7, resume_with=lambda: make_loader(workers=0))
    assert keys_of(resumed) == keys_of(reference)
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(resumed, reference))


def test_state_dict_layout() -> None:
    loader = make_loader(rank=1, world=2)
    take(loader, 3)
    sd = loader.state_dict()
    assert {"version", "rank", "world_size", "num_workers", "seed", "mode", "shuffle_buffer", "shards"} <= set(sd)
    assert (sd["rank"], sd["world_size"], sd["num_workers"]) == (1, 2, 2)
    assert len(sd["workers"]) == 2 and {"epoch", "offset", "good", "bad", "bad_shards"} <= set(sd["workers"][0])
    assert sd["samples_seen"] == 9 == sd["samples_read"]
    with pytest.raises(ValueError, match="rank 1 loaded into rank 0"):
        make_loader(rank=0, world=2).load_state_dict(sd)


# --------------------------------------------------------------------------- 3. reshard


CHANGES = {  # a world size given one rank's state only (another worker count: tests/unit/test_data_elastic.py)
    "world": dict(world=1),
    "seed": dict(seed=7),
    "shards": dict(spec=str(ASSETS / "tiny-{000000..000004}.tar")),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_changed_layout_starts_next_epoch(change: str) -> None:
    old = make_loader(rank=0, world=2, workers=2)
    take(old, 3)
    state = old.state_dict()
    saved_epoch = max(w["epoch"] for w in state["workers"])
    new = make_loader(**(dict(rank=0, world=2, workers=2) | CHANGES[change]))
    with pytest.warns(UserWarning, match=f"starts at the beginning of epoch {saved_epoch + 1}"):
        new.load_state_dict(state)
    assert new.reshard_epoch == saved_epoch + 1
    new.dataset.max_epochs = saved_epoch + 2  # read exactly that one epoch
    batches = list(new)
    assert all(b["position"]["epoch"] in (saved_epoch + 1, saved_epoch + 2) for b in batches)
    if change == "world":
        assert Counter(keys_of(batches)) == Counter(ALL_KEYS)


# --------------------------------------------------------------------------- 4. bad input


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _write(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _corrupt_set(root: Path) -> str:
    """The asset shards with known damage; returns a list-file spec. Lost good keys: see EXPECTED_LOST."""
    for i in range(6):
        shutil.copy(ASSETS / f"tiny-{i:06d}.tar", root / f"tiny-{i:06d}.tar")
    m = _members(root / "tiny-000000.tar")
    _write(root / "tiny-000000.tar", [(n, b"not an image" if n == "000000001.png" else d) for n, d in m])
    m = _members(root / "tiny-000001.tar")
    m = [(n, b"  \n" if n == "000000007.txt" else d) for n, d in m if n != "000000006.txt"]
    _write(root / "tiny-000001.tar", m)
    _write(root / "tiny-000003.tar", [(n, d) for n, d in _members(root / "tiny-000003.tar") if n != "000000016.png"])
    with tarfile.open(root / "tiny-000002.tar") as tar:  # cut inside 000000012.png: 12, 13, 14 are lost
        cut_data = tar.getmember("000000012.png").offset_data + 40
    with tarfile.open(root / "tiny-000004.tar") as tar:  # cut exactly at a header: 22, 23 are lost
        cut_header = tar.getmember("000000022.png").offset
    os.truncate(root / "tiny-000002.tar", cut_data)
    os.truncate(root / "tiny-000004.tar", cut_header)
    (root / "tiny-000098.tar").write_bytes(b"\x01" * 3000)  # not a tar at all
    names = [f"tiny-{i:06d}.tar" for i in (0, 1, 2, 3, 4, 5, 98, 99)]  # 99 does not exist
    (root / "shards.txt").write_text("# damaged copy of the test assets\n" + "\n".join(names) + "\n")
    return str(root / "shards.txt")


EXPECTED_BAD = {
    "undecodable": 1,
    "missing_image": 1,
    "missing_caption": 1,
    "empty_caption": 1,
    "truncated": 2,
    "unreadable_shard": 2,
    "mismatched_shape": 0,  # images are resized: only precomputed samples can disagree
}
EXPECTED_LOST = {f"{i:09d}" for i in (1, 6, 7, 12, 13, 14, 16, 22, 23)}


def test_bad_input_is_counted_exactly(tmp_path: Path) -> None:
    spec = _corrupt_set(tmp_path)
    keys: list[str] = []
    counts: Counter = Counter()
    shards: set[str] = set()
    read = 0
    for rank in (0, 1):
        loader = make_loader(spec, rank=rank, world=2, workers=2, max_epochs=1)
        keys += keys_of(list(loader))
        counts.update(loader.bad_counts())
        shards.update(os.path.basename(s) for s in loader.bad_shards())
        read += loader.samples_read()
    assert Counter(keys) == Counter(ALL_KEYS - EXPECTED_LOST)
    assert dict(counts) == EXPECTED_BAD
    assert shards == {f"tiny-{i:06d}.tar" for i in (0, 1, 2, 3, 4, 98, 99)}
    assert read == len(keys) + sum(EXPECTED_BAD.values())

    bad_names = sorted(shards)
    with pytest.raises(BadDataError, match=r"8 of 27 .*29\.63%.*tiny-000099\.tar"):
        check_bad_fraction(dict(counts), read, 0.1, 10, bad_names)
    check_bad_fraction(dict(counts), read, 0.5, 10, bad_names)  # under the threshold
    check_bad_fraction(dict(counts), read, 0.1, 100, bad_names)  # too few samples to judge


def test_weighted_mixing_counts_bad_input_too(tmp_path: Path) -> None:
    """data.mix=weighted reads each source through the same bad-input log: the damaged shards'
    samples are counted by kind, never a crash, every good sample of both sources arrives, and the
    good-sample count is what was handed out."""
    _corrupt_set(tmp_path)
    (tmp_path / "a.txt").write_text("tiny-000000.tar\ntiny-000001.tar\ntiny-000002.tar\n")
    (tmp_path / "b.txt").write_text("tiny-000003.tar\ntiny-000004.tar\ntiny-000005.tar\n")
    spec = f"{tmp_path / 'a.txt'}@1::{tmp_path / 'b.txt'}@1"
    loader = augmented_loader(
        spec, rank=0, world=1, workers=1, seed=0, batch=3, shuffle=4, max_epochs=1, mix="weighted"
    )
    handed = keys_of(list(loader))
    counts, keys = loader.bad_counts(), set(handed)
    assert keys == ALL_KEYS - EXPECTED_LOST, sorted(keys)
    assert loader.samples_seen() == len(handed)  # the last short batch handed out too, and counted once
    assert counts["undecodable"] >= 1 and counts["truncated"] >= 1 and counts["missing_caption"] >= 1, counts


def test_a_stream_that_keeps_nothing_says_what_bad_input_it_met(tmp_path: Path) -> None:
    """Filters that reject every sample of a damaged set: the stop names the bad input met on the
    way (the first thing to check when nothing is kept), not only the filters."""
    from sd_train.data.filters import MetadataFilter

    reject_all = MetadataFilter.from_config(["original_width>=100000"], "drop")
    loader = augmented_loader(
        _corrupt_set(tmp_path), rank=0, world=1, workers=0, seed=0, batch=3, shuffle=4, max_epochs=None,
        sample_filter=reject_all,
    )  # fmt: skip
    # Filters run before decoding: what is met is the shards' damage, 2 of each kind in each of 3 epochs.
    with pytest.raises(BadDataError, match=r"bad input so far: \{'truncated': 6, 'unreadable_shard': 6\}"):
        take(loader, 1)


def test_bad_counts_survive_resume_without_double_counting(tmp_path: Path) -> None:
    spec = _corrupt_set(tmp_path)
    whole = make_loader(spec, world=1, workers=2, max_epochs=1)
    reference = list(whole)
    resumed, second = stop_and_resume(lambda: make_loader(spec, world=1, workers=2, max_epochs=1), 3, None)
    assert keys_of(resumed) == keys_of(reference)
    assert second.bad_counts() == whole.bad_counts() == EXPECTED_BAD
    assert second.samples_read() == whole.samples_read()


# --------------------------------------------------------------------------- 5. too few shards


def test_too_few_shards_for_epoch_mode() -> None:
    spec = str(ASSETS / "tiny-{000000..000002}.tar")
    with pytest.raises(ValueError, match=r"3 shards is fewer than world_size x num_workers = 2 x 2 = 4"):
        make_loader(spec, world=2, workers=2)
    make_loader(spec, world=2, workers=2, mode="resampled")  # resampled mode needs no minimum
    cfg = TrainConfig()
    cfg.data.train_shards, cfg.data.num_workers = spec, 2
    refused = r"data.train_shards: 3 shards in .* is fewer than world_size x data.num_workers = 2 x 2"
    with pytest.raises(ConfigError, match=refused):
        build_train_loader(cfg, rank=0, world_size=2)  # the config check, also for callers that skip validation


# --------------------------------------------------------------------------- 6. resampled


def test_resampled_is_endless_deterministic_and_resumable() -> None:
    kw = dict(rank=1, world=2, workers=2, mode="resampled")
    reference = take(make_loader(**kw), 24)  # 72 samples from a rank's share of 14: well past one pass
    assert len(keys_of(reference)) == 72
    assert keys_of(take(make_loader(**kw), 24)) == keys_of(reference)
    assert keys_of(take(make_loader(**kw, seed=1), 24)) != keys_of(reference)
    # Each rank draws its own shards (the same draws on every rank would train on copies of a batch).
    draws = [
        [make_loader(**{**kw, "rank": r}).dataset.worker_shards(w, e) for w in (0, 1) for e in range(4)] for r in (0, 1)
    ]
    assert draws[0] != draws[1]
    resumed, _ = stop_and_resume(lambda: make_loader(**kw), 10, 14)
    assert keys_of(resumed) == keys_of(reference)
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(resumed, reference))


def test_resampled_follows_source_weights() -> None:
    spec = f"{ASSETS / 'tiny-000000.tar'}@0.000001::{ASSETS / 'tiny-{000001..000005}.tar'}@1"
    keys = keys_of(take(make_loader(spec, workers=1, mode="resampled"), 20))
    assert not set(keys) & {f"{i:09d}" for i in range(5)}  # the first source is (almost) never drawn


# --------------------------------------------------------------------------- 7. shard specs


def test_shard_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    brace = expand_sources(SPEC)
    assert len(brace) == 1 and [os.path.basename(u) for u in brace[0].urls] == [f"tiny-{i:06d}.tar" for i in range(6)]
    folder = tmp_path / "a"
    shutil.copytree(ASSETS, folder, ignore=shutil.ignore_patterns("*.py"))
    assert [os.path.basename(u) for u in expand_sources(str(folder))[0].urls] == [f"tiny-{i:06d}.tar" for i in range(6)]
    shutil.copytree(folder, tmp_path / "b")
    globbed = expand_sources(str(tmp_path / "{a,b}" / "tiny-00000[01].tar"))[0].urls
    assert [os.path.relpath(u, tmp_path) for u in globbed] == [f"{d}/tiny-00000{i}.tar" for d in "ab" for i in (0, 1)]
    listing = folder / "list.txt"
    listing.write_text(f"# comment\ntiny-{{000000..000001}}.tar\n\n{folder / 'tiny-000005.tar'}\n")
    monkeypatch.chdir(tmp_path)  # relative entries resolve next to the list file, from any working directory
    urls = expand_sources(str(listing))[0].urls
    assert urls == [str(folder / "tiny-000000.tar"), str(folder / "tiny-000001.tar"), str(folder / "tiny-000005.tar")]
    mixed = expand_sources(f"{SPEC}::{folder}@0.25")
    assert [s.weight for s in mixed] == [1.0, 0.25]
    with pytest.raises(ValueError, match="weights must be positive"):
        expand_sources(f"{SPEC}@0")
    loader = make_loader(f"{SPEC}::{listing}", workers=1, shuffle=0, max_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # equal weights: no "weights ignored" warning
        assert len(keys_of(list(loader))) == 28 + 10 + 4


def test_pipe_urls_are_refused_unless_allowed(tmp_path: Path) -> None:
    """A `pipe:` URL runs a shell command: refused in a spec and inside a list file unless
    `allow_pipe` (data.allow_pipe); the refusal happens at expansion, so the command never runs."""
    ran = tmp_path / "ran"
    pipe = f"pipe:touch {ran}; cat {ASSETS / 'tiny-000000.tar'}"
    listing = tmp_path / "shipped.txt"
    listing.write_text(f"{ASSETS / 'tiny-000001.tar'}\n{pipe}\n")
    with pytest.raises(ValueError, match=r"the shard spec: 'pipe:touch .* is a `pipe:` URL.*data.allow_pipe=true"):
        expand_sources(pipe)
    with pytest.raises(ValueError, match=rf"the list file {listing}: 'pipe:touch"):
        expand_sources(f"{SPEC}::{listing}")
    assert expand_sources(str(listing), allow_pipe=True)[0].urls == [str(ASSETS / "tiny-000001.tar"), pipe]
    cfg = TrainConfig()
    cfg.data.train_shards, cfg.data.resolution, cfg.data.num_workers, cfg.micro_batch_size = str(listing), 8, 0, 2
    with pytest.raises(ValueError, match="is a `pipe:` URL"):
        build_train_loader(cfg, rank=0, world_size=1)
    with pytest.raises(ValueError, match="is a `pipe:` URL"):
        val_samples(pipe, 2, 8)
    assert not ran.exists()
    cfg.data.allow_pipe = True  # allowed: the command runs and its shard is read
    assert len(keys_of(list(build_train_loader(cfg, rank=0, world_size=1, max_epochs=1)))) == 10
    assert ran.exists()


def _precomputed_shard(path: Path, shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
    """A shard in `sd-train precompute`'s layout: key -> (latent shape [K, 4, h, w], text shape [77, D])."""
    import numpy as np

    from sd_train.data.tar import add_member

    def npy(shape: tuple[int, ...]) -> bytes:
        buf = io.BytesIO()
        np.save(buf, np.ones(shape, np.float32))
        return buf.getvalue()

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, (latent, text) in shapes.items():
            for name, data in (("latent_mean.npy", npy(latent)), ("latent_std.npy", npy(latent))):
                add_member(tar, f"{key}.{name}", data)
            add_member(tar, f"{key}.text_embeds.npy", npy(text))
            add_member(tar, f"{key}.txt", f"caption {key}".encode())


def test_precomputed_samples_of_other_shapes_are_bad_input_not_a_crash(tmp_path: Path) -> None:
    """Precomputed samples whose arrays disagree in shape with the batch they fall into (another
    resolution, another text encoder) are counted `mismatched_shape`, never a crash in np.stack;
    an odd sample costs only itself, also when it starts a batch; a resume repeats it exactly."""
    from sd_train.data.loader import TrainLoader, select_decoder
    from sd_train.data.stream import ShardStream

    a, wide, other_text = ((1, 4, 4, 4), (77, 8)), ((1, 4, 8, 8), (77, 8)), ((1, 4, 4, 4), (77, 16))
    layout = [a, a, wide, a, a, other_text, a, a, wide, a, a, a]  # k08 starts the third batch
    _precomputed_shard(tmp_path / "p-000000.tar", {f"k{i:02d}": shape for i, shape in enumerate(layout)})

    def loader() -> TrainLoader:
        stream = ShardStream(
            expand_sources(str(tmp_path / "p-000000.tar")), rank=0, world_size=1, num_workers=0, seed=0,
            batch_size=3, transform=ImageTransform(16), max_epochs=1, decoder=select_decoder(True),
        )  # fmt: skip
        return TrainLoader(stream, 0)

    whole = loader()
    batches = list(whole)
    assert [b["keys"] for b in batches] == [["k00", "k01", "k03"], ["k04", "k06", "k07"], ["k09", "k10", "k11"]]
    assert all(b["latent_mean"].shape == (3, 4, 4, 4) and b["text_embeds"].shape == (3, 77, 8) for b in batches)
    assert whole.bad_counts()["mismatched_shape"] == 3 and whole.samples_seen() == 9
    assert whole.samples_read() == 12
    resumed, second = stop_and_resume(loader, 1, None)
    assert keys_of(resumed) == keys_of(batches) and second.bad_counts() == whole.bad_counts()


# --------------------------------------------------------------------------- config and val


def test_build_train_loader_and_val_samples() -> None:
    cfg = TrainConfig()
    cfg.data.train_shards, cfg.data.resolution, cfg.data.num_workers = SPEC, 8, 2
    cfg.micro_batch_size = 4
    loader = build_train_loader(cfg, rank=1, world_size=2)
    batch = take(loader, 1)[0]
    assert batch["pixels"].shape == (4, 3, 8, 8) and len(batch["captions"]) == 4
    cfg.data.precomputed = True
    with pytest.raises(ValueError, match="data.precomputed"):
        build_train_loader(cfg, rank=0, world_size=1)

    pixels, captions, keys = val_samples(SPEC, 7, 16)
    assert pixels.shape == (7, 3, 16, 16) and pixels.dtype == torch.uint8
    assert keys == [f"{i:09d}" for i in range(7)] and captions[0] == "an emoji of a red circle"
    again, _, _ = val_samples(SPEC, 7, 16)
    assert torch.equal(pixels, again)
    with pytest.warns(UserWarning, match="28 good samples, fewer than the 40"):
        val_samples(SPEC, 40, 16)


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_reader_names_and_pipe_sources(tmp_path: Path, tar_format: int) -> None:
    from sd_train.data.bad_input import BadInputLog
    from sd_train.data.tar import read_shards

    folder = "sub/" + "d" * 120 if tar_format != tarfile.USTAR_FORMAT else "sub/dir"  # > 100 chars: pax/GNU long names
    members = [
        (f"{folder}/{k}.{ext}", d) for n, d in _members(ASSETS / "tiny-000000.tar") for k, ext in [n.split(".", 1)]
    ]
    with tarfile.open(tmp_path / "s.tar", "w", format=tar_format) as tar:
        tar.addfile(tarfile.TarInfo("sub"))  # a non-file member is skipped
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    log = BadInputLog()
    for url in (str(tmp_path / "s.tar"), f"pipe:cat {tmp_path / 's.tar'}"):
        raws = list(read_shards([url], log))
        assert [r.key for r in raws] == [f"{folder}/{i:09d}" for i in range(5)]
        assert set(raws[0].members) == {"png", "txt", "json"}
    (tmp_path / "empty.tar").write_bytes(b"")
    list(read_shards([f"pipe:cat {tmp_path / 'missing.tar'} 2>/dev/null", str(tmp_path / "empty.tar")], log))
    assert log.counts["unreadable_shard"] == 2 and log.total() == 2


def test_resume_after_moving_the_shards(tmp_path: Path) -> None:
    # The saved state names shards by base name: a data set moved to another disk resumes exactly.
    for i in range(6):
        shutil.copy(ASSETS / f"tiny-{i:06d}.tar", tmp_path)
    reference = take(make_loader(), 9)
    first = make_loader()
    head = take(first, 4)
    moved = make_loader(str(tmp_path / "tiny-{000000..000005}.tar"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moved.load_state_dict(first.state_dict())
    assert keys_of(head + take(moved, 5)) == keys_of(reference)


def test_stream_settings_out_of_range_are_refused_and_one_weighted_source_is_a_plain_stream() -> None:
    """A rank outside the world is refused (rank == world_size included); `data.mix=weighted` over
    one source is that source's plain stream (no per-source figures); a saved position without the
    counts (written before they were kept) resumes with every count at 0."""
    from sd_train.data.loader import TrainLoader
    from sd_train.data.stream import BAD_CATEGORIES, ShardStream, WorkerPosition

    settings = dict(num_workers=0, seed=0, batch_size=2, transform=ImageTransform(8), max_epochs=1)
    for rank in (2, -1):
        with pytest.raises(ValueError, match=f"rank={rank} is outside world_size=2"):
            ShardStream(expand_sources(SPEC), rank=rank, world_size=2, **settings)
    weighted = TrainLoader(ShardStream(expand_sources(SPEC), rank=0, world_size=1, mix="weighted", **settings), 0)
    plain = TrainLoader(ShardStream(expand_sources(SPEC), rank=0, world_size=1, **settings), 0)
    assert keys_of(take(weighted, 3)) == keys_of(take(plain, 3)) and weighted.source_counts() == []
    old = WorkerPosition.from_dict({"epoch": 3, "offset": 5})
    assert (old.epoch, old.offset, old.good, old.bad, old.filtered) == (3, 5, 0, dict.fromkeys(BAD_CATEGORIES, 0), {})


def test_a_concatenated_streams_fingerprint_is_the_one_saved_before_mixing_existed() -> None:
    """A checkpoint written before `data.mix` stored the fingerprint of (shard names, weights): a
    concatenated stream keeps that form, so such a run still resumes exactly instead of skipping
    to the next epoch."""
    import hashlib

    stream = make_loader().dataset
    names = [[f"tiny-{i:06d}.tar" for i in range(6)]]
    assert stream.fingerprint() == hashlib.blake2b(repr((names, [])).encode(), digest_size=8).hexdigest()


def test_pax_headers_and_a_cut_in_a_shards_first_member(tmp_path: Path) -> None:
    """Tar details a web data set meets: a pax `path` record of non-UTF-8 bytes keeps them (as
    surrogates, like tarfile), a pax header that does not parse is refused as such, and a shard cut
    inside its first member counts as a truncated sample (its name is known), not an unreadable shard."""
    import io as _io

    from sd_train.data.bad_input import BadInputLog
    from sd_train.data.tar import TarFormatError, _pax_path, read_shards

    def record(key: bytes, value: bytes) -> bytes:
        body = b" " + key + b"=" + value + b"\n"
        digits = 1
        while len(str(len(body) + digits)) != digits:  # the length counts its own digits
            digits += 1
        return str(len(body) + digits).encode() + body

    raw = b"caf\xe9.png"  # Latin-1, not UTF-8
    assert _pax_path(record(b"mtime", b"1") + record(b"path", raw)) == raw.decode("utf-8", "surrogateescape")
    for bad in (b" 9 path=x\n", b"x9 path=x\n", b"0 path=x\n"):
        with pytest.raises(TarFormatError, match="bad pax header"):
            _pax_path(bad)

    buf = _io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("a.png", b"x" * 2000), ("a.txt", b"a cat")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, _io.BytesIO(data))
    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(buf.getvalue()[:1000])  # inside a.png's data
    log = BadInputLog()
    assert list(read_shards([str(cut)], log)) == []
    assert (log.counts["truncated"], log.counts["unreadable_shard"]) == (1, 0), dict(log.counts)


def test_a_pipe_that_returns_short_reads_gives_the_same_members() -> None:
    """A shard read through a pipe (`data.allow_pipe`) arrives in short reads: the members are the
    same as from the file."""
    import io as _io

    from sd_train.data.tar import iter_tar_members

    class Trickle(_io.RawIOBase):
        """At most 7 bytes per read, as a pipe may give."""

        def __init__(self, data: bytes) -> None:
            self.data, self.pos = data, 0

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            n = len(self.data) - self.pos if n is None or n < 0 else n
            chunk = self.data[self.pos : self.pos + min(n, 7)]
            self.pos += len(chunk)
            return chunk

    data = (ASSETS / "tiny-000000.tar").read_bytes()
    whole = list(iter_tar_members(_io.BytesIO(data)))
    assert len(whole) > 4 and list(iter_tar_members(Trickle(data))) == whole


def test_tar_headers_as_other_tools_write_them() -> None:
    """What tar writers put in headers, read as tarfile reads it: GNU base-256 numbers (sizes over
    8 GiB, negative times), the ustar prefix of a long path, GNU long names, non-UTF-8 names (kept
    as surrogates), checksums summed over signed bytes (old tars) beside unsigned ones; and the
    stream's end: a member cut off, or no end-of-archive block, each said as such."""
    import io as _io

    from sd_train.data.tar import TarFormatError, _number, iter_tar_members

    big = 2**87 + 5  # fills all 11 bytes after the marker
    assert _number(b"\x80" + big.to_bytes(11, "big")) == big and _number(b"\x80" + (5).to_bytes(11, "big")) == 5
    assert _number(b"\xff" * 12) == -1 and _number(b"\xff" * 11 + b"\xfe") == -2

    def archive(fmt: int, names: list[str], encoding: str = "utf-8") -> bytes:
        buf = _io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding=encoding) as tar:
            for name in names:
                info = tarfile.TarInfo(name)
                info.size = 3
                tar.addfile(info, _io.BytesIO(b"abc"))
        return buf.getvalue()

    deep = "d" * 70 + "/" + "f" * 60 + ".png"  # 135 characters: tarfile puts "d" * 70 in the ustar prefix
    long = "l" * 150 + ".png"

    def names(data: bytes) -> list[str]:
        return [n for n, _ in iter_tar_members(_io.BytesIO(data))]

    assert names(archive(tarfile.USTAR_FORMAT, [deep, "b.txt"])) == [deep, "b.txt"]
    assert names(archive(tarfile.GNU_FORMAT, [long, "b.txt"])) == [long, "b.txt"]
    latin = archive(tarfile.USTAR_FORMAT, ["caf\xe9.png"], encoding="latin-1")
    assert names(latin) == ["caf\udce9.png"]

    header = bytearray(latin[:512])  # its name holds one byte >= 128
    signed = sum(header[:148]) + 8 * 32 + sum(header[156:]) - 256 * sum(b >= 128 for b in header)
    header[148:156] = b"%06o\0 " % signed
    assert names(bytes(header) + latin[512:]) == ["caf\udce9.png"]
    header[148:156] = b"%06o\0 " % (signed + 1)
    with pytest.raises(TarFormatError, match="header checksum mismatch"):
        names(bytes(header) + latin[512:])

    one = archive(tarfile.USTAR_FORMAT, ["a.png"])
    with pytest.raises(TarFormatError, match=r"cut-off member data \(a.png\)"):
        names(one[:514])
    with pytest.raises(TarFormatError, match="^archive ends without its end-of-archive block$"):
        names(one[:1024])  # the member whole, then nothing


def test_shards_are_read_in_turn_past_a_missing_one_and_by_url() -> None:
    """A shard that does not open is logged and the next ones are still read; a `file://` URL
    reads like the path; each raw sample knows its place in its shard (the bucket buffers save it)."""
    from sd_train.data.bad_input import BadInputLog
    from sd_train.data.tar import read_shards

    shard = str(ASSETS / "tiny-000000.tar")
    log = BadInputLog()
    samples = list(read_shards([str(ASSETS / "tiny-000099.tar"), shard], log))
    assert log.counts["unreadable_shard"] == 1 and [s.ordinal for s in samples] == list(range(len(samples)))
    assert len(samples) == 5 and [s.key for s in samples] == [f"{i:09d}" for i in range(5)]
    by_url = list(read_shards([f"file://{shard}"], BadInputLog()))
    assert [(s.key, s.members) for s in by_url] == [(s.key, s.members) for s in samples]


def test_a_read_error_mid_shard_loses_only_the_rest_of_that_shard() -> None:
    """An I/O error while a shard is read (a network mount, a `pipe:` command that dies): the
    samples before it are kept and the shard counts as truncated; an error before any sample
    counts it as unreadable; each is logged under the shard's name."""
    import io as _io

    from sd_train.data.bad_input import BadInputLog
    from sd_train.data.tar import read_shards

    data = (ASSETS / "tiny-000000.tar").read_bytes()

    class Failing(_io.RawIOBase):
        def __init__(self, fail_at: int) -> None:
            self.inner, self.fail_at = _io.BytesIO(data), fail_at

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            if self.inner.tell() >= self.fail_at:
                raise OSError("input/output error")
            return self.inner.read(n)

    for fail_at, kind, kept in ((len(data) // 2, "truncated", True), (0, "unreadable_shard", False)):
        log = BadInputLog()
        samples = list(read_shards(["net-000000.tar"], log, opener=lambda url, at=fail_at: Failing(at)))
        assert bool(samples) == kept and log.counts[kind] == 1 and log.shards == ["net-000000.tar"], (kind, log)
