"""Sample quality on a small captioned set (the demo's 16 emoji), measured instead of judged by eye.

For every training caption (one image each), K samples with fixed initial noise; each sample is
compared with every training image in a fixed feature space, and the figures are:

- **prompt accuracy**: the share of samples whose nearest training image is the one their prompt
  names, with its 95% Wilson score interval (samples counted as independent draws: the interval is
  the instrument's sampling error for these weights, not the spread between training seeds);
- **fidelity distance**: the mean distance of each sample to the image its prompt names.

The feature space is fixed and needs no download: the image (RGB in [0, 1]) averaged over an 8x8
grid of equal blocks (4x4 pixel blocks at 32 px), 192 numbers; the distance is the root mean
square difference of those numbers (0 = the same thumbnail, 1 = white against black). Coarse on
purpose: the tiny VAE blurs every decoded image, and an 8x8 colour layout still tells the 16 emoji
apart (validated: `sd-train quality-check`, docs/demo.md).

No Fréchet distance: 16 reference images cannot estimate a covariance in 192 dimensions (its rank
is at most 15), so the trace term would measure the estimator's bias, not the samples.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sd_train.config import ConfigError, TrainConfig
from sd_train.data.loader import val_samples

THUMB = 8  # the feature grid: THUMB x THUMB blocks per channel
MAX_CAPTIONS = 64  # a reference set larger than this is not what this instrument is for
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def image_features(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images [N, H, W, 3] -> float64 [N, 3 * THUMB * THUMB]: each channel in [0, 1],
    averaged over THUMB x THUMB equal blocks (H and W must divide by THUMB)."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).to(torch.float64) / 255.0
    if x.shape[2] % THUMB or x.shape[3] % THUMB:
        raise ValueError(f"image size {tuple(x.shape[2:])} does not divide into {THUMB}x{THUMB} blocks")
    return F.adaptive_avg_pool2d(x, THUMB).flatten(1)


def feature_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, M] root mean square differences between the rows of `a` [N, F] and of `b` [M, F]."""
    return torch.cdist(a, b) / math.sqrt(a.shape[1])


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% with the default z); unlike the
    normal approximation it stays inside [0, 1] and is not empty at 0 or n successes."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, center - half), min(1.0, center + half))


@dataclass
class QualityScore:
    """The figures of one set of samples against the reference set."""

    accuracy: float
    interval: tuple[float, float]
    fidelity: float
    samples: int
    nearest: list[int]  # per sample: the index of its nearest reference image
    labels: list[int]  # per sample: the index of the image its prompt names

    def as_dict(self, captions: list[str] | None = None) -> dict:
        """The figures, and the prompts whose samples went elsewhere (to which caption, how often)."""
        misses: dict[str, dict[str, int]] = {}
        for got, want in zip(self.nearest, self.labels):
            if got != want:
                name = captions[want] if captions else str(want)
                other = captions[got] if captions else str(got)
                misses.setdefault(name, {}).setdefault(other, 0)
                misses[name][other] += 1
        return {
            "accuracy": self.accuracy,
            "accuracy_95": list(self.interval),
            "fidelity": self.fidelity,
            "samples": self.samples,
            "chance": 1.0 / len(captions) if captions else None,  # what a sampler that ignores the prompt scores
            "misses": misses,
        }


def score_features(samples: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor) -> QualityScore:
    """Score sample features [N, F] whose prompts name reference rows `labels` [N] against the
    reference features [C, F]."""
    d = feature_distances(samples, reference)
    nearest = d.argmin(dim=1)
    correct = int((nearest == labels).sum())
    n = int(labels.numel())
    return QualityScore(
        accuracy=correct / n,
        interval=wilson_interval(correct, n),
        fidelity=float(d[torch.arange(n), labels].mean()),
        samples=n,
        nearest=nearest.tolist(),
        labels=labels.tolist(),
    )


def read_reference(cfg: TrainConfig) -> tuple[list[str], np.ndarray]:
    """The training set as the reference: its captions and uint8 images [C, R, R, 3], one image per
    caption, in shard order. Refuses sets the instrument is not for (a ConfigError naming the field)."""
    field = "eval.quality_samples"
    if cfg.data.precomputed:
        raise ConfigError(f"{field}: the training shards are precomputed latents; the instrument needs their images")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"val_samples: .* fewer than")  # we ask for one more than allowed
        pixels, captions, _ = val_samples(
            cfg.data.train_shards, MAX_CAPTIONS + 1, cfg.data.resolution, cfg.data.caption_key, cfg.data.allow_pipe
        )
    if len(captions) > MAX_CAPTIONS:
        raise ConfigError(
            f"{field}={cfg.eval.quality_samples}: data.train_shards holds more than {MAX_CAPTIONS} samples; the "
            "prompt-accuracy instrument is for small sets with one image per caption (the demo's 16 emoji): set it to 0"
        )
    if len(set(captions)) != len(captions):
        raise ConfigError(
            f"{field}: data.train_shards has captions shared by several images; the instrument needs one image "
            "per caption (the image a prompt names): set it to 0"
        )
    return captions, pixels.permute(0, 2, 3, 1).numpy()


class SampleQuality:
    """Owns the reference set (the training images and their captions), the fixed initial noise of
    the K samples per caption, and the scoring. `sample(model, latents)` draws one image per caption
    from the given initial latents (evaluation's Sampler, built with these captions)."""

    def __init__(
        self,
        captions: list[str],
        reference: np.ndarray,
        samples_per_caption: int = 1,
        latent_shape: tuple[int, ...] = (),
        seed: int = 0,
    ):
        self.captions = captions
        self.reference = image_features(reference)
        self.k = samples_per_caption
        self.latent_shape = latent_shape
        self.seed = seed

    def initial_latents(self, j: int) -> torch.Tensor:
        """The initial noise of sample j of every caption [C, *latent_shape]: a function of (seed,
        j, caption index) only, so a larger K keeps the first samples."""
        out = []
        for c in range(len(self.captions)):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + 1009 * j + c)
            out.append(torch.randn(self.latent_shape, generator=g))
        return torch.stack(out)

    def draw(self, sample: Callable[[torch.nn.Module, torch.Tensor], np.ndarray], model: torch.nn.Module) -> np.ndarray:
        """uint8 images [K * C, H, W, 3]: sample j of caption c at index j * C + c."""
        return np.concatenate([sample(model, self.initial_latents(j)) for j in range(self.k)])

    def labels(self) -> torch.Tensor:
        return torch.arange(len(self.captions)).repeat(self.k)

    def score_images(self, images: np.ndarray, labels: torch.Tensor | None = None) -> dict:
        """The figures of images whose prompts name the reference images `labels` (default: laid
        out as `draw` returns them)."""
        labels = self.labels() if labels is None else labels
        return score_features(image_features(images), labels, self.reference).as_dict(self.captions)

    def score(self, sample: Callable[[torch.nn.Module, torch.Tensor], np.ndarray], model: torch.nn.Module) -> dict:
        """Draw the samples of `model` (collective under FSDP2: every rank draws them all) and score them."""
        return self.score_images(self.draw(sample, model))
