"""What the UNet is conditioned on besides the noisy latents and the timestep, as one value the
objective, the evaluation and the sampler pass around: the text encoders' hidden states, and for
SDXL the pooled text embedding and the six micro-conditioning ids (`add_time_ids`).

SDXL's micro-conditioning (arXiv 2307.01952, section 2.2) tells the UNet the source image's size
before any resize, where the crop sat, and the training size, so that at sampling a user can ask
for an uncropped, full-resolution look. The data path measures each sample's `Geometry`
(sd_train.data.decode) and batches carry it as int64 [B, 2] rows `original_size` (H, W),
`crop_top_left` (top, left) and `target_size` (H, W); `add_time_ids` lays them out as the released
weights read them: (orig H, orig W, top, left, target H, target W), the order of diffusers'
`StableDiffusionXLPipeline._get_add_time_ids`. MosaicML's (W, H) order and SimpleTuner's resized
size as `original_size` condition on other numbers than the weights were trained with.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

GEOMETRY_KEYS = ("original_size", "crop_top_left", "target_size")


def add_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor) -> torch.Tensor:
    """SDXL's six ids per sample, int64 [B, 6], from the batch's three [B, 2] geometry rows (kept
    integer: the UNet's sinusoidal projection casts them to fp32 itself, exactly; bf16 would round
    sizes above 256)."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1).to(torch.int64)


def batch_time_ids(batch: dict) -> torch.Tensor:
    """`add_time_ids` of a training batch (image or precomputed shards: both carry the geometry)."""
    return add_time_ids(*(batch[k] for k in GEOMETRY_KEYS))


@dataclass
class Conditioning:
    """The UNet's conditioning for a batch. `text_embeds` [B, L, D]: SD's last hidden state, or
    SDXL's two penultimate hidden states concatenated. `pooled` [B, P] and `time_ids` [B, 6]: SDXL
    only (None for SD, whose UNet takes neither)."""

    text_embeds: torch.Tensor
    pooled: Optional[torch.Tensor] = None
    time_ids: Optional[torch.Tensor] = None

    def unet_kwargs(self) -> dict:
        """The keyword arguments of `UNet2DConditionModel.forward` that carry this conditioning."""
        if self.pooled is None:
            return {"encoder_hidden_states": self.text_embeds}
        if self.time_ids is None:
            raise ValueError("SDXL conditioning without time ids: attach them with `with_time_ids`")
        added = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return {"encoder_hidden_states": self.text_embeds, "added_cond_kwargs": added}

    def with_geometry(self, geometry: dict) -> Conditioning:
        """SDXL: the same with the time ids of `geometry` (a batch, or any mapping holding the three
        [B, 2] rows of GEOMETRY_KEYS) attached, on the embeddings' device. SD: itself."""
        if self.pooled is None:
            return self
        return replace(self, time_ids=batch_time_ids(geometry).to(self.text_embeds.device, non_blocking=True))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        """`fn` applied to the float parts (the embeddings); the integer ids stay as they are."""
        return replace(self, text_embeds=fn(self.text_embeds), pooled=None if self.pooled is None else fn(self.pooled))

    def to(self, dtype: torch.dtype) -> Conditioning:
        """The float parts in `dtype`."""
        return self.map(lambda t: t.to(dtype))

    def __getitem__(self, index: slice) -> Conditioning:
        def take(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t[index]

        return Conditioning(self.text_embeds[index], take(self.pooled), take(self.time_ids))

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Batches stacked in order (held-out chunks; the sampler's unconditional + conditional)."""

        def cat(ts: list[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
            return None if ts[0] is None else torch.cat(ts)  # type: ignore[arg-type]

        return Conditioning(
            torch.cat([p.text_embeds for p in parts]), cat([p.pooled for p in parts]), cat([p.time_ids for p in parts])
        )


def stored_conditioning(batch: dict, device: torch.device, dtype: torch.dtype) -> Conditioning:
    """The conditioning a precomputed batch carries (sd_train.tools.precompute): the stored text
    embeddings and, for SDXL, pooled embedding, copied as stored (fp16 shards stay fp16 on the
    wire) without blocking the host, converted on the device; SDXL's time ids from the stored
    geometry, as for image batches."""

    def take(name: str) -> torch.Tensor:
        return batch[name].to(device, non_blocking=True).to(dtype)

    pooled = take("pooled_embeds") if "pooled_embeds" in batch else None
    return Conditioning(take("text_embeds"), pooled).with_geometry(batch)
