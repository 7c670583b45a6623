"""SDXL's inputs from the data path: the six micro-conditioning ids of each training sample, checked
against an independent reading of the source images and the training pixels (non-square images,
random crops, flips), up to what reaches the UNet; the two tokenizers run in the loader workers;
and precomputed SDXL shards (embeddings, pooled embedding, geometry), with the refusal of shards
made for another family or resolution."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd_train.config import ConfigError, ModelArgs, ObjectiveArgs, TrainConfig
from sd_train.data.bad_input import BadInputLog
from sd_train.data.decode import ImageTransform, decode_image_sample
from sd_train.data.loader import TrainLoader, build_train_loader
from sd_train.data.precomputed import check_precomputed, decode_precomputed_sample, stack_precomputed
from sd_train.data.sources import expand_sources
from sd_train.data.stream import ShardStream
from sd_train.data.tar import add_member, read_shards
from sd_train.model.conditioning import batch_time_ids, stored_conditioning
from sd_train.model.parts import encode_text, encode_tokens, load_sd_parts
from sd_train.objective import DiffusionObjective
from sd_train.tools.precompute import precompute
from tests.support.streams import take

CPU = torch.device("cpu")
RES = 16
SIZES = [(40, 16), (16, 40), (37, 23), (24, 24), (100, 20), (21, 55)]  # (W, H) as PIL writes them


@pytest.fixture(scope="module")
def noise_shards(tmp_path_factory) -> str:
    """Two shards of asymmetric noise images of the sizes above: any wrong corner, a forgotten
    mirror or a swapped (H, W) picks other numbers or other pixels."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for s in range(2):
        with tarfile.open(root / f"noise-{s:06d}.tar", "w") as tar:
            for i, (w, h) in enumerate(SIZES * 2):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
                key = f"{s}{i:08d}"
                add_member(tar, f"{key}.png", buf.getvalue())
                add_member(tar, f"{key}.txt", f"noise number {i}".encode())
    return str(root / "noise-{000000..000001}.tar")


@pytest.fixture(scope="module")
def parts(tiny_sdxl):
    return load_sd_parts(ModelArgs(pretrained_path=str(tiny_sdxl["model"])), CPU, seed=0)


def expected_time_ids(raw_png: bytes, pixels: np.ndarray) -> tuple[list[int], bool]:
    """SDXL's six ids of one training sample, computed here from the source image and the training
    pixels alone: (H, W) of the source; the corner (top, left) at which the training pixels sit in
    the resized image, or in its mirror image when they were flipped; (H, W) of the training image.
    Also whether they were flipped."""
    image = Image.open(io.BytesIO(raw_png)).convert("RGB")
    w, h = image.size
    scale = RES / min(w, h)
    full = np.array(image.resize((max(RES, round(w * scale)), max(RES, round(h * scale))), Image.Resampling.BICUBIC))
    found = [
        (top, left, flipped)
        for flipped, source in ((False, full), (True, full[:, ::-1]))
        for top in range(full.shape[0] - RES + 1)
        for left in range(full.shape[1] - RES + 1)
        if np.array_equal(source[top : top + RES, left : left + RES], pixels)
    ]
    assert len(found) == 1, found  # noise: exactly one place, in exactly one orientation
    top, left, flipped = found[0]
    return [h, w, top, left, RES, RES], flipped


def test_time_ids_are_the_source_size_crop_and_target_in_height_width_order(noise_shards, parts):
    """Through the training loader (random crops and flips of non-square images, the model's two
    tokenizers in the worker) to what the objective hands the UNet: each sample's six ids equal
    the independent reading above. Swapping H and W, or a crop corner not mirrored after a flip,
    gives other numbers."""
    stream = ShardStream(
        expand_sources(noise_shards), rank=0, world_size=1, num_workers=1, seed=5, batch_size=6,
        transform=ImageTransform(RES, center_crop=False, random_flip=True), shuffle_buffer=0, max_epochs=2,
        tokenize=parts.caption_tokenizer(),
    )  # fmt: skip
    batches = take(TrainLoader(stream, 1), 8)
    urls = expand_sources(noise_shards)[0].urls
    raw = {r.key: r.members["png"] for r in read_shards(sorted(urls), BadInputLog())}
    flips, wide, tall, moved = 0, False, False, False
    for batch in batches:
        ids = batch_time_ids(batch)
        assert ids.dtype == torch.int64 and ids.shape == (6, 6)
        for row, key in enumerate(batch["keys"]):
            want, flipped = expected_time_ids(raw[key], batch["pixels"][row].permute(1, 2, 0).numpy())
            assert ids[row].tolist() == want, (key, flipped)
            flips += flipped
            wide, tall = wide or want[1] > want[0], tall or want[0] > want[1]
            moved |= flipped and want[3] != 0
        # What reaches the UNet: the same ids, under added_cond_kwargs["time_ids"].
        spy = SpyUNet()
        cond = encode_tokens(parts, batch, CPU).map(torch.clone).with_geometry(batch)
        objective = DiffusionObjective(
            ObjectiveArgs(caption_dropout=0.0), parts.noise_scheduler.alphas_cumprod, cond[:1]
        )
        objective.loss(spy, torch.zeros(6, 4, RES // 2, RES // 2), cond)
        assert torch.equal(spy.kwargs["added_cond_kwargs"]["time_ids"], ids)
    assert wide and tall and moved and 0 < flips < 8 * 6  # both orientations; flipped crops off the edge too


class SpyUNet(torch.nn.Module):
    """Records the keyword arguments of its last call; predicts zeros."""

    def forward(self, sample, timestep, **kwargs):
        self.kwargs = kwargs
        return type("Out", (), {"sample": torch.zeros_like(sample)})()


def test_loader_workers_tokenize_for_both_encoders(tiny_sdxl, parts):
    """The workers' ids are each tokenizer's own (tokenizer_2 pads with `!`, SDXL's pad token, not
    with end-of-text), and the step's encoding of them is the captions' encoding, bitwise."""
    cfg = TrainConfig()
    cfg.data.train_shards, cfg.data.resolution, cfg.micro_batch_size = str(tiny_sdxl["shards"]), RES, 4
    batch = take(build_train_loader(cfg, 0, 1, max_epochs=1, tokenize=parts.caption_tokenizer()), 1)[0]
    for key, tok in (("input_ids", parts.tokenizers[0]), ("input_ids_2", parts.tokenizers[1])):
        want = tok(batch["captions"], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        assert torch.equal(batch[key], want.input_ids), key
    assert parts.tokenizers[1].pad_token == "!" and (batch["input_ids_2"][:, -1] == 0).all()
    assert not torch.equal(batch["input_ids"], batch["input_ids_2"])
    online = encode_text(parts, batch["captions"], CPU)
    stepped = encode_tokens(parts, batch, CPU)
    assert torch.equal(stepped.text_embeds, online.text_embeds) and torch.equal(stepped.pooled, online.pooled)


@pytest.fixture(scope="module")
def sdxl_latents(tiny_sdxl, tmp_path_factory) -> Path:
    """One committed non-square shard precomputed with the tiny SDXL, 2 random crops per sample."""
    out = tmp_path_factory.mktemp("sdxl-latents")
    shard = Path(str(tiny_sdxl["shards"]).replace("{000000..000005}", "000002"))
    precompute(str(tiny_sdxl["model"]), str(shard), str(out), RES, batch_size=5, crops=2, seed=3)
    return out / shard.name


def test_precomputed_sdxl_shards_hold_what_online_training_computes(tiny_sdxl, parts, sdxl_latents):
    """Each sample stores both encoders' penultimate states side by side, the pooled embedding and
    every crop's geometry; the training conditioning read from them (stored_conditioning) equals
    the online one bitwise, time ids included, for whichever crop the stream picks."""
    samples = [
        decode_precomputed_sample(r, ImageTransform(RES), None) for r in read_shards([str(sdxl_latents)], BadInputLog())
    ]
    raw = list(read_shards([str(sdxl_latents)], BadInputLog()))
    meta = json.loads(raw[0].members["json"])["sd_train_precompute"]
    assert meta["family"] == "sdxl" and meta["crops"] == 2
    assert np.load(io.BytesIO(raw[0].members["geometry.npy"])).dtype == np.int64
    batch = stack_precomputed(samples)
    assert batch["text_embeds"].shape == (5, 77, 96) and batch["pooled_embeds"].shape == (5, 32)
    stored = stored_conditioning(batch, CPU, torch.float32)
    online = encode_text(parts, [s.caption for s in samples], CPU).with_geometry(batch)
    assert torch.equal(stored.text_embeds, online.text_embeds) and torch.equal(stored.pooled, online.pooled)
    # The geometry of the crop stored first, as the data path decodes that crop of the source image.
    source = {
        r.key: r for r in read_shards([str(tiny_sdxl["shards"]).replace("{000000..000005}", "000002")], BadInputLog())
    }
    for row, s in enumerate(samples):
        crop = decode_image_sample(source[s.key], ImageTransform(RES, center_crop=False), random.Random(f"3/{s.key}/0"))
        g = crop.geometry
        assert stored.time_ids[row].tolist() == [*g.original_size, *g.crop_top_left, *g.target_size]
    assert len({tuple(r) for r in stored.time_ids[:, :2].tolist()}) > 1  # non-square sources


def test_precomputed_shards_of_another_family_or_resolution_refused(tiny_assets, tiny_sdxl, sdxl_latents):
    def cfg(model: Path, resolution: int = RES) -> TrainConfig:
        c = TrainConfig()
        c.model.pretrained_path, c.data.precomputed, c.data.center_crop = str(model), True, False
        c.data.resolution = resolution
        return c

    check_precomputed(str(sdxl_latents), cfg(tiny_sdxl["model"]))  # the right model: accepted
    with pytest.raises(ConfigError, match=r"is an SD 1.x/2.x folder but .* was precomputed for an SDXL model"):
        check_precomputed(str(sdxl_latents), cfg(tiny_assets["model"]))
    with pytest.raises(ConfigError, match=r"data.resolution=32 but .* was precomputed at resolution 16"):
        check_precomputed(str(sdxl_latents), cfg(tiny_sdxl["model"], 32))


def test_sd_precomputed_shards_refused_for_sdxl(tiny_assets, tiny_sdxl, tmp_path):
    shard = tiny_assets["data"] / "train-000000.tar"
    precompute(str(tiny_assets["model"]), str(shard), str(tmp_path), 32, batch_size=8)
    c = TrainConfig()
    c.model.pretrained_path, c.data.precomputed, c.data.resolution = str(tiny_sdxl["model"]), True, 32
    with pytest.raises(ConfigError, match=r"is an SDXL folder but .* was precomputed for an SD 1.x/2.x model"):
        check_precomputed(str(tmp_path / shard.name), c)
