"""The tiny SDXL parts of `sd-train build-tiny --family sdxl`: the layout of
stabilityai/stable-diffusion-xl-base-1.0 at toy size, built offline.

What makes it SDXL, as the real folder has it:
- two text encoders: `text_encoder`, a CLIPTextModel (hidden 32, quick_gelu, as CLIP ViT-L), and
  `text_encoder_2`, a CLIPTextModelWithProjection (hidden 64, gelu, as OpenCLIP bigG) whose
  projection (32) is the pooled embedding;
- two tokenizers with the same BPE: `tokenizer` pads with `<|endoftext|>`, `tokenizer_2` with `!`,
  as SDXL's two do;
- a UNet with `addition_embed_type: text_time`: cross-attention over both encoders' hidden states
  side by side (32 + 64 = 96), and an added embedding of the pooled projection plus the six
  size/crop ids, each embedded in `addition_time_embed_dim` (8) sinusoids, so
  `projection_class_embeddings_input_dim` = 6 x 8 + 32 = 80 (SDXL: 6 x 256 + 1280 = 2816);
  two transformer blocks per Transformer2DModel at the lowest resolution (SDXL: 10), so that
  splitting a Transformer2DModel into FSDP units is exercised;
- SDXL's EulerDiscreteScheduler configuration (the same training betas as SD).
The VAE, the BPE and the UNet's levels are the tiny SD build's (sd_train.tools.tiny_sd).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sd_train.model.family import SDXL_BASE_UNET, TIME_IDS

HIDDEN_1, HIDDEN_2, POOLED = 32, 64, 32
TIME_EMBED_DIM = 8
MAX_LENGTH = 77


def _text_config(tokenizer: Any, hidden: int, act: str, projection_dim: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act=act,
        projection_dim=projection_dim,
        # eos_token_id != 2 selects the pooled output at the first EOS, not the legacy argmax.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_text_encoders(tokenizer: Any, tokenizer_2: Any, seed: int) -> tuple[Any, Any]:
    """Random, frozen CLIP text encoders: ViT-L-like (no projection used) and bigG-like (projected)."""
    torch.manual_seed(seed)
    first = CLIPTextModel(_text_config(tokenizer, HIDDEN_1, "quick_gelu", HIDDEN_1)).eval()
    torch.manual_seed(seed + 1)
    second = CLIPTextModelWithProjection(_text_config(tokenizer_2, HIDDEN_2, "gelu", POOLED)).eval()
    return first, second


def build_unet(sd_unet: dict[str, Any], latent_size: int, seed: int) -> UNet2DConditionModel:
    """The tiny SD UNet's levels (`sd_unet`, its config: 32, 64, 64) with SDXL base's layout and
    conditioning at the tiny widths (see the module docstring); two transformer blocks at the
    lowest level where SDXL has 10."""
    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(
        sd_unet,
        sample_size=latent_size,
        use_linear_projection=SDXL_BASE_UNET["use_linear_projection"],
        addition_embed_type=SDXL_BASE_UNET["addition_embed_type"],
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=HIDDEN_1 + HIDDEN_2,
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TIME_IDS * TIME_EMBED_DIM + POOLED,
    )


def build_scheduler() -> EulerDiscreteScheduler:
    """SDXL base's scheduler configuration (its model_index names EulerDiscreteScheduler)."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def second_tokenizer(tokenizer_dir: str) -> Any:
    """The tokenizer of `tokenizer_dir` padding with `!` (id 0 in CLIP's byte order), as SDXL's tokenizer_2."""
    return CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=MAX_LENGTH, pad_token="!")


def build_pipeline(
    tokenizer: Any, tokenizer_dir: str, vae: Any, sd_unet: dict[str, Any], latent_size: int, seed: int
) -> StableDiffusionXLPipeline:
    """The tiny SDXL pipeline around `vae` and `tokenizer` (its BPE files in `tokenizer_dir`), its
    UNet on the tiny SD UNet's levels (`sd_unet`). `force_zeros_for_empty_prompt` as the released
    SDXL base sets it."""
    tokenizer_2 = second_tokenizer(tokenizer_dir)
    text_encoder, text_encoder_2 = build_text_encoders(tokenizer, tokenizer_2, seed)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=build_unet(sd_unet, latent_size, seed + 2),
        scheduler=build_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


def summary(data_dir: str, resolution: int, seed: int, pipe: Any) -> dict[str, Any]:
    """sd_train_tiny.json of the SDXL build: the family, each part's size and the conditioning widths."""
    parts = ("unet", "vae", "text_encoder", "text_encoder_2")
    return {
        "family": "sdxl",
        "data_dir": os.path.abspath(data_dir),
        "resolution": resolution,
        "latent_size": resolution // 2,
        "seed": seed,
        "params": {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in parts},
        "vocab_size": len(pipe.tokenizer),
        "cross_attention_dim": pipe.unet.config.cross_attention_dim,
        "pooled_dim": pipe.text_encoder_2.config.projection_dim,
        "vae_scaling_factor": pipe.vae.config.scaling_factor,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }


def from_tiny_sd(sd_dir: str, out_dir: str, seed: int = 0) -> str:
    """The tiny SDXL folder around an existing tiny SD folder's VAE and tokenizer (what
    `build-tiny --family sdxl` builds from the same data and seed, without learning the BPE and
    measuring the VAE a second time: the test suite's shortcut). Returns `out_dir`."""
    tok_dir = os.path.join(sd_dir, "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    vae = AutoencoderKL.from_pretrained(sd_dir, subfolder="vae")
    sd_unet = UNet2DConditionModel.load_config(sd_dir, subfolder="unet")
    pipe = build_pipeline(tokenizer, tok_dir, vae, sd_unet, vae.config.sample_size // 2, seed)
    pipe.save_pretrained(out_dir)
    for name in ("tokenizer", "tokenizer_2"):  # the pipeline's save writes tokenizer.json only
        for bpe in ("vocab.json", "merges.txt"):
            shutil.copy(os.path.join(tok_dir, bpe), os.path.join(out_dir, name, bpe))
    return out_dir
