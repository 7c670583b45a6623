"""Stable Diffusion parts from a local diffusers folder: the trainable UNet and the frozen VAE,
text encoder and tokenizer, plus the two encoders the objective needs.

The tiny demo model (`sd-train build-tiny`) and a real SD 1.5 / 2-base folder load through this
same code; nothing is ever fetched from a hub.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from sd_train.config import ModelArgs
from sd_train.data.decode import pixels_to_float as uint8_to_unit_range
from sd_train.paths import check_model_folder


@dataclass
class SDParts:
    """The pieces of a Stable Diffusion model that training touches."""

    path: str
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler

    @property
    def vae_scale(self) -> float:
        return float(self.vae.config.scaling_factor)


def load_sd_parts(args: ModelArgs, device: torch.device, seed: int) -> SDParts:
    """Load every part; freeze VAE and text encoder. `init_unet=scratch` re-initialises the UNet
    from its config with `seed`, identically on every rank."""
    path = args.pretrained_path
    check_model_folder(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder must never trigger a hub lookup
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    if args.init_unet == "scratch":
        config = UNet2DConditionModel.load_config(path, subfolder="unet")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel.from_config(config)
    else:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    for frozen in (vae, text_encoder):
        frozen.requires_grad_(False)
        frozen.eval()
        frozen.to(device)
    unet.to(device)
    unet.train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return SDParts(path, tokenizer, text_encoder, vae, unet, noise_scheduler)


@torch.no_grad()
def encode_text(parts: SDParts, captions: list[str], device: torch.device) -> torch.Tensor:
    """CLIP last hidden state [B, 77, D], as SD conditions its UNet."""
    # A tokenizer saved without model_max_length reports a huge sentinel; the text encoder's
    # position table is the real limit (77 for every SD).
    length = min(parts.tokenizer.model_max_length, parts.text_encoder.config.max_position_embeddings)
    ids = parts.tokenizer(
        captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    return parts.text_encoder(ids)[0]


def pixels_to_float(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [B,3,H,W] in 0..255 -> float32 in [-1, 1] on `device` (the VAE's input range); the
    conversion itself is the data module's, so every path scales pixels the same way."""
    return uint8_to_unit_range(pixels.to(device))


@torch.no_grad()
def encode_pixels(parts: SDParts, pixels: torch.Tensor, device: torch.device, sample: bool = True) -> torch.Tensor:
    """uint8 images -> scaled latents. `sample` draws from the VAE posterior as SD training does
    (using the global RNG, which checkpoints restore); False takes its mean (validation)."""
    dist = parts.vae.encode(pixels_to_float(pixels, device)).latent_dist
    latents = dist.sample() if sample else dist.mean
    return latents * parts.vae_scale
