"""Held-out validation loss and sample grids.

The validation loss is the plain denoising MSE of a fixed set of held-out samples, each scored at
fixed timesteps with noise fixed by (sample index, timestep): the same number for the same weights
whatever the world size, so runs can be compared. Sample grids use fixed prompts and seeds.

`Evaluator` owns the cadence (`should_run(step)`) and the variants: the raw weights, and the EMA
swapped into the model once its window is open. Under FSDP2 every forward is a collective, so every
rank runs the same number of UNet calls here; only the main process writes files, on a background
thread (sd_train.background_writer), so no peer waits in a collective for its disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image

from sd_train.background_writer import BackgroundWriter
from sd_train.config import TrainConfig
from sd_train.data.loader import val_batch
from sd_train.errors import BadDataError
from sd_train.model.conditioning import GEOMETRY_KEYS, Conditioning
from sd_train.model.parts import SDParts, decode_latents, encode_pixels, encode_text
from sd_train.objective import DiffusionObjective
from sd_train.parallel.process_group import DistInfo, all_gather_object, all_reduce_sum
from sd_train.sample_quality import SampleQuality, read_reference

VAL_BATCH = 16


class Validator:
    """Owns the fixed validation set (latents, conditioning, noise) of this rank's share."""

    def __init__(self, cfg: TrainConfig, parts: SDParts, objective: DiffusionObjective, info: DistInfo):
        self.objective = objective
        self.info = info
        self.timesteps = list(cfg.eval.val_timesteps)
        d = cfg.data
        held_out = val_batch(d.val_shards, cfg.eval.num_val_samples, d.resolution, d.caption_key, d.allow_pipe)
        pixels, captions = held_out["pixels"], held_out["captions"]
        agree_on_val_set(cfg, held_out["keys"], captions)
        n = len(captions)
        # Split samples over ranks; pad each rank's share to the same length (weight 0 on padding)
        # so every rank makes the same number of UNet calls.
        per_rank = math.ceil(n / info.world_size)
        idx = list(range(info.rank, n, info.world_size))
        self.weights = torch.tensor([1.0] * len(idx) + [0.0] * (per_rank - len(idx)))
        idx = idx + [idx[0] if idx else 0] * (per_rank - len(idx))
        dev = info.device
        # Encoded once (in bf16 with mixed_precision=bf16), kept in the UNet's dtype: the
        # held-out forward runs without autocast.
        self.latents = torch.cat(
            [
                encode_pixels(parts, pixels[idx[i : i + VAL_BATCH]], dev, sample=False)
                for i in range(0, per_rank, VAL_BATCH)
            ]
        ).to(parts.step_dtype)
        # SDXL's time ids from each held-out sample's geometry (center crop, never flipped).
        self.cond = (
            Conditioning.cat(
                [
                    encode_text(parts, [captions[j] for j in idx[i : i + VAL_BATCH]], dev)
                    for i in range(0, per_rank, VAL_BATCH)
                ]
            )
            .to(parts.step_dtype)
            .with_geometry({k: held_out[k][idx] for k in GEOMETRY_KEYS})
        )
        self.noise = {}
        for t in self.timesteps:
            self.noise[t] = torch.stack([self._fixed_noise(j, t) for j in idx]).to(dev, self.latents.dtype)
        self.num_samples = n

    def _fixed_noise(self, index: int, t: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1_000_003 * index + t)
        return torch.randn(self.latents.shape[1:], generator=g)

    @torch.no_grad()
    def loss(self, model: torch.nn.Module) -> float:
        """Mean denoising MSE over all samples and timesteps (collective)."""
        was_training = model.training
        model.eval()
        total = 0.0
        for t in self.timesteps:
            for i in range(0, self.latents.shape[0], VAL_BATCH):
                sl = slice(i, i + VAL_BATCH)
                ts = torch.full((self.latents[sl].shape[0],), t, dtype=torch.long, device=self.info.device)
                err = self.objective.denoising_loss(model, self.latents[sl], self.cond[sl], self.noise[t][sl], ts)
                total += float((err.cpu() * self.weights[sl]).sum())
        model.train(was_training)
        (s,) = all_reduce_sum([total], self.info.device)
        return s / (self.num_samples * len(self.timesteps))


def agree_on_val_set(cfg: TrainConfig, keys: list[str], captions: list[str]) -> None:
    """Every rank reads the held-out samples itself, and each rank's count sets its number of UNet
    calls (collectives under FSDP2): ranks that read different sets (a short read of a shard on one
    rank's view of a network file system) would meet in different collectives and wait there until
    the timeout. The ranks compare what they read and all stop together, naming what each read.
    A collective: every rank calls it once, whatever it read."""
    digest = hashlib.blake2b(repr((keys, captions)).encode(), digest_size=8).hexdigest()
    seen = all_gather_object((len(keys), digest))
    where = f"data.val_shards={cfg.data.val_shards!r}"
    if len(set(seen)) > 1:
        read = ", ".join(f"rank {r}: {n} samples (digest {d})" for r, (n, d) in enumerate(seen))
        raise BadDataError(
            f"{where}: the ranks read different validation sets ({read}; eval.num_val_samples="
            f"{cfg.eval.num_val_samples}). A shard read short or failed on some rank: every rank must read the same "
            "held-out shards. Check them (and the file system they are on), then relaunch"
        )
    if seen[0][0] == 0:
        raise BadDataError(
            f"{where} gave no readable samples: check the shards, or set data.val_shards='' to turn it off"
        )


class Sampler:
    """Owns the fixed prompts, seeds and DDIM schedule of the sample grid (or of other `prompts`:
    the sample-quality instrument's)."""

    def __init__(self, cfg: TrainConfig, parts: SDParts, info: DistInfo, prompts: list[str] | None = None):
        self.cfg = cfg
        self.parts = parts
        self.info = info
        prompts = cfg.eval.prompts if prompts is None else prompts
        n, res = len(prompts), cfg.data.resolution
        # The text encoder(s) run here once; each grid then needs only the VAE's decoder. The
        # unconditional branch is what the run trains dropped captions as (`zero_dropped_captions`);
        # SDXL's time ids are those StableDiffusionXLPipeline uses by default: the uncropped
        # training size as original and target size, crop corner (0, 0), for both branches.
        cond = encode_text(parts, prompts, info.device)
        uncond = encode_text(parts, [""] * n, info.device)
        if cfg.objective.zero_dropped_captions:
            uncond = uncond.map(torch.zeros_like)
        sizes = torch.tensor([[res, res]] * n)
        geometry = {"original_size": sizes, "crop_top_left": torch.zeros_like(sizes), "target_size": sizes}
        self.cond = cond.to(parts.step_dtype).with_geometry(geometry)
        self.uncond = uncond.to(parts.step_dtype).with_geometry(geometry)
        self.scheduler = DDIMScheduler.from_config(
            parts.noise_scheduler.config, prediction_type=cfg.objective.prediction_type
        )
        size = res // parts.latent_downsampling
        self.shape = (n, parts.vae_config["latent_channels"], size, size)

    @torch.no_grad()
    def latents(self, model: torch.nn.Module, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The denoised latents of the fixed prompts, with classifier-free guidance, as diffusers'
        pipelines compute them from the same initial noise (collective under FSDP2): `noise`
        [N, C, h, w], by default drawn from `eval.sample_seed`."""
        if noise is None:
            noise = torch.randn(self.shape, generator=torch.Generator().manual_seed(self.cfg.eval.sample_seed))
        latents = noise.to(self.info.device) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(self.cfg.eval.num_inference_steps)
        conditioning = Conditioning.cat([self.uncond, self.cond]).unet_kwargs()
        g = self.cfg.eval.guidance_scale
        for t in self.scheduler.timesteps:
            inp = self.scheduler.scale_model_input(torch.cat([latents, latents]), t)
            # In the UNet's dtype (bf16 in DeepSpeed's bf16 mode); the scheduler steps in fp32.
            inp = inp.to(self.parts.step_dtype)
            out = model(inp, t.to(self.info.device), **conditioning).sample.float()
            uncond, cond = out.chunk(2)
            latents = self.scheduler.step(uncond + g * (cond - uncond), t, latents).prev_sample
        return latents

    @torch.no_grad()
    def sample(self, model: torch.nn.Module, noise: torch.Tensor | None = None) -> np.ndarray:
        """uint8 images [N, H, W, 3] for the fixed prompts (collective under FSDP2), from the
        initial `noise` [N, C, h, w] (default: drawn from `eval.sample_seed`)."""
        was_training = model.training
        model.eval()
        images = decode_latents(self.parts, self.latents(model, noise))
        model.train(was_training)
        return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid_image(images: np.ndarray, cols: int | None = None) -> Image.Image:
    """Tile images [N, H, W, 3] into one picture."""
    n, h, w, _ = images.shape
    cols = cols or min(n, 4)
    rows = math.ceil(n / cols)
    grid = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    # Tiny demo images are upscaled (nearest) so a person can see them.
    scale = max(1, 128 // h)
    return Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)


def write_png(image: Image.Image, path: Path, before_write: Callable[[], None] = lambda: None) -> None:
    """Runs on the background writer's thread (sd_train.background_writer)."""
    before_write()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    image.save(tmp, format="PNG")
    tmp.replace(path)  # a reader never sees half a PNG


class QualityProbe:
    """The sample-quality instrument (sd_train.sample_quality) with the sampler that feeds it."""

    def __init__(self, quality: SampleQuality, sampler: Sampler):
        self.quality, self.sampler = quality, sampler

    def score(self, model: torch.nn.Module) -> dict:
        """Prompt accuracy (with its 95% interval), fidelity distance and the misses (collective)."""
        return self.quality.score(self.sampler.sample, model)

    def figures(self, model: torch.nn.Module, variant: str) -> dict:
        """The logged figures of one variant (`raw`, `ema`)."""
        s = self.score(model)
        lo, hi = s["accuracy_95"]
        return {
            f"quality/accuracy_{variant}": s["accuracy"],
            f"quality/accuracy_lo_{variant}": lo,
            f"quality/accuracy_hi_{variant}": hi,
            f"quality/fidelity_{variant}": s["fidelity"],
        }


def build_quality(cfg: TrainConfig, parts: SDParts, info: DistInfo, samples: int | None = None) -> QualityProbe:
    """The instrument over the run's training set, `samples` (default `eval.quality_samples`) per
    caption, with the sample grid's guidance, DDIM steps and seed."""
    captions, reference = read_reference(cfg)
    sampler = Sampler(cfg, parts, info, prompts=captions)
    k = cfg.eval.quality_samples if samples is None else samples
    return QualityProbe(SampleQuality(captions, reference, k, sampler.shape[1:], cfg.eval.sample_seed), sampler)


class Evaluator:
    """Owns when to evaluate and what: the held-out loss and the sample grid, for the raw weights
    and, once the window is open, for the EMA (swapped into the model's shards, then swapped back).
    The same swap serves the loss and the grid."""

    def __init__(
        self, cfg: TrainConfig, parts: SDParts, objective: DiffusionObjective, info: DistInfo, ema, metrics, out: Path
    ):
        every = cfg.eval.every_steps
        self.every = every
        self.max_steps = cfg.max_steps
        self.validator = Validator(cfg, parts, objective, info) if cfg.data.val_shards and every else None
        self.sampler = Sampler(cfg, parts, info) if every and cfg.eval.prompts else None
        self.quality = build_quality(cfg, parts, info) if every and cfg.eval.quality_samples else None
        self.ema = ema
        self.metrics = metrics
        self.out = Path(out)
        self.is_main = info.is_main
        self.writer = BackgroundWriter()
        self.fault_hook: Callable[[str, int], None] = lambda phase, step: None  # set by the trainer (faults)

    def should_run(self, step: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == self.max_steps)

    def baseline(self, model: torch.nn.Module) -> dict:
        """The raw held-out loss before the first step: the figure the run must beat."""
        return {"val/loss_raw": self.validator.loss(model)} if self.validator is not None else {}

    def run(self, step: int, model: torch.nn.Module) -> dict:
        """Every variant's held-out loss (returned) and sample grid (written and logged)."""
        out: dict = {}
        grids: list[tuple[str, np.ndarray]] = []
        variants = [("raw", None)] + ([("ema", self.ema)] if self.ema.is_open else [])
        for name, ema in variants:
            with ema.swapped_in() if ema is not None else contextlib.nullcontext():
                if self.validator is not None:
                    out[f"val/loss_{name}"] = self.validator.loss(model)
                if self.sampler is not None:
                    grids.append((name, self.sampler.sample(model)))
                if self.quality is not None:
                    out.update(self.quality.figures(model, name))
        # The grids are handed over once every variant's forwards (collectives under FSDP2) are done,
        # and written by the background writer: a slow disk on the main process held every other
        # rank inside the next collective (first the EMA forward's all-gather, then the next
        # training step's), against the collective timeout. The metrics get the picture itself.
        if self.is_main:
            for name, images in grids:
                path, image = self.out / "samples" / f"step_{step:08d}_{name}.png", grid_image(images)
                self.writer.submit(write_png, image, path, lambda: self.fault_hook("grid_write", step))
                self.metrics.log_image(step, f"samples/{name}", str(path), image)
        return out

    def close(self) -> None:
        """Wait for the grids still being written (after the process group is gone: no peer waits)."""
        self.writer.close()
