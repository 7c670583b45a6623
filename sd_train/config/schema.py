"""The run configuration's sections: typed dataclasses, every field documented where it is declared.

Each section checks its own fields in `validate()` (values only: no file system, no environment);
`TrainConfig.validate(world_size)` composes them with the batch arithmetic. What needs the machine
(shards, model and checkpoint folders, the launcher, the EMA plan) is checked by sd_train.preflight.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal, Optional

from sd_train.errors import ConfigError

# The widest post-hoc EMA profile: sigma_rel of gamma -> 0, a uniform average over the run so far,
# is sqrt(1/12). The config checks against it here; sd_train.ema.posthoc_math solves below it.
MAX_SIGMA_REL = math.sqrt(1.0 / 12.0)


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name}={value} must be positive")


BUCKET_SETS = ("none", "generated", "sdxl")  # `data.buckets` by name; the sets: sd_train.data.buckets
SDXL_RESOLUTION = 1024

FILTER_OPS = (">=", "<=", "!=", "==", ">", "<")  # two-character operators first: ">=" is not ">" then "=5"
_FILTER_RULE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(>=|<=|!=|==|>|<)\s*(\S+)\s*$")


def parse_caption_key(spec: str) -> tuple[str, ...]:
    """`data.caption_key` -> its fields, each `txt` or `json:FIELD`. ConfigError naming the field."""
    fields = tuple(part.strip() for part in spec.split(","))
    for f in fields:
        if f != "txt" and not (f.startswith("json:") and f[5:].strip()):
            raise ConfigError(
                f"data.caption_key={spec!r}: {f!r} is neither 'txt' nor 'json:FIELD'; write e.g. 'txt', "
                "'json:caption' or 'json:caption,json:recaption'"
            )
    if len(set(fields)) != len(fields):
        raise ConfigError(f"data.caption_key={spec!r} names a field twice")
    return fields


@dataclass(frozen=True)
class FilterRule:
    """One `data.filters` rule, "field<op>literal": the json field, the operator, the number."""

    text: str
    field: str
    op: str
    value: float


def parse_filter_rule(text: str) -> FilterRule:
    """Parse "original_width>=512" into a FilterRule. ConfigError naming the rule when the operator
    is not one of FILTER_OPS or the literal is not a number (checked at startup, not mid-run)."""
    match = _FILTER_RULE.match(text)
    if match is None:
        raise ConfigError(
            f"data.filters: rule {text!r} is not FIELD<op>NUMBER with op one of {' '.join(FILTER_OPS)} "
            "(e.g. 'original_width>=512', 'punsafe<0.1')"
        )
    name, op, literal = match.groups()
    try:
        value = float(literal)
    except ValueError:
        value = float("nan")
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"data.filters: rule {text!r} compares with {literal!r}, which is not a finite number")
    return FilterRule(text.strip(), name, op, value)


@dataclass
class ModelArgs:
    pretrained_path: str = "models/tiny-sd"
    """A local diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/,
    scheduler/). The folder decides the family: one whose model_index.json names
    StableDiffusionXLPipeline (with text_encoder_2/ and tokenizer_2/) trains SDXL, any other SD 1.x/2.x.
    The tiny demo models and a downloaded SD 1.5 / 2-base / SDXL load through the same code."""
    init_unet: Literal["pretrained", "scratch"] = "pretrained"
    """`pretrained` loads the UNet weights in the folder; `scratch` builds the UNet from its
    config with fresh random weights (seeded by `seed`)."""
    gradient_checkpointing: bool = False
    """Recompute UNet block activations in backward: less memory, ~30% more compute."""
    vae_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """dtype the frozen VAE runs in. `auto`: that of the text encoders (bf16 with
    `mixed_precision=bf16`, else fp32). fp16 is refused for SDXL: its VAE overflows to NaN in fp16
    (why diffusers' SDXL VAE config sets force_upcast); use fp32 or bf16 there."""


@dataclass
class ObjectiveArgs:
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    """What the UNet predicts. SD 1.x/2-base use epsilon; SD 2 (768) uses v_prediction."""
    caption_dropout: float = 0.1
    """Probability of replacing a caption by the empty string, for classifier-free guidance
    (SD used 10%)."""
    snr_gamma: Optional[float] = None
    """Min-SNR-gamma loss weighting (arXiv 2303.09556); 5.0 is the paper's value. None: off."""
    noise_offset: float = 0.0
    """Offset noise strength (adds per-channel constant noise); 0 disables, 0.05-0.1 typical."""
    zero_dropped_captions: bool = False
    """What replaces a dropped caption: false, the empty caption's embeddings (SDXL: its sequence and
    pooled embeddings); true, zeros for both (MosaicML's `zero_dropped_captions`). The sample grid's
    unconditional branch and an exported SDXL pipeline's `force_zeros_for_empty_prompt` follow it."""
    microcond_dropout: float = 0.0
    """SDXL: probability of zeroing each of the three micro-conditioning pairs (original size,
    crop corner, target size) of a sample, each pair drawn on its own per sample per step, as
    Stability's configs allow for each size/crop embedder. 0 disables; ignored by SD 1.x/2.x."""

    def validate(self) -> None:
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(f"objective.caption_dropout={self.caption_dropout} must be in [0, 1)")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ConfigError(f"objective.snr_gamma={self.snr_gamma} must be positive, or null to disable")
        if self.noise_offset < 0:
            raise ConfigError(f"objective.noise_offset={self.noise_offset} must be >= 0")
        if not 0 <= self.microcond_dropout < 1:
            raise ConfigError(f"objective.microcond_dropout={self.microcond_dropout} must be in [0, 1)")


@dataclass
class DataArgs:
    train_shards: str = "data/emoji/train-{000000..000007}.tar"
    """Training shards: a brace pattern, a glob, a folder, a `.txt` list file, or a `pipe:`
    URL (with `allow_pipe`). Several sources are separated by `::`; each may carry a mixing weight
    as `SRC@0.3`."""
    val_shards: str = "data/emoji/val-000000.tar"
    """Held-out shards for the validation loss. Empty string disables validation."""
    resolution: int = 32
    """Square training resolution in pixels; a multiple of the model's VAE downsampling factor
    (8 for SD's VAE, 2 for the tiny demo model), which sd_train.preflight reads from the VAE config."""
    center_crop: bool = True
    """Center crop after the resize; False takes a random crop (seeded, so resumable)."""
    random_flip: bool = False
    """Horizontal flip with probability 0.5 (seeded)."""
    num_workers: int = 1
    """DataLoader worker processes per rank. Each worker reads its own shards."""
    worker_start: Literal["auto", "fork", "forkserver"] = "auto"
    """How the workers start (sd_train.data.workers). `fork` copies the rank as it is when they start
    (after the model is built), and every page the rank writes later stays copied in them: ~2.1 GB
    per worker for SD2-base at 2 ranks. `forkserver` starts them from a fresh interpreter holding
    only torch and the data modules (~0.22 GiB each), at the cost of a torch import once per rank.
    `auto`: forkserver once the rank holds 256 MiB of UNet parameters or more, else fork. The script
    that starts training must guard its top level (`if __name__ == "__main__":`), as train.py does."""
    shuffle_buffer: int = 256
    """Samples held in each worker's shuffle buffer; 0 keeps shard order."""
    mode: Literal["epoch", "resampled"] = "epoch"
    """`epoch`: every sample exactly once per epoch across ranks x workers (needs at least that
    many shards). `resampled`: shards drawn with replacement, an endless stream."""
    mix: Literal["concat", "weighted"] = "concat"
    """How several `::` sources share an epoch-mode stream. `concat`: one shard list, every sample
    exactly once per epoch, weights ignored. `weighted`: each sample drawn from a source chosen by
    its weight (so shares follow the weights, not the source sizes); each source is read exactly once
    per its own epoch and starts its next epoch by itself when it runs out. Needs world_size x
    num_workers shards in every source. Deterministic and resumable like the rest of the stream."""
    max_bad_fraction: float = 0.05
    """Stop the run when more than this share of samples read so far was bad (undecodable,
    no caption, truncated)."""
    min_samples_for_bad_check: int = 200
    """The bad-sample share is only judged after this many samples, so one early bad file
    does not stop a run."""
    precomputed: bool = False
    """Train from shards written by `sd-train precompute` (latents + text embeddings); the VAE
    and text encoder are not run during training."""
    log_keys: bool = False
    """Write every consumed sample key to `<output_dir>/keys/rank{R}.txt` (for audits/tests)."""
    caption_key: str = "txt"
    """Where a sample's caption comes from: `txt` (the `.txt` member), `json:FIELD` (a string field
    of the `.json`, e.g. `json:caption`), or several, comma-separated (`json:caption,json:recaption`):
    then each sample's caption is one of its present, non-blank fields, drawn by an RNG seeded by
    the sample's stream position (so resumable, and different in each epoch). No field present is
    `missing_caption`; present but all blank is `empty_caption`. Image shards only: precomputed
    shards carry the embeddings of the caption chosen at precompute time."""
    filters: list[str] = field(default_factory=list)
    """Metadata filters on each sample's `.json` (the fields img2dataset writes: `width`, `height`,
    `original_width`, `original_height`, plus the input parquet's columns), e.g.
    `["original_width>=512", "punsafe<0.1", "aesthetic>=5.0"]`. A rule is FIELD<op>NUMBER with op one
    of `>= <= > < == !=`; a sample is kept when every rule holds. Judged before the image is decoded.
    Filtered samples are not bad input: counted per rule as `data/filtered_<rule>` (under the first
    rule that rejects them) and in `data/filtered`, never toward `max_bad_fraction`."""
    filter_missing: Literal["keep", "drop"] = "keep"
    """A sample whose `.json` lacks a filter's field (or has no readable `.json`, or a non-numeric
    value there): `keep` lets that rule pass, `drop` filters the sample (counted under that rule)."""
    buckets: str | list[list[int]] = "none"
    """Aspect-ratio buckets: each image trains at the shape of its bucket instead of a square crop.
    `none`: the square path (shorter side to `resolution`, square crop). `generated`: sides in
    multiples of the model's pixel factor (VAE x UNet downsampling, read from the model folder: 64
    for SD 1/2), area at most `resolution`², aspect within `bucket_max_aspect`. `sdxl`: SDXL's nine
    standard ~1024² buckets (needs `resolution: 1024`). Or a list of sizes `[[H, W], ...]`. Each image
    goes to the bucket nearest in log aspect ratio, is resized to cover it and cropped (center, or
    random with `center_crop: false`); every micro-batch holds one bucket; samples still waiting at
    an epoch's end carry into the next (`data/bucket_carried`); nothing is dropped or repeated, and
    a resume restores the waiting samples exactly (see sd_train.data.batching)."""
    bucket_max_aspect: float = 4.0
    """The aspect range of the buckets, 1:r to r:1. Generated buckets stay inside it, listed ones must,
    and an image outside it is a misfit (`bucket_misfits`)."""
    bucket_side_multiple: Optional[int] = None
    """`buckets: generated` only: the step of the bucket sides in pixels, a multiple of the model's
    pixel factor (a larger step gives fewer buckets). Unset: the pixel factor itself."""
    bucket_misfits: Literal["resize", "filter"] = "resize"
    """An image outside the aspect range, or smaller in area than the smallest bucket: `resize` trains
    it in its nearest bucket, resized up or cropped harder (as the square path resizes every image);
    `filter` drops it, judged from the image header before any decode, counted per reason as
    `data/filtered_bucket_aspect` and `data/filtered_bucket_too_small` (not bad input). On web data
    `filter` drops many images (a LAION-like set: 41% at 512 px, 89% at SDXL's 1024 px, almost all
    as too small: bench/bench_buckets.py); `data.filters` on the `.json` sizes drops less bluntly."""
    allow_pipe: bool = False
    """Allow `pipe:` shard URLs (`pipe:aws s3 cp s3://bucket/x-{000000..000099}.tar -`), in
    `train_shards`, `val_shards` and the `.txt` list files they name. A `pipe:` URL runs its command
    through `/bin/sh` on every rank, so it is refused unless set here: a list file shipped with a
    data set, or a config received with a run, must not run commands by itself. Checked by
    sd_train.preflight, which reads the list files."""

    def validate(self) -> None:
        """Field values only; sd_train.preflight checks that the shards exist and are enough."""
        if self.resolution <= 0:  # the multiple the VAE needs is preflight's check: it depends on the model
            raise ConfigError(f"data.resolution={self.resolution} must be positive")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"data.shuffle_buffer={self.shuffle_buffer} must be >= 0")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"data.max_bad_fraction={self.max_bad_fraction} must be in [0, 1]")
        for rule in self.filters:
            parse_filter_rule(rule)
        parse_caption_key(self.caption_key)
        if self.mix == "weighted" and self.mode != "epoch":
            raise ConfigError(
                "data.mix=weighted applies to data.mode=epoch; data.mode=resampled already draws sources by weight"
            )
        self._validate_buckets()
        if self.precomputed and self.caption_key != "txt":
            raise ConfigError(
                f"data.caption_key={self.caption_key!r} applies to image shards; precomputed shards hold the "
                "text embeddings of the captions chosen at precompute time. Leave data.caption_key=txt"
            )

    def _validate_buckets(self) -> None:
        if isinstance(self.buckets, str):
            if self.buckets not in BUCKET_SETS:
                raise ConfigError(
                    f"data.buckets={self.buckets!r} is not one of {list(BUCKET_SETS)} or a list of sizes [[H, W], ...]"
                )
        elif not self.buckets or any(len(b) != 2 or min(b) <= 0 for b in self.buckets):
            raise ConfigError(
                f"data.buckets={self.buckets!r}: a list of buckets is one or more [H, W] pairs of positive pixel sizes"
            )
        elif len({tuple(b) for b in self.buckets}) != len(self.buckets):
            raise ConfigError(f"data.buckets={self.buckets!r} lists a bucket twice")
        if self.bucket_max_aspect < 1:
            raise ConfigError(f"data.bucket_max_aspect={self.bucket_max_aspect} must be >= 1 (4.0: from 1:4 to 4:1)")
        if self.bucket_side_multiple is not None and (self.buckets != "generated" or self.bucket_side_multiple <= 0):
            raise ConfigError(
                f"data.bucket_side_multiple={self.bucket_side_multiple} applies to data.buckets=generated only and "
                "must be positive: remove it or set data.buckets=generated"
            )
        if self.buckets == "sdxl" and self.resolution != SDXL_RESOLUTION:
            raise ConfigError(
                f"data.buckets=sdxl trains at SDXL's ~{SDXL_RESOLUTION}² buckets, but "
                f"data.resolution={self.resolution}: set data.resolution={SDXL_RESOLUTION} (held-out images and "
                "sample grids use it), or use "
                "data.buckets=generated for another area"
            )


@dataclass
class LangevinArgs:
    """Langevin noise (the "diffusion term"): after each optimizer step every trainable parameter
    gets N(0, 2 * diffusion * lr_t) added per element, the same numbers at any world size and
    after any resume (sd_train.langevin). Off unless `diffusion` is set."""

    diffusion: float = 0.0
    """D, the diffusion coefficient: the noise variance per element per step is 2 * D * lr_t
    (with SGD, stochastic gradient Langevin dynamics at temperature D). 0 (the default) is off."""
    diffusion_schedule: Literal["constant", "lr"] = "constant"
    """`constant`: D stays fixed, so the variance 2 D lr_t follows the LR schedule once; `lr`: D
    itself is scaled by lr_t / optim.lr, so the variance falls with the square of the schedule
    (annealed noise, as in Neelakantan et al. 2015)."""
    stop_at_ema: bool = False
    """No noise from the step the EMA window opens (`ema.step_start_ema`) on: the EMA then averages
    a noise-free end of the run. Needs the EMA on."""

    def validate(self) -> None:
        if not math.isfinite(self.diffusion) or self.diffusion < 0:
            raise ConfigError(f"optim.langevin.diffusion={self.diffusion} must be a finite number >= 0 (0 is off)")


@dataclass
class OptimArgs:
    name: Literal["adamw", "sgd"] = "adamw"
    """Optimizer. `sgd` exists for exactness tests (Adam amplifies reduction-order noise)."""
    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 1e-2
    """Decoupled weight decay (AdamW) or L2 (SGD)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear LR warmup from 0 over this many optimizer steps."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """LR after warmup: constant, cosine to 0, or linear to 0 at `max_steps`."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still measured,
    because a non-finite norm is how a bad step is detected on every rank)."""
    langevin: LangevinArgs = field(default_factory=LangevinArgs)
    """Noise added to the weights after each optimizer step (off by default)."""

    def validate(self) -> None:
        _positive("optim.lr", self.lr)
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if self.max_grad_norm < 0:
            raise ConfigError(f"optim.max_grad_norm={self.max_grad_norm} must be >= 0 (0 disables clipping)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={self.betas} must be two numbers in [0, 1)")
        self.langevin.validate()


@dataclass
class PosthocArgs:
    """Post-hoc EMA (EDM2): power-function EMA profiles tracked over the late window and saved as
    snapshots, from which `sd-train posthoc --run DIR` reconstructs an EMA of any length after
    training. Off unless `sigma_rels` is set."""

    sigma_rels: list[float] = field(default_factory=list)
    """Relative standard deviations of the tracked profiles (EDM2 uses [0.05, 0.10]); each is
    tracked as its own sharded shadow. Empty (the default) turns post-hoc EMA off."""
    snapshot_every: int = 100
    """Write a snapshot of every profile every this many optimizer steps (and at the last step).
    Reconstruction can express EMA lengths that the snapshots' spacing resolves."""
    step_start: Optional[int] = None
    """Step at which the profiles start (copies of the weights); t is counted from here. Unset:
    the plain EMA's resolved `ema.step_start_ema`."""
    dtype: Literal["fp16", "bf16", "fp32"] = "fp32"
    """Storage dtype of the snapshots (the live profiles stay fp32)."""

    def validate(self) -> None:
        """Field values only; sd_train.preflight checks the start against the run."""
        _positive("ema.posthoc.snapshot_every", self.snapshot_every)
        if len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise ConfigError(f"ema.posthoc.sigma_rels={self.sigma_rels} has duplicates: list each once")
        for s in self.sigma_rels:
            if not 0.0 < s < MAX_SIGMA_REL:
                raise ConfigError(
                    f"ema.posthoc.sigma_rels: {s} must be in (0, {MAX_SIGMA_REL:.4f}) (sqrt(1/12), a uniform "
                    "average, is the widest profile); EDM2 uses [0.05, 0.10]"
                )
        if self.step_start is not None and self.step_start < 0:
            raise ConfigError(f"ema.posthoc.step_start={self.step_start} must be >= 0 (or null for ema.step_start_ema)")


@dataclass
class EMAArgs:
    enabled: bool = True
    """Keep an exponential moving average of the UNet weights over the last part of the run."""
    decay: float = 0.9999
    """Per-step decay. Effective horizon 1/(1-decay) steps."""
    step_start_ema: Optional[int] = None
    """Absolute optimizer step at which the window opens. If unset, it is derived from
    `window_fraction`, or from `tolerance` when `window_from_tolerance` is true."""
    window_fraction: float = 0.035
    """Window length as a share of `max_steps`, used when `step_start_ema` is unset
    (MosaicML SD2: the last 50k of 1.4M batches, ~3.5%)."""
    window_from_tolerance: bool = False
    """Derive the window as the smallest N with decay^N <= tolerance."""
    tolerance: float = 0.01
    """Largest allowed share of the final EMA that may come from weights before the window.
    A config over it is refused at startup."""
    warmup: bool = False
    """Ramp the decay as in diffusers' EMAModel: min(decay, 1 - (1 + k/inv_gamma)^-power) at the
    k-th update of the window. The startup check then uses the real per-step decays."""
    inv_gamma: float = 1.0
    """Decay warmup inverse multiplicative factor (only with warmup)."""
    power: float = 2.0 / 3.0
    """Decay warmup exponent (only with warmup)."""
    update_every: int = 1
    """Update the EMA every this many optimizer steps (the window math counts updates)."""
    posthoc: PosthocArgs = field(default_factory=PosthocArgs)
    """Post-hoc EMA profiles and snapshots (see PosthocArgs); off by default."""


@dataclass
class CheckpointArgs:
    every_steps: int = 500
    """Save a checkpoint every this many optimizer steps (and always at the last step)."""
    every_minutes: float = 0.0
    """Also save once this many minutes of wall time have passed since the last save (or the
    start), beside `every_steps`; 0 turns the time cadence off. Rank 0's clock decides, and the
    ranks learn its decision in the step's existing all-reduce (no extra collective or host read),
    so the save lands at the end of the step during which the time ran out."""
    keep_last_k: int = 3
    """Keep this many newest complete checkpoints; 0 keeps all. Must be >= 2 otherwise: the
    newest may be mid-save when retention runs, so the one before it must survive."""
    async_save: bool | Literal["auto"] = False
    """Write checkpoint shards in a background thread (torch.distributed.checkpoint.async_save).
    The copy to CPU ("staging") also runs in the background, into buffers kept for the whole run
    (pinned on CUDA); the loop waits for it only before the next optimizer step would change the
    weights, and never for the write. `checkpoint/blocked_s` in the metrics is that wait. The
    staging buffers are a second copy of the rank's whole state (params, optimizer, EMA, post-hoc
    profiles) in host memory: `auto` lets the memory plan (sd_train.memory) choose async saves
    when that copy fits the host, else synchronous ones (FSDP2 only; DeepSpeed saves synchronously)."""
    resume: str = "auto"
    """`auto`: newest complete checkpoint in `<output_dir>/checkpoints` if any, else start fresh.
    `none`: start fresh (refuses if checkpoints exist, so nothing is overwritten by accident).
    Or a path to a checkpoint step folder: a rollback, like `load_step`."""
    load_step: Optional[int] = None
    """With resume=auto: roll back to this step (complete). Once it loads, the later checkpoints and
    post-hoc snapshots move to `<output_dir>/abandoned-<step>-<time>/` (never deleted) and
    `rollbacks.jsonl` records it; relaunching the same command continues the new branch."""
    init_from: str = ""
    """A step folder of another run (FSDP2/DDP) to start this one from: its UNet weights and
    optimizer state, with step 0, a fresh LR schedule, a fresh data position and a fresh EMA window
    (MosaicML's 256 px -> 512 px second stage). Used only when this run's own output_dir holds no
    checkpoint yet, so a preempted stage 2 resumes from its own checkpoints. Shapes must match."""

    def validate(self) -> None:
        """Field values only; sd_train.preflight checks the `resume`, `load_step` and `init_from` folders."""
        _positive("checkpoint.every_steps", self.every_steps)
        if self.every_minutes < 0:
            raise ConfigError(f"checkpoint.every_minutes={self.every_minutes} must be >= 0 (0 turns it off)")
        if self.keep_last_k == 1 or self.keep_last_k < 0:
            raise ConfigError(
                f"checkpoint.keep_last_k={self.keep_last_k}: must be 0 (keep all) or >= 2, because the newest "
                "checkpoint may still be in flight when old ones are deleted"
            )


@dataclass
class DistArgs:
    strategy: Literal["auto", "fsdp2", "ddp", "deepspeed"] = "auto"
    """`fsdp2` shards the UNet with torch's fully_shard (also on one process and on CPU).
    `ddp` replicates it (small models). `deepspeed` runs ZeRO-2/3 through accelerate's DeepSpeed
    plugin (`dist.zero_stage`). `auto`: deepspeed when started by `accelerate launch` with a
    DeepSpeed config (launch/accelerate/zero2.yaml, zero3.yaml), taking its ZeRO stage; else fsdp2."""
    zero_stage: Optional[int] = None
    """DeepSpeed ZeRO stage, 2 or 3 (only with strategy deepspeed). 3 partitions parameters,
    gradients and optimizer state, and the EMA follows each rank's parameter partitions. 2
    partitions gradients and optimizer state; params and the EMA stay replicated. Unset: the
    accelerate launch config's `zero_stage`, else 3."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend. auto: nccl with CUDA, else gloo."""
    param_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """dtype of the params the forward and backward read. FSDP2: of the gathered params (the sharded
    master copy, the optimizer and the EMA stay fp32). DeepSpeed ZeRO-3: bf16 is DeepSpeed's bf16
    mode, bf16 partitions (half the all-gather bytes of fp32) with the fp32 master partitions in the
    optimizer; the EMA reads the fp32 master. ZeRO-2 refuses bf16. `auto` follows `mixed_precision`:
    bf16 under FSDP2 and ZeRO-3 when it is bf16, else fp32. With bf16 here the step runs without
    autocast (see `mixed_precision`)."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """FSDP2 mixed precision: dtype of gradient reduce-scatter."""
    reshard_after_forward: bool | int = True
    """FSDP2: what a block keeps of its gathered params from forward to backward. `true`: nothing,
    it is gathered again over the whole shard group in backward (ZeRO-3 like). `false`: all of it
    (ZeRO-2 like: more memory, one all-gather fewer). An integer N: a copy resharded over groups of
    N ranks, so the backward all-gather runs inside N ranks (e.g. the GPUs of one node, when
    `dist.shard_group_size` spans nodes), for 1/N of the params per rank. N must divide the shard
    group size and lie strictly between 1 and it. The root module always keeps its params."""
    fsdp_units: Literal["auto", "blocks", "layers"] = "auto"
    """FSDP2: what one all-gather fetches. `blocks`: each of the UNet's down/mid/up blocks (9 for
    SD2, 10.9M-260.3M params). `layers`: each resnet and transformer block too (~40 units for SD2;
    for SDXL its 70 BasicTransformerBlocks and 17 resnets, 94 units of at most 49M params): a
    smaller peak of gathered params and finer overlap, for more, smaller collectives. `auto`:
    `blocks` for SD 1.x/2.x, `layers` for SDXL, whose up_blocks[0] alone holds 1.21B params
    (bench/sdxl_units.py prints the unit sizes)."""
    prefetch: int = 0
    """FSDP2: explicitly prefetch the next N units' all-gathers in forward and the previous N in
    backward (torchtitan's option). 0 leaves FSDP2's implicit prefetching."""
    timeout_s: int = 600
    """Collective timeout. A hung rank makes the job exit non-zero after this."""
    memory_budget_gb: Optional[float] = None
    """Per-rank memory limit of the startup memory plan (sd_train.memory), in GiB: the device's on
    a GPU run, the rank's share of the host on a CPU run. A config whose predicted per-rank peak
    exceeds it is refused before any process group starts, with the largest items and the fixes
    that fit. Unset: the GPU's memory (from nvidia-smi), and on every run the host's memory
    (MemTotal) shared by the node's ranks."""
    memory_check: Literal["estimate", "cached", "off"] = "estimate"
    """How the startup memory plan gets the training step's own peak (gathered units, activations,
    temporaries). `estimate`: from a cached fake-tensor estimate (torch's FSDPMemTracker on fake
    tensors and a fake process group), computed by local rank 0 first when there is none (seconds
    for a small UNet, a minute or more for SD2 on a CPU; cached in `$SD_TRAIN_CACHE/memory`).
    `cached`: only a cached estimate; without one the plan counts the model states alone (a lower
    bound) and says so. `off`: no memory plan, no check (`checkpoint.async_save=auto` is then sync)."""
    shard_group_size: Optional[int] = None
    """FSDP2 only: ranks that shard the UNet among themselves. Unset: one node (torchrun's and srun's
    ranks per node), so on one node this is plain FSDP over all ranks; on many nodes it is HSDP:
    sharded inside a node, replicated across nodes, so the per-step all-gathers and reduce-scatters
    stay on the node's fast links and only the gradient all-reduce crosses nodes. Set it to the world
    size for FSDP across every rank, or to a divisor of it. The EMA follows the shard dimension: each
    replica keeps its shard's EMA, identical across replicas, with no collective."""

    zero_overlap_comm: Optional[bool] = None
    """DeepSpeed only: overlap the gradient reduction with backward (more memory for buckets).
    Unset: DeepSpeed's default for the stage."""
    zero_reduce_bucket_size: Optional[int] = None
    """DeepSpeed only: elements per gradient reduce bucket. Unset: DeepSpeed's default (5e8)."""
    zero_allgather_bucket_size: Optional[int] = None
    """DeepSpeed ZeRO-2 only: elements per parameter all-gather bucket. Unset: DeepSpeed's (5e8)."""
    zero_prefetch_bucket_size: Optional[int] = None
    """DeepSpeed ZeRO-3 only: elements of parameters fetched ahead of use. Unset: DeepSpeed's (5e7)."""
    zero_param_persistence_threshold: Optional[int] = None
    """DeepSpeed ZeRO-3 only: parameters of at most this many elements stay gathered between
    forwards (biases, norms: one all-gather each per forward saved). Unset: DeepSpeed's default
    (1e5). 0 keeps none gathered. The EMA swap releases the persisted ones on its way in and out,
    so an EMA evaluation sees the EMA in them too."""

    def validate(self) -> None:
        """Field values only; sd_train.preflight resolves `strategy` and `zero_stage` against the launcher."""
        _positive("dist.timeout_s", self.timeout_s)
        if self.shard_group_size is not None:
            _positive("dist.shard_group_size", self.shard_group_size)
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise ConfigError(f"dist.memory_budget_gb={self.memory_budget_gb} must be > 0 (GiB per rank), or unset")
        if self.prefetch < 0:
            raise ConfigError(f"dist.prefetch={self.prefetch} must be >= 0 (0: FSDP2's implicit prefetching)")
        if not isinstance(self.reshard_after_forward, bool) and self.reshard_after_forward < 2:
            raise ConfigError(
                f"dist.reshard_after_forward={self.reshard_after_forward}: an integer must be a group size of at "
                "least 2 that divides dist.shard_group_size; write false to keep the gathered params, true to "
                "reshard over the whole shard group"
            )
        for name in ("zero_reduce_bucket_size", "zero_allgather_bucket_size", "zero_prefetch_bucket_size"):
            if getattr(self, name) is not None:
                _positive(f"dist.{name}", getattr(self, name))
        if self.zero_param_persistence_threshold is not None and self.zero_param_persistence_threshold < 0:
            raise ConfigError(
                f"dist.zero_param_persistence_threshold={self.zero_param_persistence_threshold} must be >= 0 "
                "(0: no parameter stays gathered), or unset for DeepSpeed's default"
            )


@dataclass
class EvalArgs:
    every_steps: int = 200
    """Validation loss and sample grids every this many steps (and at the end). 0 disables."""
    num_val_samples: int = 64
    """Held-out samples in the validation loss (fixed: the first N of `data.val_shards`). Must be
    positive; `data.val_shards: ""` turns the validation loss off. Every rank reads the same N and
    the ranks check that they agree (a short read on one rank stops the run with a message)."""
    val_timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])
    """Fixed timesteps of the validation denoising loss; each sample is scored at each one, with
    noise fixed by (seed, sample index), so the figure is comparable across runs."""
    prompts: list[str] = field(
        default_factory=lambda: [
            "an emoji of red apple",
            "an emoji of hamburger",
            "an emoji of grinning face",
            "an emoji of rocket",
        ]
    )
    """Fixed prompts for the sample grid."""
    sample_seed: int = 1234
    """Seed of the sample grid's initial noise."""
    num_inference_steps: int = 25
    """DDIM steps per sample."""
    guidance_scale: float = 4.0
    """Classifier-free guidance scale of the sample grid."""
    quality_samples: int = 0
    """Samples per training caption for the sample-quality figures (sd_train.sample_quality: prompt
    accuracy with its 95% Wilson interval, fidelity distance), for the raw weights and the EMA at
    every evaluation; `sd-train posthoc --eval` scores every EMA length with them. Drawn like the
    grid (guidance, DDIM steps, seed). For small captioned sets with one image per caption (the
    demo's 16 emoji): the training set is read whole, at most 64 images. 0 (the default) is off."""

    def validate(self) -> None:
        if self.every_steps < 0:
            raise ConfigError(f"eval.every_steps={self.every_steps} must be >= 0 (0 disables)")
        if self.num_val_samples <= 0:
            raise ConfigError(
                f"eval.num_val_samples={self.num_val_samples} must be positive: to turn the validation loss off "
                "set data.val_shards='' (or eval.every_steps=0 to turn off evaluation altogether)"
            )
        _positive("eval.num_inference_steps", self.num_inference_steps)
        if self.quality_samples < 0:
            raise ConfigError(f"eval.quality_samples={self.quality_samples} must be >= 0 (0 is off)")
        if any(not 0 <= t < 1000 for t in self.val_timesteps):
            raise ConfigError(f"eval.val_timesteps={self.val_timesteps} must lie in [0, 1000)")


@dataclass
class MetricsArgs:
    log_every: int = 10
    """Log scalars every this many optimizer steps."""
    wandb: bool = False
    """Also log to wandb. Offline works: set WANDB_MODE=offline. Without a key or mode the run
    goes on with the JSONL log and one warning."""
    wandb_project: str = "sd-train"
    """wandb project."""
    wandb_group: str = ""
    """wandb group (sweeps set this)."""
    tensorboard: bool = False
    """Also write tensorboard event files under `<output_dir>/tensorboard`."""

    def validate(self) -> None:
        _positive("metrics.log_every", self.log_every)


@dataclass
class PerfArgs:
    """How the hot path uses the hardware. Every switch here is a no-op on CPU unless it says
    otherwise, so the CPU path (the tests, the bitwise-resume promise) is the same with or without it."""

    optimizer_impl: Literal["auto", "foreach", "fused"] = "auto"
    """AdamW kernels. `auto`: `fused` on CUDA and CPU (one kernel over all tensors: ~40% less CPU
    time per step over 686 DTensors, and a first step that skips foreach's quadratic DTensor
    sharding propagation), `foreach` elsewhere. `foreach` reproduces runs made before fused was the
    CPU default."""
    tf32: bool = True
    """TF32 for fp32 matmuls and convolutions on CUDA (Ampere and newer): 10-bit mantissa inputs,
    fp32 accumulation. Rounds differently from fp32 but repeatably: `deterministic` leaves it as set."""
    cudnn_benchmark: bool = True
    """Let cuDNN time its convolution algorithms on the first step of each shape and keep the
    fastest. The pick can differ between runs, so `deterministic=true` turns it off."""
    compile: bool = False
    """`torch.compile` each FSDP unit (down/mid/up block) before it is sharded, as torchtitan does;
    the collectives stay outside the compiled regions. Costs a compile on the first steps."""
    compile_backend: str = "inductor"
    """The `torch.compile` backend of `compile`: `inductor` (generated kernels) or `aot_eager`
    (the same captured forward and backward graphs run by eager kernels: for debugging)."""
    channels_last: bool = False
    """Keep the UNet's conv weights (and so its activations) in channels_last memory format, which
    cuDNN's tensor-core convolutions prefer. Changes the floating-point summation order."""
    deterministic: bool = False
    """`torch.use_deterministic_algorithms(True)` and `CUBLAS_WORKSPACE_CONFIG=:4096:8`, cudnn
    benchmark off: on CUDA the only mode in which a resumed run repeats the uninterrupted one
    bitwise. CPU runs are bitwise reproducible without it."""
    peak_tflops: Optional[float] = None
    """Peak dense bf16 TFLOP/s of one device, for `speed/mfu`. Unset: looked up from the GPU's name
    (H100, H200, A100); no MFU is logged for a device that is not in the table (or a CPU)."""
    count_flops: bool = True
    """Count the UNet's forward+backward FLOPs per image once at startup (one batch-1 step under
    `FlopCounterMode`), for `speed/mfu` and the startup plan."""
    cpu_mmap_threshold_kb: int = 1024
    """On CPU runs, allocations of at least this many KiB get their own mmap from glibc and go back
    to the OS when freed (mallopt M_MMAP_THRESHOLD; sd_train.perf.release_freed_host_memory), so a
    rank's RSS follows its live tensors and the memory plan's CPU peaks hold. 0 keeps glibc's
    dynamic threshold, under which freed activations stayed resident (a 28.6M UNet step peaked 15%
    higher). No effect on CUDA runs' device memory."""
    device_prefetch: bool = True
    """On CUDA, copy the next training batch to the GPU on a side stream while the current step
    runs (sd_train.data.prefetch). The same batches in the same order, and the checkpointed data
    position counts only the batches handed to the step. No-op on CPU."""

    def validate(self) -> None:
        if self.cpu_mmap_threshold_kb < 0:
            raise ConfigError(
                f"perf.cpu_mmap_threshold_kb={self.cpu_mmap_threshold_kb} must be >= 0 (0: glibc's default)"
            )
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError(f"perf.peak_tflops={self.peak_tflops} must be > 0 (TFLOP/s of one device), or unset")


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    """Everything of a run goes here: config.yaml, metrics.jsonl, checkpoints/, samples/, export/."""
    run_name: str = ""
    """Human-readable run name (wandb); defaults to the output folder's name."""
    seed: int = 0
    """Base seed. Rank r seeds its generators with seed + r."""
    max_steps: int = 1000
    """Optimizer steps to train."""
    global_batch_size: int = 32
    """Samples per optimizer step over all ranks: world_size x micro_batch_size x accumulation."""
    micro_batch_size: int = 8
    """Samples per forward/backward on one rank."""
    mixed_precision: Literal["no", "bf16"] = "no"
    """bf16 compute, one policy per strategy (weights, optimizer and EMA stay fp32 everywhere).
    FSDP2 gathers the params in bf16 (`dist.param_dtype=auto` -> bf16, reduce in
    `dist.reduce_dtype`) and runs with no autocast: every activation is bf16, which
    bench/bench_precision.py measures as the smallest saved-for-backward memory. DeepSpeed ZeRO-3
    runs the same way in its bf16 mode (bf16 partitions, fp32 master partitions in the optimizer,
    which the EMA reads). DDP and ZeRO-2 autocast over fp32 params. FSDP2 and ZeRO-3 with an
    explicit `dist.param_dtype=fp32` autocast too (the other policy, kept for comparison); bf16
    params are never put under autocast as well. `bf16` also loads the frozen VAE and text encoder
    in bf16 (their outputs reach the step in the UNet's input dtype)."""
    max_consecutive_skips: int = 5
    """Stop the run after this many optimizer steps in a row were skipped for a non-finite loss or
    gradient (one skipped step is survivable; a streak means diverged training)."""
    export_at_end: bool = True
    """Export a diffusers pipeline folder (raw and, if allocated, EMA UNet) at the end."""
    model: ModelArgs = field(default_factory=ModelArgs)
    objective: ObjectiveArgs = field(default_factory=ObjectiveArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    ema: EMAArgs = field(default_factory=EMAArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    dist: DistArgs = field(default_factory=DistArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    metrics: MetricsArgs = field(default_factory=MetricsArgs)
    perf: PerfArgs = field(default_factory=PerfArgs)

    def grad_accum_steps(self, world_size: int) -> int:
        return self.global_batch_size // (world_size * self.micro_batch_size)

    def autocast_bf16(self) -> bool:
        """Whether the training step runs under bf16 autocast: `mixed_precision=bf16` unless the params
        the forward reads are bf16 already (autocast over bf16 params only adds casts, and on CUDA
        its fp32 list turns the GroupNorm outputs back to fp32)."""
        # FSDP2's gathered params, or DeepSpeed's bf16 mode (preflight allows it with ZeRO-3 only).
        bf16_params = self.dist.strategy != "ddp" and self.dist.param_dtype == "bf16"
        return self.mixed_precision == "bf16" and not bf16_params

    def validate(self, world_size: int) -> None:
        """Every field-level check, section by section, and the batch arithmetic. Needs neither the
        file system nor the environment; sd_train.preflight checks the machine. Raises ConfigError
        naming the field."""
        _positive("max_steps", self.max_steps)
        _positive("micro_batch_size", self.micro_batch_size)
        _positive("max_consecutive_skips", self.max_consecutive_skips)
        _positive("global_batch_size", self.global_batch_size)
        per_step = world_size * self.micro_batch_size
        if self.global_batch_size % per_step != 0:
            lo = max(per_step, self.global_batch_size // per_step * per_step)
            raise ConfigError(
                f"global_batch_size={self.global_batch_size} is not divisible by world_size ({world_size}) x "
                f"micro_batch_size ({self.micro_batch_size}) = {per_step}: set global_batch_size to a multiple "
                f"of {per_step} (e.g. {lo}) or change micro_batch_size"
            )
        # `model` and `ema` have no value-only checks here: the model folder and the EMA plan (in
        # sd_train.ema.plan, above this package) are checked by sd_train.preflight.
        sections = (
            self.data,
            self.objective,
            self.optim,
            self.checkpoint,
            self.dist,
            self.eval,
            self.metrics,
            self.perf,
        )
        for section in (*sections, self.ema.posthoc):
            section.validate()
        if self.optim.langevin.stop_at_ema and not self.ema.enabled:
            raise ConfigError(
                "optim.langevin.stop_at_ema=true stops the noise when the EMA window opens, but ema.enabled=false: "
                "turn the EMA on or set optim.langevin.stop_at_ema=false"
            )
