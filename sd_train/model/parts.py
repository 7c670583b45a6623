"""Stable Diffusion parts from a local diffusers folder: the trainable UNet and the frozen VAE,
text encoder(s) and tokenizer(s), plus the two encoders the objective needs.

The folder decides the family (sd_train.model.family): SD 1.x/2.x has one CLIP text encoder, SDXL
two (`text_encoder`, `text_encoder_2` with its pooled projection) and two tokenizers. The frozen
encoders are loaded on first use, the text encoders in `frozen_dtype` (bf16 when
`mixed_precision=bf16`, else fp32) and the VAE in `model.vae_dtype` (by default the same), and run
under `torch.inference_mode`. A run from precomputed latents needs the text encoders only at startup
(the empty caption, the held-out set, the sample prompts) and the VAE only for held-out latents and
sample grids: it loads nothing else and releases what it is done with.

The tiny demo models (`sd-train build-tiny [--family sdxl]`) and a real SD 1.5 / 2-base / SDXL
folder load through this same code; nothing is ever fetched from a hub.
"""

from __future__ import annotations

import inspect
import os
from collections import Counter
from typing import Optional

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sd_train.config import ModelArgs
from sd_train.model.conditioning import Conditioning
from sd_train.model.family import Family, model_family
from sd_train.model.tokenize import ID_KEYS, CaptionTokenizer

FROZEN = {"vae": AutoencoderKL, "text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
TEXT_ENCODERS: dict[str, tuple[str, ...]] = {"sd": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}
TOKENIZERS: dict[str, tuple[str, ...]] = {"sd": ("tokenizer",), "sdxl": ("tokenizer", "tokenizer_2")}
VAE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DEFAULT_VAE_SCALE = inspect.signature(AutoencoderKL.__init__).parameters["scaling_factor"].default


class SDParts:
    """The pieces of a Stable Diffusion model that training touches. The UNet, the noise schedule,
    the tokenizer(s) and the frozen parts' configs are loaded at once; the frozen VAE and text
    encoder(s) on first access of `vae` / `text_encoder` / `text_encoder_2` (counted in `loads`),
    and `release` drops them."""

    def __init__(
        self,
        path: str,
        tokenizers: tuple[CLIPTokenizer, ...],
        unet: UNet2DConditionModel,
        noise_scheduler: DDPMScheduler,
        device: torch.device,
        frozen_dtype: torch.dtype = torch.float32,
        family: Family = "sd",
        vae_dtype: Optional[torch.dtype] = None,
    ) -> None:
        self.path, self.tokenizers, self.unet, self.noise_scheduler = path, tokenizers, unet, noise_scheduler
        self.tokenizer = tokenizers[0]
        self.family, self.device, self.frozen_dtype = family, device, frozen_dtype
        self.vae_dtype = vae_dtype or frozen_dtype
        # The dtype the training step feeds the UNet (its parameters as loaded; FSDP2's param_dtype
        # and autocast cast from there): encoder outputs are handed over in it.
        self.step_dtype = next(unet.parameters()).dtype
        self.vae_config = dict(AutoencoderKL.load_config(path, subfolder="vae"))
        self.text_encoder_names = TEXT_ENCODERS[family]
        self.text_configs = [CLIPTextConfig.from_pretrained(path, subfolder=n) for n in self.text_encoder_names]
        self.text_config = self.text_configs[0]
        self.loads: Counter[str] = Counter()
        self._frozen: dict[str, torch.nn.Module] = {}

    def frozen(self, name: str) -> torch.nn.Module:
        """The frozen part `name` (a key of FROZEN), loaded on first use."""
        if name not in self._frozen:
            dtype = self.vae_dtype if name == "vae" else self.frozen_dtype
            module = FROZEN[name].from_pretrained(self.path, subfolder=name, torch_dtype=dtype)
            module.requires_grad_(False)
            module.eval()
            self._frozen[name] = module.to(self.device)
            self.loads[name] += 1
        return self._frozen[name]

    @property
    def vae(self) -> AutoencoderKL:
        return self.frozen("vae")  # type: ignore[return-value]

    @property
    def text_encoder(self) -> CLIPTextModel:
        return self.frozen("text_encoder")  # type: ignore[return-value]

    @property
    def text_encoder_2(self) -> CLIPTextModelWithProjection:
        """SDXL's second encoder (OpenCLIP ViT-bigG's text tower, with its pooled projection)."""
        return self.frozen("text_encoder_2")  # type: ignore[return-value]

    def load(self, *names: str) -> None:
        """Load frozen parts now (at startup, so a missing or oversized one fails before the first step)."""
        for name in names:
            self.frozen(name)

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
        return self.token_lengths[0]

    @property
    def token_lengths(self) -> tuple[int, ...]:
        """`token_length` of each tokenizer with its encoder."""
        pairs = zip(self.tokenizers, self.text_configs)
        return tuple(min(tok.model_max_length, cfg.max_position_embeddings) for tok, cfg in pairs)

    @property
    def text_width(self) -> int:
        """Width of the text embeddings the UNet cross-attends to (SDXL: both encoders' side by side)."""
        return sum(cfg.hidden_size for cfg in self.text_configs)

    def caption_tokenizer(self) -> CaptionTokenizer:
        """What the loader workers tokenize captions with: every tokenizer of the model."""
        return CaptionTokenizer(tuple(self.tokenizers), self.token_lengths)


def load_sd_parts(
    args: ModelArgs, device: torch.device, seed: int, frozen_dtype: torch.dtype = torch.float32, load_unet: bool = True
) -> SDParts:
    """Load the UNet and tokenizer(s) (the frozen VAE and text encoder(s) follow on first use,
    frozen: the encoders in `frozen_dtype`, the VAE in `model.vae_dtype`, `auto` meaning the same).
    `init_unet=scratch` re-initialises the UNet from its config with `seed`, identically on every rank.
    `load_unet=False` (tools that run only the frozen encoders, such as precompute) builds the UNet
    on the meta device instead: its config and dtype, no memory (SDXL's is 10 GB in fp32)."""
    path = args.pretrained_path
    family = model_family(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder must never trigger a hub lookup
    tokenizers = tuple(CLIPTokenizer.from_pretrained(path, subfolder=name) for name in TOKENIZERS[family])
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    config = UNet2DConditionModel.load_config(path, subfolder="unet")
    if not load_unet:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
    elif args.init_unet == "scratch":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel.from_config(config)
    else:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    if load_unet:
        unet.to(device)
        unet.train()
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
    vae_dtype = VAE_DTYPES.get(args.vae_dtype)  # `auto`: None, the encoders' dtype
    return SDParts(path, tokenizers, unet, noise_scheduler, device, frozen_dtype, family, vae_dtype)


def as_step_input(encoded: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An encoder output (an inference tensor) as a normal, contiguous tensor of `dtype` for the
    training step: autograd refuses to save inference tensors for backward (the cross-attention
    keeps its text input), so this always copies. Contiguous: the VAE returns channels_last latents
    for batches > 1 on CPU (diffusers' attention reshape, kept by the convs after it), and the
    objective's randn_like follows the layout (on a channels_last tensor torch draws other numbers)."""
    return encoded.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


@torch.inference_mode()
def encode_tokens(parts: SDParts, token_ids: dict[str, torch.Tensor], device: torch.device) -> Conditioning:
    """The text conditioning of token ids ([B, 77] per encoder, under `ID_KEYS`), as inference tensors.

    SD: CLIP's last hidden state [B, 77, D], as SD conditions its UNet. SDXL, as diffusers'
    `StableDiffusionXLPipeline.encode_prompt` defines it: each encoder's penultimate hidden state
    (`hidden_states[-2]`, the input of the last layer, without the final layer norm), the two
    concatenated [B, 77, D1 + D2] (768 + 1280 = 2048), and the pooled projection of
    `text_encoder_2` [B, P] (its `text_embeds`, at the first end-of-text token). The time ids
    come from the batch's geometry, not from here."""
    if parts.family == "sd":
        return Conditioning(parts.text_encoder(token_ids[ID_KEYS[0]].to(device, non_blocking=True))[0])
    states = []
    for name, key in zip(parts.text_encoder_names, ID_KEYS):
        out = parts.frozen(name)(token_ids[key].to(device, non_blocking=True), output_hidden_states=True)
        states.append(out.hidden_states[-2])
    return Conditioning(torch.cat(states, dim=-1), out.text_embeds)


def encode_text(parts: SDParts, captions: list[str], device: torch.device) -> Conditioning:
    """`encode_tokens` of the captions, tokenized here (the training loader tokenizes in its workers)."""
    return encode_tokens(parts, parts.caption_tokenizer()(captions), device)


def uint8_to_unit_range(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B,3,H,W] in 0..255 -> `dtype` in [-1, 1], the range the SD VAE expects: the one
    conversion every path (training, validation, precompute, the tiny model's VAE pretraining) feeds
    the VAE with. Do it on the device."""
    return pixels.to(dtype).div_(127.5).sub_(1.0)


def pixels_to_float(pixels: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B,3,H,W] in 0..255 -> `dtype` in [-1, 1] on `device` (`uint8_to_unit_range` there)."""
    return uint8_to_unit_range(pixels.to(device, non_blocking=True), dtype)


@torch.inference_mode()
def encode_pixels(parts: SDParts, pixels: torch.Tensor, device: torch.device, sample: bool = True) -> torch.Tensor:
    """uint8 images -> scaled latents, in the VAE's dtype. `sample` draws from the VAE posterior as
    SD training does (using the global RNG, which checkpoints restore); False takes its mean (validation)."""
    dist = parts.vae.encode(pixels_to_float(pixels, device, parts.vae_dtype)).latent_dist
    latents = dist.sample() if sample else dist.mean
    return latents * parts.vae_scale


@torch.inference_mode()
def decode_latents(parts: SDParts, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1], float32."""
    return parts.vae.decode((latents / parts.vae_scale).to(parts.vae_dtype)).sample.float()
