"""The shard writer: Twemoji captions, the img2dataset layout, the fixed split, folder input."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd_train import cli as sd_train_cli
from sd_train.config import load_config
from sd_train.errors import OutputRefusedError
from sd_train.tools import prepare

REPO = Path(__file__).resolve().parents[2]


def _members(path: str) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def _captions(paths: list[str]) -> dict[str, str]:
    """key -> caption, read with plain tarfile."""
    out = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for m in tar:
                if m.name.endswith(".txt"):
                    out[m.name[: -len(".txt")]] = tar.extractfile(m).read().decode("utf-8")
    return out


def test_emoji_caption_names() -> None:
    assert prepare.emoji_name("1f354") == ":hamburger:"
    assert prepare.caption_from_name(":hamburger:") == "an emoji of hamburger"
    assert prepare.caption_from_name(":red_heart:") == "an emoji of red heart"
    # Twemoji drops U+FE0F from file names that Unicode sequences carry: still found.
    assert prepare.emoji_name("2764") == ":red_heart:"
    # A lone regional indicator letter has no emoji name: skipped.
    assert prepare.emoji_name("1f1e6") is None


def test_emoji_samples_are_captioned_rgb_squares() -> None:
    samples = prepare.emoji_samples(resolution=16, limit=8)
    assert [s.key for s in samples] == [f"{i:09d}" for i in range(8)]
    for s in samples:
        assert s.image.mode == "RGB" and s.image.size == (16, 16)
        assert s.caption.startswith("an emoji of ") and "_" not in s.caption and ":" not in s.caption
        assert s.meta["source"] == "twemoji" and s.meta["width"] == 16


def test_prepare_emoji_layout_split_and_determinism(tmp_path: Path) -> None:
    out_a, out_b = str(tmp_path / "a"), str(tmp_path / "b")
    man = prepare.prepare_emoji(out_a, resolution=16, num_train_shards=3, val_count=10, seed=1, limit=64)
    prepare.prepare_emoji(out_b, resolution=16, num_train_shards=3, val_count=10, seed=1, limit=64)
    assert man["counts"] == {"total": 64, "train": 54, "val": 10, "skipped_no_caption": None}
    assert man["train_shards"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert man["val_shards"] == ["val-000000.tar"]
    assert json.loads((tmp_path / "a" / "dataset.json").read_text())["license"].endswith("CC-BY 4.0")

    train_paths = [os.path.join(out_a, n) for n in man["train_shards"]]
    val_path = os.path.join(out_a, "val-000000.tar")
    names = _members(train_paths[0])
    keys = sorted({n.split(".")[0] for n in names})
    assert sorted(names) == sorted(f"{k}.{e}" for k in keys for e in ("png", "txt", "json"))
    assert [len(_captions([p])) for p in train_paths] == [18, 18, 18]

    train_keys, val_keys = set(_captions(train_paths)), set(_captions([val_path]))
    assert len(val_keys) == 10 and not train_keys & val_keys
    assert len(train_keys | val_keys) == 64
    # Same inputs -> byte-identical shards (fixed mtime, fixed order).
    for name in man["train_shards"] + man["val_shards"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # A different seed draws a different held-out set.
    other = prepare.prepare_emoji(
        str(tmp_path / "c"), resolution=16, num_train_shards=3, val_count=10, seed=2, limit=64
    )
    assert other["counts"]["val"] == 10
    assert set(_captions([str(tmp_path / "c" / "val-000000.tar")])) != val_keys


def test_rewrite_removes_stale_shards(tmp_path: Path) -> None:
    prepare.prepare_emoji(str(tmp_path), resolution=8, num_train_shards=4, val_count=4, limit=24)
    prepare.prepare_emoji(str(tmp_path), resolution=8, num_train_shards=2, val_count=4, limit=24)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]


def test_shards_read_back_with_webdataset(tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    samples = prepare.emoji_samples(resolution=16, limit=6)
    paths = prepare.write_shards(samples, str(tmp_path), "train", num_shards=2, image_format="jpg")
    assert [os.path.basename(p) for p in paths] == ["train-000000.tar", "train-000001.tar"]
    got = {s["__key__"]: s for s in wds.WebDataset(paths, shardshuffle=False).decode("pil")}
    assert set(got) == {s.key for s in samples}
    for s in samples:
        assert got[s.key]["txt"] == s.caption
        assert got[s.key]["jpg"].size == (16, 16)
        assert got[s.key]["json"]["codepoints"] == s.meta["codepoints"]


def _write_folder(src: Path) -> None:
    """Five images: a transparent PNG, a wide JPEG, a tall WebP in a subfolder, one without caption."""
    (src / "sub").mkdir(parents=True)
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (5, 5, 15, 15))
    rgba.save(src / "a_red.png")
    (src / "a_red.txt").write_text("a red square\n")
    wide = Image.new("RGB", (40, 20), (0, 0, 255))
    wide.paste((0, 255, 0), (10, 0, 30, 20))  # the center square is green; the sides blue
    wide.save(src / "b_wide.jpg", quality=100)
    (src / "b_wide.txt").write_text("a green square")
    Image.new("RGB", (10, 30), (200, 200, 0)).save(src / "sub" / "c_tall.webp")
    (src / "sub" / "c_tall.txt").write_text("a yellow bar")
    Image.new("RGB", (12, 12), (9, 9, 9)).save(src / "d_nocap.png")
    Image.new("RGB", (12, 12), (9, 9, 9)).save(src / "e_gray.png")
    (src / "e_gray.txt").write_text("a dark gray square")


def test_prepare_folder(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _write_folder(src)
    man = prepare.prepare_folder(
        str(src), str(out), resolution=8, num_train_shards=2, val_count=1, seed=0, image_format="png"
    )
    assert man["counts"] == {
        "total": 4,
        "train": 3,
        "val": 1,
        "skipped_no_caption": 1,
        "skipped_bad": {"undecodable": 0, "undecodable_caption": 0},
    }
    assert man["skipped_no_caption"] == ["d_nocap.png"]
    paths = [str(out / n) for n in man["train_shards"] + man["val_shards"]]
    assert len(paths) == 3
    captions = _captions(paths)
    assert sorted(captions.values()) == ["a dark gray square", "a green square", "a red square", "a yellow bar"]

    by_caption = {}
    for path in paths:
        with tarfile.open(path) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar}
        for name, data in files.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                image = Image.open(io.BytesIO(files[meta["key"] + ".png"])).convert("RGB")
                by_caption[meta["caption"]] = (meta, image)
    meta, img = by_caption["a green square"]
    assert (meta["original_width"], meta["original_height"], meta["path"]) == (40, 20, "b_wide.jpg")
    assert img.size == (8, 8)
    # Center crop: no blue from the sides survives.
    pixels = np.asarray(img)
    assert (pixels[..., 2] < 60).all() and (pixels[..., 1] > 200).all()
    # Transparency composited on white: the corner is white, the center red.
    _, red = by_caption["a red square"]
    assert red.getpixel((0, 0)) == (255, 255, 255) and red.getpixel((4, 4))[0] > 200
    assert by_caption["a yellow bar"][0]["path"] == os.path.join("sub", "c_tall.webp")


def test_prepare_skips_unreadable_input_and_swaps_the_set_in_only_when_complete(tmp_path, monkeypatch, capsys):
    """An image PIL cannot read and a caption that is not UTF-8 are skipped, counted by the loader's
    category names and reported; the new shards replace the old ones only once all are written (a
    failure midway leaves the old set byte for byte), files of the folder that prepare did not
    write are kept, and a folder that is not a prepared data set is refused by name."""
    src, out = tmp_path / "src", tmp_path / "out"
    _write_folder(src)
    (src / "f_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (src / "f_broken.txt").write_text("a broken image")
    Image.new("RGB", (12, 12), (1, 2, 3)).save(src / "g_latin1.png")
    (src / "g_latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    args = ["--src", str(src), "--out", str(out), "--resolution", "8", "--num-train-shards", "2", "--val-count", "1"]
    assert prepare.main_prepare_folder(args) == 0
    said = capsys.readouterr().out
    assert "skipped unreadable input {'undecodable': 1, 'undecodable_caption': 1}" in said
    man = json.loads((out / "dataset.json").read_text())
    assert man["counts"]["skipped_bad"] == {"undecodable": 1, "undecodable_caption": 1}
    assert sorted(man["skipped_bad"]) == ["f_broken.png", "g_latin1.txt"]
    assert man["counts"]["train"] + man["counts"]["val"] == 4
    (out / ".done").write_text("a build stamp")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    real_write_tar, calls = prepare.write_tar, []

    def fail_on_the_second_shard(path, samples, image_format="png"):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write_tar(path, samples, image_format)

    monkeypatch.setattr(prepare, "write_tar", fail_on_the_second_shard)
    with pytest.raises(OSError, match="disk full"):  # a new set at another resolution, failing midway
        prepare.prepare_folder(str(src), str(out), resolution=16, num_train_shards=3, val_count=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "the old set is intact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"], "no staging folder left behind"
    monkeypatch.setattr(prepare, "write_tar", real_write_tar)
    prepare.prepare_folder(str(src), str(out), resolution=8, num_train_shards=3, val_count=1)
    assert sorted(p.name for p in out.glob("*.tar")) == [f"train-00000{i}.tar" for i in range(3)] + ["val-000000.tar"]
    assert (out / ".done").read_text() == "a build stamp", "a file prepare did not write is kept"

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(OutputRefusedError, match=r"not a data set written by sd-train prepare .*it holds notes.txt"):
        prepare.prepare_folder(str(src), str(tmp_path / "mine"), resolution=8, num_train_shards=2, val_count=1)
    cli = ["prepare", "--src", str(src), "--out", str(tmp_path / "mine"), "--val-count", "1"]
    assert sd_train_cli.main(cli) == 2 and "refusing to replace it" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_prepare_folder_rejects_bad_val_count(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _write_folder(src)
    with pytest.raises(ValueError, match="--val-count"):
        prepare.prepare_folder(str(src), str(tmp_path / "out"), resolution=8, num_train_shards=1, val_count=4)


def test_cli_prepare_emoji(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = prepare.main_prepare_emoji(
        ["--out", str(tmp_path), "--resolution", "8", "--limit", "20", "--val-count", "4", "--num-train-shards", "2"]
    )
    assert rc == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("wrote 16 train samples in 2 shards + 4 val")


def _names(paths: list[str]) -> list[str]:
    """The `name` field of every sample's .json, in shard order, read with plain tarfile."""
    out = []
    for path in paths:
        with tarfile.open(path) as tar:
            out += [json.load(tar.extractfile(m))["name"] for m in tar if m.name.endswith(".json")]
    return out


def test_subset_trains_the_named_emoji_and_holds_out_others(tmp_path: Path) -> None:
    """--subset: the train shards hold exactly the named emoji, the val shard only others."""
    names = ["red_apple", "hamburger", "grinning_face", "rocket", "pizza"]
    rc = prepare.main_prepare_emoji(
        ["--out", str(tmp_path), "--resolution", "8", "--subset", ",".join(names), "--val-count", "6"]
        + ["--num-train-shards", "2"]
    )
    assert rc == 0
    man = json.loads((tmp_path / "dataset.json").read_text())
    assert man["subset"] == names and man["counts"]["train"] == 5 and man["counts"]["val"] == 6
    train = _names([str(tmp_path / s) for s in man["train_shards"]])
    val = _names([str(tmp_path / s) for s in man["val_shards"]])
    assert train == [f":{n}:" for n in names]
    assert len(val) == 6 and not set(val) & set(train)
    captions = _captions([str(tmp_path / s) for s in man["train_shards"]])
    assert sorted(captions.values()) == sorted(f"an emoji of {n.replace('_', ' ')}" for n in names)


def test_demo_subset_names_exist_and_lead_with_the_grid_prompts() -> None:
    samples = prepare.emoji_samples(resolution=8)
    train, val = prepare.subset_indices(prepare.DEMO_EMOJI, samples, val_count=64, seed=0)
    assert len(train) == len(set(train)) == len(prepare.DEMO_EMOJI) == 16
    assert [samples[i].caption for i in train[:4]] == [
        "an emoji of red apple",
        "an emoji of hamburger",
        "an emoji of grinning face",
        "an emoji of rocket",
    ]
    assert len(val) == 64 and not set(val) & set(train)
    demo = load_config(str(REPO / "configs" / "demo.yaml"))
    assert set(demo.eval.prompts) <= {samples[i].caption for i in train}, "the demo grid asks for an untrained emoji"
    with pytest.raises(ValueError, match=r"no emoji named \['red_aple'\]"):
        prepare.subset_indices(["red_aple"], samples, val_count=1, seed=0)


def test_prepare_folder_never_follows_a_caption_link(tmp_path: Path) -> None:
    """A caption file that is a symbolic link (here to a secret outside the folder) is not read:
    the image is left out, named among the images without a caption, and the secret is in no shard."""
    src, out = tmp_path / "src", tmp_path / "out"
    _write_folder(src)
    secret = tmp_path / "credentials"
    secret.write_text("aws_secret_access_key=HUNTER2")
    Image.new("RGB", (12, 12), (1, 2, 3)).save(src / "sub" / "f_linked.png")
    os.symlink(secret, src / "sub" / "f_linked.txt")
    man = prepare.prepare_folder(str(src), str(out), resolution=8, num_train_shards=1, val_count=1)
    assert man["skipped_no_caption"] == ["d_nocap.png", os.path.join("sub", "f_linked.png")]
    assert man["counts"]["total"] == 4, "the four captioned images without links, as before"
    for shard in out.glob("*.tar"):
        assert b"HUNTER2" not in shard.read_bytes()
