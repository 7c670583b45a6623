"""The sample-quality instrument (sd_train.sample_quality) and its validation, in one process:

- the pieces: the Wilson interval against textbook values, the thumbnail features, the labels'
  layout against the samples' (a sampler that draws the named image every time scores 1 for any K);
- the validation the docs quote, on the demo's own 16 emoji with a tiny SD built here: a UNet with
  random weights scores near chance (1/16); the training images through the VAE score near 1; the
  committed demo grid scores 8 of 8, and the same grid with a snowman pasted over "pizza" (the miss
  seen in a cold `make demo`) scores 7 of 8 and names the snowman;
- `sd-train posthoc --eval`'s scoring (sd_train.tools.posthoc_eval.score_folders) reports the
  instrument's figures through the real sampler."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sd_train.config import load_config
from sd_train.evaluation import build_quality
from sd_train.model.parts import load_sd_parts
from sd_train.parallel.process_group import DistInfo
from sd_train.sample_quality import (
    SampleQuality,
    image_features,
    read_reference,
    score_features,
    wilson_interval,
)
from sd_train.tools.posthoc_eval import score_folders
from sd_train.tools.quality_check import grid_cells, grid_figures, random_unet_figures, vae_round_trip_figures

REPO = Path(__file__).resolve().parents[2]
GRID = REPO / "docs" / "demo_grid.png"
# VAE pretraining steps of the fixture's tiny SD: enough for recognisable reconstructions at 32 px
# (the demo trains 600).
VAE_STEPS = 150


def test_wilson_interval_matches_textbook_values():
    # Newcombe (1998), Table I: 0/10, 5/10 and 81/263 (here checked to 4 decimals).
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)


def test_features_are_8x8_block_means_and_ignore_nearest_upscaling():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    f = image_features(img)
    assert f.shape == (2, 192)
    block = img[1, 4:8, 8:12, 2].astype(np.float64).mean() / 255  # row 1, column 2 of channel 2
    assert f[1, 2 * 64 + 1 * 8 + 2].item() == pytest.approx(block)
    upscaled = img.repeat(4, axis=1).repeat(4, axis=2)  # how the sample grid shows a 32 px image
    assert torch.allclose(image_features(upscaled), f, atol=1e-12)


def test_labels_follow_the_samples_layout_for_any_k():
    """A sampler that returns, for every caption, exactly the image that caption names scores 1 for
    K = 1, 2, 3 (the labels match how `draw` lays the samples out); rolled by one caption it scores
    0 and names the caption each prompt went to."""
    rng = np.random.default_rng(1)
    reference = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    captions = [f"c{i}" for i in range(5)]
    for k in (1, 2, 3):
        q = SampleQuality(captions, reference, k, (4, 4, 4), seed=0)
        assert q.score(lambda model, latents: reference, None)["accuracy"] == 1.0
        rolled = q.score(lambda model, latents: np.roll(reference, 1, axis=0), None)
        assert rolled["accuracy"] == 0.0 and rolled["misses"]["c1"] == {"c0": k}
    # The initial noise depends on (seed, j, caption) only: a larger K keeps the first samples.
    assert torch.equal(SampleQuality(captions, reference, 2, (4, 4, 4), 7).initial_latents(1)[3],
                       SampleQuality(captions, reference, 5, (4, 4, 4), 7).initial_latents(1)[3])  # fmt: skip


def test_fidelity_is_the_mean_distance_to_the_named_image():
    ref = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    samples = torch.tensor([[0.1, 0.1], [0.9, 0.7], [0.2, 0.2]], dtype=torch.float64)
    s = score_features(samples, torch.tensor([0, 1, 1]), ref)
    assert s.nearest == [0, 1, 0] and s.accuracy == pytest.approx(2 / 3)
    expected = (math.sqrt(0.02 / 2) + math.sqrt((0.01 + 0.09) / 2) + math.sqrt(2 * 0.64 / 2)) / 3
    assert s.fidelity == pytest.approx(expected)


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory) -> dict:
    """The demo's 16 emoji at 32 px and a tiny SD whose VAE trained VAE_STEPS steps on them, with a
    config that points at both (the demo's eval settings, 5 DDIM steps to stay fast)."""
    from sd_train.tools.prepare import DEMO_EMOJI, prepare_emoji
    from sd_train.tools.tiny_sd import build_tiny_sd

    root = tmp_path_factory.mktemp("quality")
    data, model = root / "emoji", root / "tiny-sd"
    prepare_emoji(str(data), resolution=32, num_train_shards=8, val_count=8, seed=0, subset=DEMO_EMOJI)
    build_tiny_sd(str(data), str(model), resolution=32, vae_steps=VAE_STEPS, seed=0)
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["model"]["pretrained_path"] = str(model)
    raw["data"].update(train_shards=f"{data}/train-{{000000..000007}}.tar", val_shards=f"{data}/val-000000.tar")
    raw["eval"].update(num_inference_steps=5, num_val_samples=8)
    config = root / "demo.yaml"
    config.write_text(yaml.safe_dump(raw))
    return {"config": config, "model": model, "root": root}


def test_reference_is_the_16_training_images_one_per_caption(demo_set):
    cfg = load_config(str(demo_set["config"]))
    captions, images = read_reference(cfg)
    assert len(captions) == len(set(captions)) == 16 and images.shape == (16, 32, 32, 3)
    assert set(cfg.eval.prompts) <= set(captions)


def test_random_weights_score_near_chance(demo_set):
    cfg = load_config(str(demo_set["config"]))
    parts = load_sd_parts(cfg.model, torch.device("cpu"), cfg.seed)
    s = random_unet_figures(cfg, parts, samples=4, init_seed=0)
    lo, hi = s["accuracy_95"]
    assert s["samples"] == 64 and lo <= 1 / 16 <= hi and s["accuracy"] <= 0.2, s


def test_training_images_through_the_vae_score_near_one(demo_set):
    cfg = load_config(str(demo_set["config"]))
    parts = load_sd_parts(cfg.model, torch.device("cpu"), cfg.seed)
    parts.load("vae")
    s = vae_round_trip_figures(cfg, parts)
    assert s["samples"] == 16 and s["accuracy"] >= 15 / 16, s


def test_the_committed_demo_grid_scores_eight_of_eight_and_a_pasted_miss_is_named(demo_set, tmp_path):
    """docs/demo_grid.png: all eight recognisable by eye (docs/demo.md), so 8 of 8. Paste the
    training snowman over the "pizza" cell (row 2, column 1): 7 of 8, the miss named."""
    cfg = load_config(str(demo_set["config"]))
    s = grid_figures(cfg, GRID)
    assert s["samples"] == 8 and s["accuracy"] == 1.0 and not s["misses"], s
    captions, reference = read_reference(cfg)
    size = grid_cells(GRID, 8).shape[1]
    grid = np.asarray(Image.open(GRID).convert("RGB")).copy()
    snowman = reference[captions.index("an emoji of snowman")]
    grid[size : 2 * size, 0:size] = snowman.repeat(size // 32, axis=0).repeat(size // 32, axis=1)
    pasted = tmp_path / "grid.png"
    Image.fromarray(grid).save(pasted)
    s = grid_figures(cfg, pasted)
    assert s["accuracy"] == 7 / 8 and s["misses"] == {"an emoji of pizza": {"an emoji of snowman": 1}}


def test_posthoc_scoring_reports_the_instrument_through_the_real_sampler(demo_set, tmp_path):
    """`sd-train posthoc --eval --quality-samples 2` scores a pipeline folder: held-out loss and the
    instrument (32 samples of the 16 captions, drawn by evaluation's Sampler)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(demo_set["config"].read_text())
    scores = score_folders(run, {"raw": demo_set["model"]}, quality_samples=2)
    q = scores["raw"]["quality"]
    assert math.isfinite(scores["raw"]["loss"]) and q["samples"] == 32 and 0 <= q["accuracy"] <= 1
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    cfg = load_config(str(run / "config.yaml"))
    parts = load_sd_parts(cfg.model, torch.device("cpu"), cfg.seed)
    parts.load("vae", "text_encoder")
    again = build_quality(cfg, parts, info, 2).score(parts.unet)
    assert again == q, "the same weights, seeds and prompts: the same figures"
