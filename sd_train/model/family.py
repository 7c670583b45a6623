"""Which Stable Diffusion family a local diffusers folder holds, read from its JSON files alone
(torch-free: preflight refuses a wrong folder before any process group starts).

The folder decides; there is no flag. `model_index.json` naming a `StableDiffusionXL*Pipeline`
makes it SDXL: two text encoders (`text_encoder`, a CLIPTextModel, and `text_encoder_2`, a
CLIPTextModelWithProjection, whose pooled projection conditions the UNet too), two tokenizers, and
a UNet with `addition_embed_type: text_time` (the pooled embedding plus six size/crop ids). Any
other folder is SD 1.x/2.x (one encoder, one tokenizer, no added conditioning), as before this
module existed. A folder whose parts contradict its family is refused, naming the part.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from sd_train.errors import ConfigError
from sd_train.paths import check_model_folder

Family = Literal["sd", "sdxl"]
SDXL_SUBFOLDERS = ("text_encoder_2", "tokenizer_2")
TIME_IDS = 6  # original (H, W), crop (top, left), target (H, W): SDXL's micro-conditioning
# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json, the fields that differ from
# diffusers' defaults: 2,567,463,684 params. Its cross-attention reads both text encoders side by
# side (768 + 1280); the added embedding takes the pooled 1280 and the TIME_IDS in 256 sinusoids
# each (6 x 256 + 1280 = 2816). The benches build it at full size, the tests on the meta device,
# and the tiny SDXL build keeps its layout at toy widths.
SDXL_BASE_UNET: dict[str, Any] = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=TIME_IDS * 256 + 1280,
)


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.pretrained_path: cannot read {path} ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"model.pretrained_path: {path} is not a JSON object")
    return data


def pipeline_class(path: str) -> str:
    """`_class_name` of the folder's model_index.json ('' without one: an SD folder assembled by hand)."""
    index = Path(path) / "model_index.json"
    return str(_json(index).get("_class_name", "")) if index.is_file() else ""


def model_family(path: str) -> Family:
    """The family of the diffusers folder at `path`, after checking that its parts fit it. Raises
    ConfigError naming model.pretrained_path and what is missing or contradicts."""
    check_model_folder(path)
    root = Path(path)
    unet_config = root / "unet" / "config.json"
    # An SD folder is held to check_model_folder's layout only, as before; SDXL needs the config.
    unet = _json(unet_config) if unet_config.is_file() else {}
    added = unet.get("addition_embed_type")
    if not pipeline_class(path).startswith("StableDiffusionXL"):
        if added is not None:
            raise ConfigError(
                f"model.pretrained_path={path!r}: its unet/config.json has addition_embed_type={added!r}, which "
                "needs SDXL's pooled text embedding and size/crop ids, but model_index.json names "
                f"{pipeline_class(path) or 'no pipeline'} rather than StableDiffusionXLPipeline: point it at the "
                "full SDXL folder (with text_encoder_2/ and tokenizer_2/)"
            )
        return "sd"
    missing = [s for s in SDXL_SUBFOLDERS if not (root / s).is_dir()]
    if missing:
        raise ConfigError(
            f"model.pretrained_path={path!r} is an SDXL folder ({pipeline_class(path)}) that lacks {missing}: "
            "SDXL conditions its UNet on both text encoders, so copy the whole folder (text_encoder/, "
            "text_encoder_2/, tokenizer/, tokenizer_2/, unet/, vae/, scheduler/)"
        )
    if not unet_config.is_file():
        raise ConfigError(f"model.pretrained_path={path!r}: an SDXL folder without unet/config.json")
    if added != "text_time":
        raise ConfigError(
            f"model.pretrained_path={path!r}: an SDXL folder whose unet/config.json has addition_embed_type="
            f"{added!r}; SDXL's UNet takes the pooled text embedding and six size/crop ids "
            "(addition_embed_type: text_time). Use the UNet that came with the SDXL folder"
        )
    _check_sdxl_dimensions(path, unet)
    return "sdxl"


def _check_sdxl_dimensions(path: str, unet: dict[str, Any]) -> None:
    """The UNet's input widths agree with the encoders: cross-attention reads both encoders' hidden
    states side by side, the added embedding the pooled projection plus the six embedded ids. A
    mismatch would otherwise surface as a shape error inside the first training step."""
    root = Path(path)
    enc1, enc2 = _json(root / "text_encoder" / "config.json"), _json(root / "text_encoder_2" / "config.json")
    hidden = int(enc1.get("hidden_size", 0)) + int(enc2.get("hidden_size", 0))
    if unet.get("cross_attention_dim") != hidden:
        raise ConfigError(
            f"model.pretrained_path={path!r}: unet cross_attention_dim={unet.get('cross_attention_dim')} but the two "
            f"text encoders' hidden sizes add up to {hidden} (SDXL: 768 + 1280 = 2048); the parts come from "
            "different models"
        )
    added = TIME_IDS * int(unet.get("addition_time_embed_dim") or 0) + int(enc2.get("projection_dim", 0))
    if unet.get("projection_class_embeddings_input_dim") != added:
        raise ConfigError(
            f"model.pretrained_path={path!r}: unet projection_class_embeddings_input_dim="
            f"{unet.get('projection_class_embeddings_input_dim')} but 6 x addition_time_embed_dim + text_encoder_2 "
            f"projection_dim = {added} (SDXL: 6 x 256 + 1280 = 2816); the parts come from different models"
        )


# `dist.fsdp_units=auto` under FSDP2. SDXL's down/mid/up blocks are too coarse to shard by alone:
# up_blocks[0] is 1.21B params (2.4 GB gathered in bf16), so its units are the 70 transformer
# blocks and 17 resnets inside the blocks (94 units, at most 49.2M params each): bench/sdxl_units.py.
DEFAULT_FSDP_UNITS: dict[str, str] = {"sd": "blocks", "sdxl": "layers"}


def unet_family(unet_config: dict[str, Any]) -> Family:
    """The family a UNet config belongs to (for code that holds a UNet but no folder)."""
    return "sdxl" if unet_config.get("addition_embed_type") == "text_time" else "sd"
