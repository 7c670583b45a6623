"""Precomputed latents (writer sd_train.tools.precompute, reader sd_train.data.precomputed): the
stored format, bitwise equality with online encoding, a real training run from precomputed shards
against the same run encoding online, bad input and crops, and the config checks that refuse
mismatched shards.

Bitwise equality needs the VAE to see the same batches: it is not batch-invariant (~1e-6 apart
on CPU between a batch of 4 and one of 16). So the fixture precomputes in batches of 4,
the `micro_batch_size` of configs/test.yaml, and the training comparison reads shards in order
(`data.shuffle_buffer=0`): a training micro-batch is then exactly a precompute batch.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from sd_train.config import ConfigError, ModelArgs, load_config
from sd_train.data.bad_input import BadInputLog
from sd_train.data.decode import ImageTransform, decode_image_sample, stack_pixels
from sd_train.data.loader import build_train_loader
from sd_train.data.precomputed import (
    check_precomputed,
    decode_precomputed_sample,
    sample_posterior,
    stack_precomputed,
)
from sd_train.data.tar import read_shards
from sd_train.tools.precompute import main_precompute, precompute
from tests.support.bucket_reference import expected_bucket, upright_sizes
from tests.support.launch import REPO, run, torchrun_cmd
from tests.support.streams import LAION_SPEC

BATCH = 4  # = micro_batch_size in configs/test.yaml
MEMBERS = {"latent_mean.npy", "latent_std.npy", "text_embeds.npy", "txt", "json"}


@pytest.fixture(scope="module")
def parts(tiny_assets):
    from sd_train.model.parts import load_sd_parts

    return load_sd_parts(ModelArgs(pretrained_path=str(tiny_assets["model"])), torch.device("cpu"), seed=0)


@pytest.fixture(scope="module")
def latents(tiny_assets, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("emoji-latents")
    src = f"{tiny_assets['data']}/train-{{000000..000007}}.tar"
    return out, precompute(str(tiny_assets["model"]), src, str(out), 32, batch_size=BATCH)


def _samples(url: str, decode) -> list:
    tf = ImageTransform(32)
    return [decode(raw, tf, None) for raw in read_shards([url], BadInputLog())]


def test_format_and_manifest(tiny_assets, latents):
    out, manifest = latents
    names = [f"train-{i:06d}.tar" for i in range(8)]
    assert manifest["shards"] == names and sorted(p.name for p in out.glob("*.tar")) == names
    assert json.loads((out / "precompute.json").read_text()) == manifest
    assert manifest["counts"]["samples_written"] == manifest["counts"]["samples_read"] == 128
    assert not any(manifest["counts"]["bad"].values())
    assert manifest["resolution"] == 32 and manifest["dtype"] == "float32" and manifest["crops"] == 1
    assert manifest["latent_shape"] == [1, 4, 16, 16] and manifest["text_embeds_shape"] == [77, 64]
    assert manifest["text_hidden_size"] == 64 and manifest["vae_scaling_factor"] > 0
    raws = list(read_shards([str(out / names[0])], BadInputLog()))
    originals = list(read_shards([str(tiny_assets["data"] / names[0])], BadInputLog()))
    assert [r.key for r in raws] == [r.key for r in originals]  # same samples, same order
    for raw in raws:
        assert set(raw.members) == MEMBERS
        mean = np.load(io.BytesIO(raw.members["latent_mean.npy"]))
        assert mean.dtype == np.float32 and mean.shape == (1, 4, 16, 16)
        assert json.loads(raw.members["json"])["caption"] == raw.members["txt"].decode()


def test_latents_and_text_equal_online_encoding(tiny_assets, latents, parts):
    from sd_train.model.parts import encode_pixels, encode_text

    out, _ = latents
    cpu = torch.device("cpu")
    images = _samples(str(tiny_assets["data"] / "train-000000.tar"), decode_image_sample)
    stored = _samples(str(out / "train-000000.tar"), decode_precomputed_sample)
    assert [s.key for s in images] == [s.key for s in stored]
    for i in range(0, len(images), BATCH):
        batch = stack_precomputed(stored[i : i + BATCH])
        torch.manual_seed(i)
        online = encode_pixels(parts, stack_pixels(images[i : i + BATCH], 32), cpu)
        after_online = torch.get_rng_state()
        torch.manual_seed(i)
        drawn = sample_posterior(batch["latent_mean"], batch["latent_std"], parts.vae_scale)
        assert torch.equal(drawn, online)
        assert torch.equal(torch.get_rng_state(), after_online)  # the same random numbers consumed
        text = encode_text(parts, [s.caption for s in images[i : i + BATCH]], cpu).text_embeds
        assert torch.equal(batch["text_embeds"], text)


def test_float16_storage_within_rounding(tiny_assets, parts, tmp_path):
    """float16 storage rounds mean, std and text embeddings to 11 significant bits: each latent is
    then within 2^-11 x (|mean| + |std x eps|) x scale of the online one (+ float32 slack)."""
    from sd_train.model.parts import encode_pixels, encode_text

    shard = tiny_assets["data"] / "train-000000.tar"
    manifest = precompute(str(tiny_assets["model"]), str(shard), str(tmp_path), 32, batch_size=BATCH, dtype="float16")
    assert manifest["dtype"] == "float16"
    images = _samples(str(shard), decode_image_sample)
    stored = _samples(str(tmp_path / shard.name), decode_precomputed_sample)
    cpu, u = torch.device("cpu"), 2.0**-11
    for i in range(0, len(images), BATCH):
        batch = stack_precomputed(stored[i : i + BATCH])
        assert batch["latent_mean"].dtype == torch.float16
        mean, std = batch["latent_mean"].float(), batch["latent_std"].float()
        torch.manual_seed(i)
        online = encode_pixels(parts, stack_pixels(images[i : i + BATCH], 32), cpu)
        torch.manual_seed(i)
        eps = torch.randn(mean.shape)
        torch.manual_seed(i)
        drawn = sample_posterior(mean, std, parts.vae_scale)
        bound = u * (mean.abs() + (std * eps).abs()) * parts.vae_scale + 1e-6
        assert bool(((drawn - online).abs() <= bound).all()) and not torch.equal(drawn, online)
        text = encode_text(parts, [s.caption for s in images[i : i + BATCH]], cpu).text_embeds
        assert bool(((batch["text_embeds"].float() - text).abs() <= u * text.abs() + 2.0**-24).all())


UNSAFE_KEYS = ("../../escaped", "/tmp/absolute", "sub/../../up")


def _crafted_shard(path: Path) -> None:
    """The committed tiny shard 0 (5 samples, some not square) plus one undecodable image, one
    sample without a caption, and good samples under keys that would name output members outside
    the output folder (UNSAFE_KEYS)."""
    with tarfile.open(path, "w") as out, tarfile.open(REPO / "tests/assets/tiny-000000.tar") as src:
        for member in src.getmembers():
            out.addfile(member, src.extractfile(member))
        png = src.extractfile("000000000.png").read()
        unsafe = [(f"{key}.{ext}", data) for key in UNSAFE_KEYS for ext, data in (("png", png), ("txt", b"a cap"))]
        for name, data in (("bad1.png", b"not a png"), ("bad1.txt", b"a caption"), ("bad2.png", b""), *unsafe):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))


def test_bad_input_counted_and_random_crops(tiny_assets, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    _crafted_shard(src / "mixed-000000.tar")
    manifest = precompute(str(tiny_assets["model"]), str(src), str(out), 16, batch_size=2, crops=3, seed=7)
    counts = manifest["counts"]
    assert counts["samples_written"] == 5 and counts["samples_read"] == 10
    assert {k: v for k, v in counts["bad"].items() if v} == {"undecodable": 1, "missing_caption": 1, "unsafe_name": 3}
    with tarfile.open(out / "mixed-000000.tar") as written:  # nothing that unpacks outside its folder
        assert all(not n.startswith("/") and ".." not in n.split("/") for n in written.getnames())
    assert manifest["latent_shape"] == [3, 4, 8, 8] and manifest["center_crop"] is False
    raws = {r.key: r for r in read_shards([str(out / "mixed-000000.tar")], BadInputLog())}
    wide = np.load(io.BytesIO(raws["000000001"].members["latent_mean.npy"]))  # 20x16: crops move
    assert wide.shape == (3, 4, 8, 8) and not (np.array_equal(wide[0], wide[1]) and np.array_equal(wide[1], wide[2]))
    # Training picks one of the K crops with the stream's position-seeded rng.
    rng = random.Random(5)
    k = random.Random(5).randrange(3)
    picked = decode_precomputed_sample(raws["000000001"], ImageTransform(16, center_crop=False), rng)
    assert np.array_equal(picked.latent_mean, wide[k])

    # Decoded in 2 worker processes instead of inline: the same bytes and the same bad-input counts
    # (a bad sample comes back in its place, so the batches are the same).
    again = precompute(str(tiny_assets["model"]), str(src), str(tmp_path / "w2"), 16, 2, 3, 7, workers=2)
    assert again["counts"] == counts and again["decode_workers"] == 2
    name = "mixed-000000.tar"
    assert (tmp_path / "w2" / name).read_bytes() == (out / name).read_bytes()


def test_out_that_is_or_nests_with_the_input_folder_is_refused(tiny_assets, tmp_path, capsys):
    """`--out` equal to the input shards' folder (also reached through a symlink), inside it, or
    above it: exit 2 naming the shard, before anything is written; the input shards are untouched."""
    src = tmp_path / "data" / "emoji"
    src.mkdir(parents=True)
    for i in range(2):
        shutil.copy(tiny_assets["data"] / f"train-{i:06d}.tar", src / f"train-{i:06d}.tar")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()}
    (tmp_path / "link").symlink_to(src)
    spec = f"{src}/train-{{000000..000001}}.tar"
    for out, relation in (
        (src, "is the folder of"),
        (tmp_path / "link", "is the folder of"),
        (src / "latents", "is inside the folder of"),
        (tmp_path / "data", "is a folder above"),
    ):
        args = ["--model", str(tiny_assets["model"]), "--src", spec, "--out", str(out), "--resolution", "32"]
        assert main_precompute(args) == 2
        said = capsys.readouterr().err
        assert f"{relation} the input shard {src}/train-000000.tar" in said and "would overwrite" in said
        assert not (src / "latents").exists()
        assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()} == before


BIND_MOUNTED = 'mount --bind "$1" "$2" 2>/dev/null || exit 77; exec "$3" -c "$4" "$2" "$1/train-000000.tar"'
CHECK = (
    "import sys; from sd_train.tools.precompute import check_out_apart_from_inputs as c; c(sys.argv[1], sys.argv[2:])"
)


def test_out_that_is_the_input_folder_through_a_bind_mount_is_refused(tmp_path):
    """A bind mount of the input folder resolves to another path and is the same folder: caught by
    os.path.samefile (run in a user and mount namespace, where mounting needs no privilege)."""
    src, mnt = tmp_path / "emoji", tmp_path / "mnt"
    src.mkdir(), mnt.mkdir()
    (src / "train-000000.tar").write_bytes(b"")
    unshare = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", BIND_MOUNTED, "sh"]
    proc = subprocess.run(
        [*unshare, str(src), str(mnt), sys.executable, CHECK], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    if proc.returncode == 77 or proc.stderr.startswith("unshare:"):
        pytest.skip(f"no unprivileged bind mount here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 1 and f"--out {mnt} is the folder of the input shard" in proc.stderr, proc.stderr


def _cfg(tiny_assets, spec: str, *extra: str):
    return load_config(
        "configs/test.yaml", [*tiny_assets["overrides"], "data.precomputed=true", f"data.train_shards={spec}", *extra]
    )


def test_mismatched_config_refused_with_field_named(tiny_assets, latents, tmp_path):
    out, _ = latents
    spec = f"{out}/train-{{000000..000007}}.tar"
    check_precomputed(spec, _cfg(tiny_assets, spec))
    check_precomputed(str(out), _cfg(tiny_assets, str(out)))  # the output folder works as a spec too
    with pytest.raises(ConfigError, match=r"data\.resolution=64 .* at resolution 32"):
        check_precomputed(spec, _cfg(tiny_assets, spec, "data.resolution=64"))
    with pytest.raises(ConfigError, match=r"data\.resolution=64"):  # the trainer's loader runs the check
        build_train_loader(_cfg(tiny_assets, spec, "data.resolution=64"), rank=0, world_size=1)
    with pytest.raises(ConfigError, match=r"data\.center_crop=false"):
        check_precomputed(spec, _cfg(tiny_assets, spec, "data.center_crop=false"))
    with pytest.raises(ConfigError, match=r"data\.random_flip"):
        check_precomputed(spec, _cfg(tiny_assets, spec, "data.random_flip=true"))
    with pytest.raises(ConfigError, match=r"not `sd-train precompute` output"):
        images = f"{tiny_assets['data']}/train-{{000000..000007}}.tar"
        check_precomputed(images, _cfg(tiny_assets, images))
    other = tmp_path / "other-sd"
    shutil.copytree(tiny_assets["model"], other)
    vae_config = json.loads((other / "vae/config.json").read_text())
    (other / "vae/config.json").write_text(json.dumps(vae_config | {"scaling_factor": 0.5}))
    with pytest.raises(ConfigError, match=r"model\.pretrained_path="):
        check_precomputed(spec, _cfg(tiny_assets, spec, f"model.pretrained_path={other}"))


def test_bucketed_precompute_stores_each_samples_bucket_and_the_run_checks_the_set(tiny_assets, tmp_path):
    """`sd-train precompute --buckets generated` over the LAION-like shards: every stored posterior has
    the shape of the sample's bucket (from an independent reading of the images), misfits are
    counted per reason and not stored, the run refuses another bucket set, and the training stream
    batches the stored latents by shape, each sample once per epoch."""
    model, out = str(tiny_assets["model"]), tmp_path / "laion-latents"
    args = ["--model", model, "--src", LAION_SPEC, "--out", str(out), "--resolution", "32", "--buckets", "generated"]
    args += ["--bucket-misfits", "filter"]
    assert main_precompute([*args, "--batch-size", "4"]) == 0
    manifest = json.loads((out / "precompute.json").read_text())
    vae_factor = 2 ** (
        len(json.loads((tiny_assets["model"] / "vae" / "config.json").read_text())["block_out_channels"]) - 1
    )
    sizes = [tuple(b) for b in manifest["buckets"]]
    want = {k: expected_bucket(s, sizes, 4.0, "filter") if s else "undecodable" for k, s in upright_sizes().items()}
    stored = {}
    for raw in read_shards(sorted(str(p) for p in out.glob("laion-*.tar")), BadInputLog()):
        shape = np.load(io.BytesIO(raw.members["latent_mean.npy"])).shape
        assert np.load(io.BytesIO(raw.members["latent_std.npy"])).shape == shape
        stored[raw.key] = f"{shape[2] * vae_factor}x{shape[3] * vae_factor}"
        assert shape[:2] == (1, 4)
    assert stored == {k: v for k, v in want.items() if "x" in v}
    assert manifest["bucket_counts"] == {f"{h}x{w}": sum(v == f"{h}x{w}" for v in stored.values()) for h, w in sizes}
    assert manifest["filtered"] == dict(Counter(v for v in want.values() if v.startswith("bucket_")))
    assert {k: v for k, v in manifest["counts"]["bad"].items() if v} == {"undecodable": 1}

    spec = f"{out}/laion-{{000000..000005}}.tar"
    check_precomputed(spec, _cfg(tiny_assets, spec, "data.buckets=generated"))
    with pytest.raises(ConfigError, match=r"data\.buckets=none but .* with aspect-ratio buckets"):
        check_precomputed(spec, _cfg(tiny_assets, spec))
    with pytest.raises(ConfigError, match=r"data\.buckets=\[\[32, 32\]\] resolves to \['32x32'\]"):
        check_precomputed(spec, _cfg(tiny_assets, spec, "data.buckets=[[32,32]]"))
    listed = [f"{h}x{w}" for h, w in sizes]  # the same set listed in another order is the same set
    check_precomputed(spec, _cfg(tiny_assets, spec, "data.buckets=" + json.dumps(sizes[::-1])))
    other = [s if s != (40, 24) else (48, 24) for s in sizes]  # as many buckets, one of them another
    with pytest.raises(ConfigError, match=rf"resolves to .*'48x24'.* with {re.escape(str(listed))}"):
        check_precomputed(spec, _cfg(tiny_assets, spec, "data.buckets=" + json.dumps(other)))
    with pytest.raises(ConfigError, match=r"data\.buckets='generated' but .* square"):
        square = f"{tiny_assets['data']}/train-{{000000..000007}}.tar"
        precomputed_square = tmp_path / "square"
        precompute(model, square.replace("{000000..000007}", "000000"), str(precomputed_square), 32)
        check_precomputed(str(precomputed_square), _cfg(tiny_assets, str(precomputed_square), "data.buckets=generated"))

    cfg = _cfg(tiny_assets, spec, "data.buckets=generated", "data.num_workers=0")
    batches = list(build_train_loader(cfg, rank=0, world_size=1, max_epochs=1))
    for b in batches:
        h, w = b["latent_mean"].shape[2:]
        assert b["bucket"] == f"{h * vae_factor}x{w * vae_factor}" and b["latent_std"].shape == b["latent_mean"].shape
    assert sorted(k for b in batches for k in b["keys"]) == sorted(stored)


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_training_on_precomputed_equals_online(tiny_assets, latents, tmp_path):
    out, _ = latents
    # ddp: the encode path does not depend on the strategy, and FSDP2's first AdamW step spends
    # ~10-30 s in DTensor sharding propagation on CPU, which would triple this test's time.
    common = [
        "--config",
        "configs/test.yaml",
        *tiny_assets["overrides"],
        "max_steps=4",
        "eval.every_steps=0",
        "metrics.log_every=1",
        "data.shuffle_buffer=0",
        "ema.enabled=false",
        "export_at_end=false",
        "data.log_keys=true",
        "dist.strategy=ddp",
    ]
    runs = {
        "online": [f"output_dir={tmp_path / 'online'}"],
        "precomputed": [
            f"output_dir={tmp_path / 'precomputed'}",
            "data.precomputed=true",
            f"data.train_shards={out}/train-{{000000..000007}}.tar",
        ],
    }
    with ThreadPoolExecutor(2) as pool:  # two single-threaded processes on two cores
        procs = list(
            pool.map(
                lambda extra: run([sys.executable, str(REPO / "train.py"), *common, *extra], timeout=240), runs.values()
            )
        )
    # Online, the step runs both frozen encoders; from precomputed shards with evaluation off
    # neither stays loaded (the text encoder ran once for the empty caption), the VAE never loads.
    assert "resident for the step: text_encoder, vae;" in procs[0].stdout
    assert "resident for the step: none;" in procs[1].stdout
    online, pre = _losses(tmp_path / "online"), _losses(tmp_path / "precomputed")
    assert sorted(online) == [1, 2, 3, 4]
    assert pre == online  # bitwise: same batches, same posterior draws, same noise
    keys = [(tmp_path / name / "keys" / "rank0.txt").read_text() for name in runs]
    assert keys[0] == keys[1]


def test_decoder_counts_broken_precomputed_samples(latents):
    from sd_train.data.bad_input import BadSample
    from sd_train.data.tar import RawSample

    out, _ = latents
    good = next(iter(read_shards([str(out / "train-000000.tar")], BadInputLog())))
    tf = ImageTransform(32)
    for members, category in (
        ({k: v for k, v in good.members.items() if k != "latent_std.npy"}, "missing_image"),
        (good.members | {"latent_mean.npy": b"\x93NUMPY garbage"}, "undecodable"),
        ({k: v for k, v in good.members.items() if k != "txt"}, "missing_caption"),
    ):
        with pytest.raises(BadSample) as e:
            decode_precomputed_sample(RawSample(good.key, good.shard, members), tf, None)
        assert e.value.category == category


@pytest.mark.multiproc
def test_two_processes_split_the_shards_and_a_rerun_skips_done_ones(tiny_assets, latents, tmp_path):
    """`torchrun -m sd_train.cli precompute` on 2 processes, each decoding in a worker process:
    each encodes half the shards, and the shards are byte-equal to the one-process output decoded
    inline (same batches per shard). A re-run on one process finds every shard done and rewrites
    nothing."""
    single, _ = latents
    out = tmp_path / "dist-latents"
    src = f"{tiny_assets['data']}/train-{{000000..000007}}.tar"
    args = ["precompute", "--model", str(tiny_assets["model"]), "--src", src, "--out", str(out), "--resolution", "32",
            "--batch-size", str(BATCH), "--workers", "1"]  # fmt: skip
    run(torchrun_cmd(2, "-m", "sd_train.cli", *args), timeout=300)
    manifest = json.loads((out / "precompute.json").read_text())
    assert [(p["rank"], p["shards"], p["shards_skipped"]) for p in manifest["processes"]] == [(0, 4, 0), (1, 4, 0)]
    assert manifest["counts"]["samples_written"] == 128

    def digests(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}

    assert digests(out) == digests(single) and len(digests(out)) == 8
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = run([sys.executable, "-m", "sd_train.cli", *args], timeout=300)
    assert "8 shards already done" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    assert json.loads((out / "precompute.json").read_text())["counts"]["samples_written"] == 128
