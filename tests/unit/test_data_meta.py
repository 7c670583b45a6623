"""Data stream on img2dataset-style metadata: filters (`data.filters`), exact over ranks x workers
and through a resume, judged without decoding.

The shards are the committed metadata set in tests/assets/meta (20 samples in 4 shards, keys
000000100..000000119, two undecodable images and one sample without `.txt`; see
tests/assets/make_assets.py). Expected counts come from a reference that reads the shards with
`tarfile` and applies the rules with plain comparisons, not from the code under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Optional

import pytest
import torch

from sd_train.config import ConfigError, TrainConfig
from sd_train.config.schema import parse_filter_rule
from sd_train.data.decode import CaptionSource, decode_image_sample
from sd_train.data.filters import MetadataFilter
from sd_train.data.loader import TrainLoader, build_train_loader, val_samples
from sd_train.data.stream import Decoder
from sd_train.data.tar import RawSample
from sd_train.errors import BadDataError
from tests.support.streams import augmented_loader, keys_of, stop_and_resume, take

ASSETS = Path(__file__).resolve().parents[1] / "assets"
META = ASSETS / "meta"
META_SPEC = str(META / "meta-{000000..000003}.tar")
RULES = ["original_width>=512", "punsafe<0.9", "aesthetic>=4.5"]


def make_loader(
    *,
    rules: list[str] = RULES,
    missing: str = "keep",
    rank: int = 0,
    world: int = 1,
    workers: int = 2,
    max_epochs: Optional[int] = None,
    decoder: Optional[Decoder] = None,
    caption_key: str = "txt",
    seed: int = 0,
) -> TrainLoader:
    return augmented_loader(
        META_SPEC, rank=rank, world=world, workers=workers, seed=seed, batch=2, shuffle=3, max_epochs=max_epochs,
        decoder=decoder, sample_filter=MetadataFilter.from_config(rules, missing),
        captions=CaptionSource.from_config(caption_key),
    )  # fmt: skip


def read_meta_set() -> dict[str, dict[str, bytes]]:
    """key -> members of every sample of the metadata set, read with tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(META.glob("meta-*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def reference(rules: list[str], missing: str) -> tuple[set[str], Counter, Counter]:
    """(kept keys, filtered per rule, bad per category) of one epoch, by an independent reading."""
    ops = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b}
    ops |= {"<": lambda a, b: a < b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
    samples = read_meta_set()
    kept, filtered, bad = set(), Counter(), Counter()
    for key, members in samples.items():
        meta = json.loads(members["json"])
        rejected = None
        for rule in rules:
            op = next(o for o in (">=", "<=", "==", "!=", ">", "<") if o in rule)
            name, literal = rule.split(op)
            if name not in meta:
                if missing == "drop":
                    rejected = rule
                    break
            elif not ops[op](meta[name], float(literal)):
                rejected = rule
                break
        if rejected:
            filtered[rejected] += 1
        elif members["png"] == b"not an image":
            bad["undecodable"] += 1
        elif "txt" not in members:
            bad["missing_caption"] += 1
        else:
            kept.add(key)
    return kept, filtered, bad


@pytest.mark.parametrize("missing", ["keep", "drop"])
def test_filters_are_exact_over_ranks_and_workers(missing: str) -> None:
    want_keys, want_filtered, want_bad = reference(RULES, missing)
    # The set exercises every path: each rule rejects something, and bad input is both filtered
    # (key 104: never decoded, so not counted undecodable) and kept (key 113: undecodable).
    assert all(want_filtered[r] for r in RULES) and want_bad["undecodable"] == 1 and want_bad["missing_caption"] == 1
    keys: list[str] = []
    filtered: Counter = Counter()
    bad: Counter = Counter()
    for rank in (0, 1):
        loader = make_loader(missing=missing, rank=rank, world=2, workers=2, max_epochs=1)
        keys += keys_of(list(loader))
        filtered.update(loader.filtered_counts())
        bad.update({k: v for k, v in loader.bad_counts().items() if v})
        assert loader.samples_read() == loader.samples_seen() + sum(loader.bad_counts().values())
        assert set(loader.state_dict()["filtered"]) == set(RULES)
    assert Counter(keys) == Counter(want_keys)
    assert filtered == want_filtered and bad == want_bad
    if missing == "drop":
        assert want_filtered["aesthetic>=4.5"] > reference(RULES, "keep")[1]["aesthetic>=4.5"]


def test_filtered_samples_are_never_decoded() -> None:
    calls: list[str] = []

    def counting(raw, tf, rng):  # in-process (num_workers=0), so the list sees every call
        calls.append(raw.key)
        return decode_image_sample(raw, tf, rng)

    loader = make_loader(workers=0, max_epochs=1, decoder=counting)
    kept = keys_of(list(loader))
    want_keys, want_filtered, want_bad = reference(RULES, "keep")
    assert set(kept) == want_keys and loader.filtered_counts() == dict(want_filtered)
    assert len(calls) == len(want_keys) + sum(want_bad.values())  # kept + bad: no filtered sample


@pytest.mark.parametrize("cuts", [[2], [1, 5]])
def test_filtered_resume_is_exact_and_replays_without_decoding(cuts: list[int]) -> None:
    total = 12  # ~2.5 epochs of 13 usable samples in batches of 2, two workers
    ref_loader = make_loader()
    ref = take(ref_loader, total)
    assert len({b["position"]["epoch"] for b in ref}) >= 2
    resumed: list[dict] = []
    state = None
    for stop in cuts + [total]:
        loader = make_loader()
        if state is not None:
            loader.load_state_dict(state)
        resumed += take(loader, stop - len(resumed))
        state = loader.state_dict()
    assert keys_of(resumed) == keys_of(ref)
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(resumed, ref))
    assert all(a["position"] == b["position"] for a, b in zip(resumed, ref))
    assert state["filtered"] == ref_loader.state_dict()["filtered"]

    calls: list[str] = []

    def counting(raw, tf, rng):
        calls.append(raw.key)
        return decode_image_sample(raw, tf, rng)

    head = make_loader(workers=1)
    take(head, 3)
    tail = make_loader(workers=0, decoder=counting)
    tail.load_state_dict(head.state_dict())  # one worker in-process reads as one worker
    before = head.state_dict()
    take(tail, 2)
    after = tail.state_dict()
    decoded = after["samples_read"] - before["samples_read"]
    assert len(calls) == decoded  # the replay decoded nothing; only samples judged after it were


def test_filter_rules_parse_and_refuse() -> None:
    rule = parse_filter_rule(" punsafe < 0.1 ")
    assert (rule.field, rule.op, rule.value, rule.text) == ("punsafe", "<", 0.1, "punsafe < 0.1")
    assert parse_filter_rule("original_width>=512").op == ">="
    for bad, match in [
        ("width=>512", "not FIELD<op>NUMBER"),
        ("width~512", "not FIELD<op>NUMBER"),
        ("width>=big", "'big', which is not a finite number"),
        ("width>=nan", "not a finite number"),
        ("width>=>5", "not a finite number"),
    ]:
        with pytest.raises(ConfigError, match=f"data.filters: rule {bad!r}.*{match}"):
            parse_filter_rule(bad)
    cfg = TrainConfig()
    cfg.data.filters = ["aesthetic>=5", "punsafe<<0.1"]
    with pytest.raises(ConfigError, match="rule 'punsafe<<0.1'"):
        cfg.validate(world_size=1)


def test_filter_reads_nested_and_treats_non_numbers_as_missing() -> None:
    def raw(meta: object) -> RawSample:
        return RawSample("k", "s", {"json": json.dumps(meta).encode()})

    f = MetadataFilter.from_config(["meta.width>=512", "punsafe<0.1"], "drop")
    assert f.rejecting_rule(raw({"meta": {"width": 600}, "punsafe": 0.05})) is None
    assert f.rejecting_rule(raw({"meta": {"width": 600}, "punsafe": 0.5})) == "punsafe<0.1"
    assert f.rejecting_rule(raw({"meta": {"width": "600"}, "punsafe": 0.05})) == "meta.width>=512"
    assert f.rejecting_rule(RawSample("k", "s", {"json": b"{not json"})) == "meta.width>=512"
    # Under "keep" a missing field skips its rule, not the rules after it.
    later = MetadataFilter.from_config(["meta.width>=512", "punsafe<0.1"], "keep")
    assert later.rejecting_rule(raw({"punsafe": 0.5})) == "punsafe<0.1"
    keep = MetadataFilter.from_config(["meta.width>=512"], "keep")
    assert keep.rejecting_rule(raw({"punsafe": None})) is None
    assert keep.rejecting_rule(RawSample("k", "s", {})) is None


def test_filters_and_caption_fields_survive_deep_json_and_huge_integers() -> None:
    """A `.json` nested past the parser's recursion limit is unreadable metadata (the rule is
    missing: kept or dropped by filter_missing; no caption from it), never a RecursionError. An
    integer above float's range (~1.8e308, valid JSON) is a number and is compared exactly, never an
    OverflowError."""
    from sd_train.data.tar import RawSample

    deep = RawSample("k", "s", {"json": b"[" * 100_000 + b"]" * 100_000, "txt": b"a caption"})
    huge = RawSample("k", "s", {"json": b'{"original_width": 1' + b"0" * 400 + b', "punsafe": -1' + b"0" * 400 + b"}"})
    drop = MetadataFilter.from_config(["original_width>=512", "punsafe<0.1"], "drop")
    keep = MetadataFilter.from_config(["original_width>=512"], "keep")
    assert drop.rejecting_rule(deep) == "original_width>=512" and keep.rejecting_rule(deep) is None
    assert drop.rejecting_rule(huge) is None, "10^400 >= 512 and -10^400 < 0.1"
    assert MetadataFilter.from_config(["original_width<1e308"], "drop").rejecting_rule(huge) == "original_width<1e308"
    assert CaptionSource.from_config("json:caption").resolve(deep, None).members.get("txt") is None
    assert CaptionSource.from_config("json:caption,txt").resolve(deep, None).members["txt"] == b"a caption"
    # Valid JSON that is not an object (a list, a number) is metadata without fields, never a crash.
    for listing in (b"[1, 2]", b"3", b'"text"'):
        odd = RawSample("k", "s", {"json": listing, "txt": b"a caption"})
        assert drop.rejecting_rule(odd) == "original_width>=512" and keep.rejecting_rule(odd) is None


# Every operator on its boundary and on both sides of it, written out by hand: (rule, value, kept).
# The json numbers are ints and floats, as img2dataset writes them.
BOUNDARY_ROWS = [
    ("punsafe<0.9", 0.89, True), ("punsafe<0.9", 0.9, False), ("punsafe<0.9", 0.91, False),
    ("aesthetic<=5", 4.99, True), ("aesthetic<=5", 5, True), ("aesthetic<=5", 5.01, False),
    ("width>512", 511, False), ("width>512", 512, False), ("width>512", 513, True),
    ("width>=512", 511, False), ("width>=512", 512.0, True), ("width>=512", 513, True),
    ("nsfw==0", -0.5, False), ("nsfw==0", 0, True), ("nsfw==0", 0.5, False),
    ("status!=1", 0, True), ("status!=1", 1.0, False), ("status!=1", 2, True),
]  # fmt: skip


@pytest.mark.parametrize("rule,value,kept", BOUNDARY_ROWS)
def test_every_operator_on_its_boundary(rule: str, value: float, kept: bool) -> None:
    field = parse_filter_rule(rule).field
    raw = RawSample("k", "s", {"json": json.dumps({field: value}).encode()})
    assert MetadataFilter.from_config([rule]).rejecting_rule(raw) == (None if kept else rule)


def test_build_train_loader_applies_the_configured_filters() -> None:
    cfg = TrainConfig()
    cfg.data.train_shards, cfg.data.resolution, cfg.data.num_workers = META_SPEC, 8, 0
    cfg.data.filters, cfg.data.filter_missing = RULES, "drop"
    cfg.micro_batch_size = 2
    loader = build_train_loader(cfg, rank=0, world_size=1, max_epochs=1)
    keys = keys_of(list(loader))
    want_keys, want_filtered, _ = reference(RULES, "drop")
    assert set(keys) == want_keys and loader.filtered_counts() == dict(want_filtered)


def test_trainer_reports_filtered_counts_apart_from_bad_input(tmp_path: Path) -> None:
    from types import SimpleNamespace

    import torch.distributed as dist

    from sd_train.trainer import Trainer

    loader = make_loader(workers=0, max_epochs=1)
    list(loader)
    cfg = TrainConfig()
    cfg.data.max_bad_fraction, cfg.data.min_samples_for_bad_check = 0.25, 1  # 2 bad of 9 read: 22%
    stub = SimpleNamespace(loader=loader, info=SimpleNamespace(device=torch.device("cpu")), cfg=cfg)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)  # a group of one: sums are this rank's
    try:
        health = Trainer.data_health(stub)
        cfg.data.max_bad_fraction = 0.2  # 2 of 9 stops the run: the 11 filtered samples do not dilute it
        with pytest.raises(BadDataError, match="2 of 9 samples read were bad"):
            Trainer.data_health(stub)
    finally:
        dist.destroy_process_group()
    _, want_filtered, want_bad = reference(RULES, "keep")
    assert {r: health[f"data/filtered_{r}"] for r in RULES} == dict(want_filtered)
    assert health["data/filtered"] == sum(want_filtered.values()) > sum(want_bad.values())
    assert health["data/samples_read"] == loader.samples_seen() + sum(want_bad.values())
    assert health["data/bad_undecodable"] == 1 and health["data/bad_missing_caption"] == 1


# --------------------------------------------------------------------------- caption fields


def captions_by_key(loader: TrainLoader) -> tuple[list[tuple[str, str]], dict[str, int]]:
    pairs = [(k, c) for b in loader for k, c in zip(b["keys"], b["captions"])]
    return pairs, {k: v for k, v in loader.bad_counts().items() if v}


@pytest.mark.parametrize(
    "caption_key,field,want_bad",
    [
        ("txt", "txt", {"undecodable": 2, "missing_caption": 1}),  # key 112 has no .txt
        ("json:caption", "caption", {"undecodable": 2}),  # ... but its json has a caption
        ("json:recaption", "recaption", {"undecodable": 2, "empty_caption": 3}),  # blank in keys 103, 110, 117
        ("json:nowhere", None, {"missing_caption": 20}),  # the caption is checked before the decode
    ],
)
def test_caption_key_single_field(caption_key: str, field: Optional[str], want_bad: dict[str, int]) -> None:
    samples = read_meta_set()
    pairs, bad = captions_by_key(make_loader(rules=[], workers=0, max_epochs=1, caption_key=caption_key))
    assert bad == want_bad
    for key, caption in pairs:
        m = samples[key]
        want = m["txt"].decode() if field == "txt" else json.loads(m["json"])[field]
        assert caption == want.strip()
    assert len(pairs) == 20 - sum(want_bad.values())


def test_caption_key_several_fields_draws_per_sample_and_resumes() -> None:
    samples = read_meta_set()
    key = "json:caption,json:recaption"
    ref_loader = make_loader(rules=[], workers=2, caption_key=key)
    ref = take(ref_loader, 27)  # three epochs of 18 good samples
    seen: dict[str, set[str]] = {}
    for b in ref:
        for k, c in zip(b["keys"], b["captions"]):
            meta = json.loads(samples[k]["json"])
            assert c in {meta["caption"], meta["recaption"]} - {""}  # a blank field is never drawn
            seen.setdefault(k, set()).add(c)
    # Both fields are drawn, and a sample's draw changes between epochs (the RNG is the position's).
    captions = [c for b in ref for c in b["captions"]]
    assert any(c.startswith("a flat icon") for c in captions) and any(c.startswith("an emoji") for c in captions)
    assert any(len(v) == 2 for v in seen.values())
    assert not any(len(v) == 2 for k, v in seen.items() if json.loads(samples[k]["json"])["recaption"] == "")
    # Deterministic, seed-dependent, and the same after a resume.
    assert [b["captions"] for b in take(make_loader(rules=[], caption_key=key), 27)] == [b["captions"] for b in ref]
    assert [b["captions"] for b in take(make_loader(rules=[], caption_key=key, seed=3), 27)] != [
        b["captions"] for b in ref
    ]
    resumed, _ = stop_and_resume(lambda: make_loader(rules=[], caption_key=key), 10, 17)
    assert [b["captions"] for b in resumed] == [b["captions"] for b in ref]
    assert keys_of(resumed) == keys_of(ref)
    # `txt` in a list is a field like the others; the .txt-less key 112 then falls back to json.
    pairs, bad = captions_by_key(make_loader(rules=[], workers=0, max_epochs=1, caption_key="txt,json:recaption"))
    assert bad == {"undecodable": 2} and dict(pairs)["000000112"] == "a flat icon of a red circle"


def test_val_samples_read_the_caption_key() -> None:
    samples = read_meta_set()
    _, captions, keys = val_samples(META_SPEC, 4, 16, "json:recaption,txt")  # the first usable field, no draw
    assert keys == ["000000100", "000000101", "000000102", "000000103"]
    want = [json.loads(samples[k]["json"])["recaption"] or samples[k]["txt"].decode() for k in keys]
    assert captions == want and captions[3].startswith("an emoji")  # 103's recaption is blank: .txt


def test_caption_key_config_checks() -> None:
    for bad in ["caption", "json:", "txt,json:caption,txt", "Json:caption", "txt,"]:
        cfg = TrainConfig()
        cfg.data.caption_key = bad
        with pytest.raises(ConfigError, match="data.caption_key="):
            cfg.validate(world_size=1)
    cfg = TrainConfig()
    cfg.data.caption_key, cfg.data.precomputed = "json:caption", True
    with pytest.raises(ConfigError, match="applies to image shards"):
        cfg.validate(world_size=1)
    assert CaptionSource.from_config(" json:caption , txt ").fields == ("json:caption", "txt")


@pytest.mark.parametrize("workers,filtered", [(0, 60), (2, 30)])
def test_filters_that_reject_everything_stop_instead_of_spinning(workers: int, filtered: int) -> None:
    """Stops after exactly 3 empty epochs: the 20 samples with metadata, or a worker's 10 of them, 3 times."""
    loader = make_loader(rules=["original_width>=100000"], workers=workers)  # endless stream, nothing kept
    want = rf"kept no sample in 3 epochs in a row \(filtered so far: \{{'original_width>=100000': {filtered}\}}"
    with pytest.raises(BadDataError, match=want):
        take(loader, 1)


def test_a_worker_error_lets_the_process_exit(tmp_path: Path) -> None:
    # Workers ignore SIGTERM, so workers left running after an error would block interpreter exit.
    script = tmp_path / "raise.py"
    script.write_text(
        "from sd_train.data.filters import MetadataFilter\n"
        "from tests.support.streams import ASSETS, augmented_loader, take\n"
        "spec = str(ASSETS / 'meta' / 'meta-{000000..000003}.tar')\n"
        "never = MetadataFilter.from_config(['original_width>=100000'], 'keep')\n"
        "loader = augmented_loader(spec, rank=0, world=1, workers=2, seed=0, batch=2, shuffle=3, max_epochs=None,\n"
        "                          sample_filter=never)\n"
        "try:\n"
        "    take(loader, 1)\n"
        "except Exception as e:\n"
        "    print('raised', type(e).__name__)\n"
        "    raise\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1 and "raised BadDataError" in proc.stdout and "kept no sample" in proc.stderr
