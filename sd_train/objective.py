"""The Stable Diffusion training objective, in one place: timestep sampling, the forward (noising)
process, the prediction target, min-SNR weighting, offset noise, caption dropout and SDXL's
micro-conditioning dropout.

The loop hands it latents and their `Conditioning` (text embeddings; for SDXL also the pooled
embedding and the six size/crop ids); it returns the loss. Its forward process is tested against
diffusers' `DDPMScheduler.add_noise` / `get_velocity`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sd_train.config import ObjectiveArgs
from sd_train.model.conditioning import Conditioning


class DiffusionObjective:
    """Owns the noise schedule (alphas_cumprod) and the loss of one training micro-batch."""

    def __init__(self, args: ObjectiveArgs, alphas_cumprod: torch.Tensor, empty: Conditioning):
        self.args = args
        # On the device once: indexing it by device timesteps then needs no copy and no sync.
        self.alphas_cumprod = alphas_cumprod.to(empty.text_embeds.device, torch.float32)
        self.num_timesteps = alphas_cumprod.shape[0]
        # What stands in for a dropped caption, fixed once, so dropout works the same for online
        # text encoding and precomputed embeddings: the embeddings of "" (SDXL: sequence and
        # pooled), or zeros of their shape with `zero_dropped_captions`.
        self.dropped = empty.map(torch.zeros_like) if args.zero_dropped_captions else empty

    def _coeffs(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acp = self.alphas_cumprod.to(like.device)[timesteps].to(like.dtype)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return acp.sqrt().view(shape), (1 - acp).sqrt().view(shape)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) = sqrt(acp_t) x_0 + sqrt(1 - acp_t) eps."""
        a, s = self._coeffs(timesteps, latents)
        return a * latents + s * noise

    def velocity(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(acp_t) eps - sqrt(1 - acp_t) x_0 (Salimans & Ho, 2022)."""
        a, s = self._coeffs(timesteps, latents)
        return a * noise - s * latents

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.args.prediction_type == "epsilon":
            return noise
        return self.velocity(latents, noise, timesteps)

    def snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weights (arXiv 2303.09556): min(SNR, gamma) / SNR for epsilon, divided by
        SNR + 1 instead for v-prediction (the v target already scales the loss by SNR + 1)."""
        acp = self.alphas_cumprod.to(timesteps.device)[timesteps]
        snr = acp / (1 - acp)
        clipped = torch.clamp(snr, max=self.args.snr_gamma)
        return clipped / (snr + 1) if self.args.prediction_type == "v_prediction" else clipped / snr

    def drop_captions(self, cond: Conditioning) -> Conditioning:
        """Replace each sample's text conditioning (SDXL: sequence and pooled embeddings together) by
        the dropped caption's with probability `caption_dropout`: one draw per sample per step."""
        p = self.args.caption_dropout
        if p <= 0:
            return cond
        text = cond.text_embeds
        # Drawn where the embeddings are: on CPU the same numbers as ever, on CUDA from the CUDA
        # generator (checkpointed by sd_train.rng) with no host-to-device copy.
        keep = torch.rand(text.shape[0], device=text.device) >= p
        embeds = torch.where(keep.view(-1, 1, 1), text, self.dropped.text_embeds.to(text.dtype))
        if cond.pooled is None:
            return Conditioning(embeds)
        pooled = torch.where(keep.view(-1, 1), cond.pooled, self.dropped.pooled.to(cond.pooled.dtype))
        return Conditioning(embeds, pooled, cond.time_ids)

    def drop_microconditioning(self, cond: Conditioning) -> Conditioning:
        """SDXL: zero each of the three (original size, crop corner, target size) pairs of a sample
        with probability `microcond_dropout`, each pair drawn on its own per sample per step."""
        p = self.args.microcond_dropout
        if p <= 0 or cond.time_ids is None:
            return cond
        ids = cond.time_ids
        keep = torch.rand(ids.shape[0], 3, device=ids.device) >= p
        return Conditioning(cond.text_embeds, cond.pooled, ids * keep.repeat_interleave(2, dim=1).to(ids.dtype))

    def sample_noise(self, latents: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(latents)
        if self.args.noise_offset > 0:
            # Offset noise: a per-sample, per-channel constant lets the model change mean brightness.
            noise = noise + self.args.noise_offset * torch.randn(
                latents.shape[0], latents.shape[1], 1, 1, device=latents.device, dtype=latents.dtype
            )
        return noise

    def loss(self, unet: torch.nn.Module, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One micro-batch's training loss, as a device tensor (nothing here reads a value on the
        host). Draws timesteps, noise, caption dropout and (SDXL, when on) micro-conditioning
        dropout from the global generator of the latents' device, whose per-rank state every
        checkpoint saves (on CPU exactly the draws of the host-side sampling it replaced)."""
        b = latents.shape[0]
        timesteps = torch.randint(0, self.num_timesteps, (b,), device=latents.device)
        noise = self.sample_noise(latents)
        cond = self.drop_microconditioning(self.drop_captions(cond))
        noisy = self.add_noise(latents, noise, timesteps)
        pred = unet(noisy, timesteps, **cond.unet_kwargs()).sample
        per_sample = F.mse_loss(pred.float(), self.target(latents, noise, timesteps).float(), reduction="none")
        per_sample = per_sample.mean(dim=list(range(1, per_sample.ndim)))
        if self.args.snr_gamma is not None:
            per_sample = per_sample * self.snr_weights(timesteps)
        return per_sample.mean()

    @torch.no_grad()
    def denoising_loss(
        self,
        unet: torch.nn.Module,
        latents: torch.Tensor,
        cond: Conditioning,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """Unweighted per-sample MSE at given timesteps and noise (the validation figure)."""
        pred = unet(self.add_noise(latents, noise, timesteps), timesteps, **cond.unet_kwargs()).sample
        err = F.mse_loss(pred.float(), self.target(latents, noise, timesteps).float(), reduction="none")
        return err.mean(dim=list(range(1, err.ndim)))
