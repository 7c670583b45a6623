"""Stable Diffusion parts from a local diffusers folder: the trainable UNet and the frozen VAE,
text encoder and tokenizer, plus the two encoders the objective needs.

The frozen encoders are loaded on first use, in `frozen_dtype` (bf16 when `mixed_precision=bf16`,
else fp32), and run under `torch.inference_mode`. A run from precomputed latents needs the text
encoder only at startup (the empty caption, the held-out set, the sample prompts) and the VAE only
for held-out latents and sample grids: it loads nothing else and releases what it is done with.

The tiny demo model (`sd-train build-tiny`) and a real SD 1.5 / 2-base folder load through this
same code; nothing is ever fetched from a hub.
"""

from __future__ import annotations

import inspect
import os
from collections import Counter

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sd_train.config import ModelArgs
from sd_train.data.decode import pixels_to_float as uint8_to_unit_range
from sd_train.data.decode import tokenize_captions
from sd_train.paths import check_model_folder

FROZEN = {"vae": AutoencoderKL, "text_encoder": CLIPTextModel}
_DEFAULT_VAE_SCALE = inspect.signature(AutoencoderKL.__init__).parameters["scaling_factor"].default


class SDParts:
    """The pieces of a Stable Diffusion model that training touches. The UNet, the noise schedule,
    the tokenizer and the frozen parts' configs are loaded at once; the frozen VAE and text encoder
    on first access of `vae` / `text_encoder` (counted in `loads`), and `release` drops them."""

    def __init__(
        self,
        path: str,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        noise_scheduler: DDPMScheduler,
        device: torch.device,
        frozen_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.path, self.tokenizer, self.unet, self.noise_scheduler = path, tokenizer, unet, noise_scheduler
        self.device, self.frozen_dtype = device, frozen_dtype
        # The dtype the training step feeds the UNet (its parameters as loaded; FSDP2's param_dtype
        # and autocast cast from there): encoder outputs are handed over in it.
        self.step_dtype = next(unet.parameters()).dtype
        self.vae_config = dict(AutoencoderKL.load_config(path, subfolder="vae"))
        self.text_config = CLIPTextConfig.from_pretrained(path, subfolder="text_encoder")
        self.loads: Counter[str] = Counter()
        self._frozen: dict[str, torch.nn.Module] = {}

    def _get(self, name: str) -> torch.nn.Module:
        if name not in self._frozen:
            module = FROZEN[name].from_pretrained(self.path, subfolder=name, torch_dtype=self.frozen_dtype)
            module.requires_grad_(False)
            module.eval()
            self._frozen[name] = module.to(self.device)
            self.loads[name] += 1
        return self._frozen[name]

    @property
    def vae(self) -> AutoencoderKL:
        return self._get("vae")  # type: ignore[return-value]

    @property
    def text_encoder(self) -> CLIPTextModel:
        return self._get("text_encoder")  # type: ignore[return-value]

    def load(self, *names: str) -> None:
        """Load frozen parts now (at startup, so a missing or oversized one fails before the first step)."""
        for name in names:
            self._get(name)

    def resident(self) -> list[str]:
        """The frozen parts loaded now."""
        return sorted(self._frozen)

    def release(self, *names: str) -> None:
        """Drop frozen parts nothing needs any more; a later access loads them again (and counts)."""
        for name in names:
            self._frozen.pop(name, None)

    @property
    def vae_scale(self) -> float:
        return float(self.vae_config.get("scaling_factor", _DEFAULT_VAE_SCALE))

    @property
    def latent_downsampling(self) -> int:
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def token_length(self) -> int:
        """Token ids per caption. A tokenizer saved without model_max_length reports a huge
        sentinel; the text encoder's position table is the real limit (77 for every SD)."""
        return min(self.tokenizer.model_max_length, self.text_config.max_position_embeddings)


def load_sd_parts(
    args: ModelArgs, device: torch.device, seed: int, frozen_dtype: torch.dtype = torch.float32
) -> SDParts:
    """Load the UNet and tokenizer (the frozen VAE and text encoder follow on first use, frozen,
    in `frozen_dtype`). `init_unet=scratch` re-initialises the UNet from its config with `seed`,
    identically on every rank."""
    path = args.pretrained_path
    check_model_folder(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder must never trigger a hub lookup
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    if args.init_unet == "scratch":
        config = UNet2DConditionModel.load_config(path, subfolder="unet")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel.from_config(config)
    else:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    unet.to(device)
    unet.train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return SDParts(path, tokenizer, unet, noise_scheduler, device, frozen_dtype)


def as_step_input(encoded: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An encoder output (an inference tensor) as a normal, contiguous tensor of `dtype` for the
    training step: autograd refuses to save inference tensors for backward (the cross-attention
    keeps its text input), so this always copies. Contiguous: the VAE returns channels_last latents
    for batches > 1 on CPU (diffusers' attention reshape, kept by the convs after it), and the
    objective's randn_like follows the layout (on a channels_last tensor torch draws other numbers)."""
    return encoded.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


@torch.inference_mode()
def encode_tokens(parts: SDParts, input_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CLIP last hidden state [B, 77, D] of token ids [B, 77], as SD conditions its UNet."""
    return parts.text_encoder(input_ids.to(device, non_blocking=True))[0]


def encode_text(parts: SDParts, captions: list[str], device: torch.device) -> torch.Tensor:
    """`encode_tokens` of the captions, tokenized here (the training loader tokenizes in its workers)."""
    return encode_tokens(parts, tokenize_captions(parts.tokenizer, captions, parts.token_length), device)


def pixels_to_float(pixels: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B,3,H,W] in 0..255 -> `dtype` in [-1, 1] on `device` (the VAE's input range); the
    conversion itself is the data module's, so every path scales pixels the same way."""
    return uint8_to_unit_range(pixels.to(device, non_blocking=True), dtype)


@torch.inference_mode()
def encode_pixels(parts: SDParts, pixels: torch.Tensor, device: torch.device, sample: bool = True) -> torch.Tensor:
    """uint8 images -> scaled latents, in the VAE's dtype. `sample` draws from the VAE posterior as
    SD training does (using the global RNG, which checkpoints restore); False takes its mean (validation)."""
    dist = parts.vae.encode(pixels_to_float(pixels, device, parts.frozen_dtype)).latent_dist
    latents = dist.sample() if sample else dist.mean
    return latents * parts.vae_scale


@torch.inference_mode()
def decode_latents(parts: SDParts, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1], float32."""
    return parts.vae.decode((latents / parts.vae_scale).to(parts.frozen_dtype)).sample.float()
