"""Stable Diffusion model folders of a chosen shape, with random weights, built offline: the memory
benches (bench/bench_memory_plan.py, bench/rehearse.py) train them to compare the memory plan with
measured RSS. Not a benchmark itself.

The tokenizer is the tiny CLIP-layout BPE of sd_train/tools/tiny_sd.py, trained on the prepared
shards' captions; the text encoder is a CLIPTextModel of the chosen width and depth; the VAE is either
the tiny two-level one (factor 2) or Stable Diffusion's architecture (factor 8, 83.7M params); the
UNet is one of bench/benchlib.py's UNET_CONFIGS. Every weight is random (the memory and time of a
step do not depend on the values).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from benchlib import UNET_CONFIGS
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sd_train.tools.tiny_sd import (
    MODEL_MAX_LENGTH,
    build_scheduler,
    build_vae,
    load_captioned_images,
    shard_paths,
    train_tokenizer,
)

# Stable Diffusion's VAE (SD 1.x and 2.x, diffusers' vae/config.json): 83,653,863 params, factor 8.
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    scaling_factor=0.18215,
)


def text_encoder(vocab_size: int, tokenizer: Any, hidden: int, layers: int, seed: int) -> CLIPTextModel:
    """A random CLIPTextModel `hidden` wide and `layers` deep (SD2's OpenCLIP-H is 1024 x 23)."""
    heads = max(1, hidden // 64)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="gelu",
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def build_sd_folder(
    out_dir: str,
    data_dir: str,
    unet: str,
    text_hidden: int,
    text_layers: int = 2,
    vae: str = "tiny",
    resolution: int = 32,
    seed: int = 0,
) -> dict[str, int]:
    """Write a diffusers SD folder: UNET_CONFIGS[unet] with `cross_attention_dim` set to
    `text_hidden`, a `text_layers`-deep text encoder, and the `tiny` or `sd` VAE. Returns the
    parameter counts. Skips the build when `out_dir/model_index.json` exists."""
    if os.path.isfile(os.path.join(out_dir, "model_index.json")):
        return {}
    captions, _ = load_captioned_images(shard_paths(data_dir, "train"), 8, max_images=2000)
    tok_dir = os.path.join(out_dir, "tokenizer")
    tokenizer = train_tokenizer(captions, tok_dir)
    encoder = text_encoder(len(tokenizer), tokenizer, text_hidden, text_layers, seed)
    if vae == "sd":
        torch.manual_seed(seed + 1)
        autoencoder = AutoencoderKL(sample_size=resolution, **SD_VAE)
    else:
        autoencoder = build_vae(resolution, seed + 1)
    factor = 2 ** (len(autoencoder.config.block_out_channels) - 1)
    torch.manual_seed(seed + 2)
    model = UNet2DConditionModel(
        sample_size=resolution // factor, **{**UNET_CONFIGS[unet], "cross_attention_dim": text_hidden}
    )
    pipe = StableDiffusionPipeline(
        vae=autoencoder,
        text_encoder=encoder,
        tokenizer=tokenizer,
        unet=model,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # Write the BPE files again after the pipeline's save, which keeps only tokenizer.json.
    vocab, merges = _bpe_files(tok_dir)
    pipe.save_pretrained(out_dir)
    _restore_bpe_files(tok_dir, vocab, merges)

    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    return {"unet": count(model), "vae": count(autoencoder), "text_encoder": count(encoder)}


def _bpe_files(tok_dir: str) -> tuple[str, str]:
    with open(os.path.join(tok_dir, "vocab.json"), encoding="utf-8") as f:
        vocab = f.read()
    with open(os.path.join(tok_dir, "merges.txt"), encoding="utf-8") as f:
        return vocab, f.read()


def _restore_bpe_files(tok_dir: str, vocab: str, merges: str) -> None:
    with open(os.path.join(tok_dir, "vocab.json"), "w", encoding="utf-8") as f:
        f.write(vocab)
    with open(os.path.join(tok_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write(merges)


def emoji_data(out_dir: str, resolution: int, train: int, val: int, shards: int) -> str:
    """`train` + `val` Twemoji samples at `resolution` as `shards` train shards and one val shard
    (skipped when written before)."""
    from sd_train.tools.prepare import prepare_emoji

    if not os.path.isfile(os.path.join(out_dir, "dataset.json")):
        prepare_emoji(out_dir, resolution=resolution, num_train_shards=shards, val_count=val, seed=0, limit=train + val)
    return out_dir


def sd2_assets(root: str) -> dict[str, str]:
    """The SD2-base-shaped folder (the real UNet config, SD's VAE, a 2-layer 1024-wide text encoder,
    random weights), 16 training images at 256 px precomputed into 16 latent shards (fp16, as the
    template stores them), and 4 held-out images: what bench/rehearse.py and
    bench/bench_memory_plan.py train on. Built once under `root`."""
    import subprocess
    import sys

    data = emoji_data(os.path.join(root, "emoji256"), 256, train=16, val=4, shards=16)
    model = os.path.join(root, "sd2-base-shaped")
    build_sd_folder(model, data, "sd2_base", text_hidden=1024, text_layers=2, vae="sd", resolution=256)
    latents = os.path.join(root, "latents256")
    if not os.path.isfile(os.path.join(latents, "precompute.json")):
        cmd = [sys.executable, "-m", "sd_train.cli", "precompute", "--model", model, "--src",
               os.path.join(data, "train-{000000..000015}.tar"), "--out", latents, "--resolution", "256",
               "--dtype", "float16", "--batch-size", "4"]  # fmt: skip
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return {
        "model": model,
        "train_shards": os.path.join(latents, "train-{000000..000015}.tar"),
        "val_shards": os.path.join(data, "val-000000.tar"),
    }
