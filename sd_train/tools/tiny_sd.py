"""Build a tiny Stable Diffusion model folder offline (nothing comes from the HF hub).

It owns the parts a real SD checkpoint would bring: a CLIP-layout BPE tokenizer trained on the
captions, a random (frozen) CLIPTextModel, a tiny AutoencoderKL pretrained briefly on the shards
(a random VAE gives meaningless latents), a tiny UNet2DConditionModel, and SD's DDPMScheduler.
They are saved as a diffusers `StableDiffusionPipeline` folder, so the trainer loads each part with
`from_pretrained(path, subfolder=...)` and `StableDiffusionPipeline.from_pretrained(path)` works.

Usage:
    sd-train prepare-emoji --out data/emoji [--subset demo]
    sd-train build-tiny --data data/emoji --out models/tiny-sd [--resolution 32] [--vae-steps 600]
    sd-train build-tiny --family sdxl --data data/emoji --out models/tiny-sdxl

Writes OUT/{unet,vae,text_encoder,tokenizer,scheduler}/, OUT/model_index.json,
OUT/vae_report.json (PSNR before/after, latent scaling factor) and OUT/sd_train_tiny.json.
`--family sdxl` writes a `StableDiffusionXLPipeline` folder instead, with text_encoder_2/ and
tokenizer_2/ too (sd_train.tools.tiny_sdxl says what makes it SDXL).
"""

from __future__ import annotations

import argparse
import glob
import heapq
import io
import json
import math
import os
import time
import unicodedata
from typing import Any

import diffusers
import numpy as np
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from tokenizers import Regex, normalizers, pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sd_train.data.bad_input import BadInputLog
from sd_train.data.decode import IMAGE_SUFFIXES
from sd_train.data.tar import read_shards as read_tar_shards
from sd_train.errors import UsageError
from sd_train.model.parts import uint8_to_unit_range
from sd_train.tools import tiny_sdxl

# CLIP's pre-tokenizer (transformers' CLIPTokenizer uses the same): special tokens, English
# contractions, runs of letters, single digits, runs of other non-space characters.
CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77  # CLIP's context length; SD pads every prompt to it
TEXT_HIDDEN_SIZE = 64
# VAE pretraining recipe for ~2.5 min on 2 idle CPU cores (32 px emoji, ~0.25 s a step with
# AdamW). At 800 steps: batch 8 24.8 dB, batch 16 x 400 steps 23.8, lr 6e-3 24.6, MSE+L1 24.2;
# cosine decay gave +0.9 dB over a constant lr at 400 steps; 1000 steps reached 25.5 dB.
VAE_STEPS = 600
VAE_BATCH = 8
VAE_LR = 4e-3
VAE_WARMUP = 50
VAE_KL_WEIGHT = 1e-6
VAE_MAX_IMAGES = 20_000  # images held in memory for VAE pretraining (uint8, ~3 KB each at 32 px)
SCALE_IMAGES = 512  # training images encoded to measure the latent std
PSNR_TRAIN_IMAGES = 256  # training images of the second PSNR: what a model that memorises its set decodes


# --------------------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable character table, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _normalize_caption(text: str) -> str:
    """What CLIPTokenizer's normalizer does (NFC, whitespace collapsed, lowercase), for round-trip checks."""
    return " ".join(unicodedata.normalize("NFC", text).split()).lower()


def _word_counts(captions: list[str]) -> dict[str, int]:
    """How often each pre-tokenized word occurs, in the byte-level alphabet: CLIP's normalizer (NFC,
    whitespace collapsed, lowercase) and pre-tokenizer regex, run by `tokenizers` so that encoding
    later splits text exactly the same way."""
    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    counts: dict[str, int] = {}
    for caption in captions:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption)):
            counts[word] = counts.get(word, 0) + 1
    return counts


def _merge_word(symbols: tuple[str, ...], a: str, b: str) -> tuple[str, ...]:
    """`symbols` with every (a, b) replaced by a + b, left to right ("a a a" -> "aa a")."""
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def _learn_merges(captions: list[str], num_merges: int, min_count: int = 2) -> list[tuple[str, str]]:
    """BPE merges over the captions' words, each spelt as byte symbols with `</w>` on the last one.

    Each step merges the adjacent pair with the highest count (summed over word occurrences,
    overlapping pairs counted as `tokenizers` does), ties broken by the lexicographically smallest
    (left, right) strings; it stops after `num_merges` or when no pair occurs `min_count` times.
    `tokenizers`' BpeTrainer is not used: it breaks ties by token ids it assigns in hash-map
    order, so about 1 build in 5 gave a different merges.txt (huggingface/tokenizers#1794).
    """
    word_counts = _word_counts(captions)
    words = [(*w[:-1], w[-1] + "</w>") for w in sorted(word_counts)]
    counts = [word_counts[w] for w in sorted(word_counts)]
    pair_counts: dict[tuple[str, str], int] = {}
    where: dict[tuple[str, str], set[int]] = {}  # words that hold (or once held) the pair
    for i, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + counts[i]
            where.setdefault(pair, set()).add(i)
    # Max-heap on count, then min on (a, b); an entry whose count is no longer current is skipped.
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < num_merges:
        neg_count, a, b = heapq.heappop(heap)
        if pair_counts.get((a, b)) != -neg_count:
            continue
        if -neg_count < min_count:
            break
        merges.append((a, b))
        changed: set[tuple[str, str]] = set()
        for i in sorted(where.pop((a, b))):
            old, new = words[i], _merge_word(words[i], a, b)
            if new == old:  # the pair left this word in an earlier merge
                continue
            for pair in zip(old, old[1:]):
                pair_counts[pair] -= counts[i]
                changed.add(pair)
            for pair in zip(new, new[1:]):
                pair_counts[pair] = pair_counts.get(pair, 0) + counts[i]
                where.setdefault(pair, set()).add(i)
                changed.add(pair)
            words[i] = new
        for pair in sorted(changed):
            if pair_counts[pair] > 0:
                heapq.heappush(heap, (-pair_counts[pair], *pair))
            else:
                del pair_counts[pair]
    return merges


def _write_bpe_files(out_dir: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """vocab.json + merges.txt, CLIP's files (transformers 5 saves only tokenizer.json)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def train_tokenizer(captions: list[str], out_dir: str, num_merges: int = 1000) -> Any:
    """Train a CLIP-layout BPE tokenizer on `captions`, save it in `out_dir`, return the CLIPTokenizer.

    Vocabulary order is CLIP's: 256 byte symbols, the same with `</w>`, one token per merge, then
    `<|startoftext|>` and `<|endoftext|>` (also the pad token, as in SD). Raises RuntimeError if a
    caption does not survive encode -> decode.
    """
    merges = _learn_merges(captions, num_merges)
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    vocab: dict[str, int] = {t: i for i, t in enumerate(tokens)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))  # two merges can spell the same token: one id
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    _write_bpe_files(out_dir, vocab, merges)
    tokenizer = CLIPTokenizer.from_pretrained(out_dir, model_max_length=MODEL_MAX_LENGTH, pad_token=EOS_TOKEN)
    tokenizer.save_pretrained(out_dir)
    _check_round_trip(tokenizer, captions[:500])
    return tokenizer


def _check_round_trip(tokenizer: Any, captions: list[str]) -> None:
    """Captions pad to 77 ids framed by BOS/EOS, and decode back to their normalized text (up to
    spacing: CLIP splits at punctuation). Captions longer than 77 tokens are truncated in training,
    so only their padding is checked."""
    for caption in captions:
        ids = tokenizer(caption, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True).input_ids
        if len(ids) != MODEL_MAX_LENGTH or ids[0] != tokenizer.bos_token_id or ids[-1] != tokenizer.eos_token_id:
            raise RuntimeError(f"tokenizer: {caption!r} gave {len(ids)} ids, {ids[:3]}...{ids[-3:]}")
        if len(tokenizer(caption).input_ids) > MODEL_MAX_LENGTH:
            continue
        back = tokenizer.decode(ids, skip_special_tokens=True)
        if back.replace(" ", "") != _normalize_caption(caption).replace(" ", ""):
            raise RuntimeError(f"tokenizer round trip failed: {caption!r} -> {back!r}")


# --------------------------------------------------------------------------- models


def build_text_encoder(tokenizer: Any, seed: int) -> Any:
    """A random CLIPTextModel (hidden 64, 2 layers): frozen in training, so it only needs to map
    captions to distinct embeddings. Token ids come from `tokenizer`."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=4 * TEXT_HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="quick_gelu",  # SD 1.x's text encoder
        projection_dim=TEXT_HIDDEN_SIZE,
        # eos_token_id != 2 selects the pooled output at the first EOS, not the legacy argmax.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def build_vae(resolution: int, seed: int) -> Any:
    """A tiny AutoencoderKL: two levels (32, 64), 4 latent channels, so the latent is resolution/2."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=resolution,
    )


# The tiny UNet's levels, without its conditioning width (the tiny SDXL build adds SDXL's
# conditioning to the same levels).
TINY_UNET: dict[str, Any] = dict(
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    attention_head_dim=8,
    norm_num_groups=32,
)


def build_unet(latent_size: int, cross_attention_dim: int, seed: int) -> Any:
    """A tiny UNet2DConditionModel: three levels (32, 64, 64), one resnet per level, cross-attention
    at the two low resolutions (8x8, 4x4 for 16x16 latents) and in the mid block.

    Chosen over (32, 64) with two resnets per level: more depth and receptive field, and cheaper
    (single-thread train step at batch 8 on 16x16 latents: 228 ms vs 318 ms CPU time), because
    attention over 16x16 = 256 tokens is what costs; no attention runs at the top level.
    """
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=latent_size, cross_attention_dim=cross_attention_dim, **TINY_UNET)


def build_scheduler() -> Any:
    """SD 1.x's training noise schedule; steps_offset/clip_sample set to avoid deprecation warnings."""
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        clip_sample=False,
        prediction_type="epsilon",
    )
    # DDPM has no such arguments, but SD's scheduler config carries them, and a sampler made with
    # DDIMScheduler/PNDMScheduler.from_config(...) needs them to match SD (DDIM's default
    # set_alpha_to_one=True differs). DDPM's loader drops keys of compatible schedulers silently.
    scheduler.register_to_config(set_alpha_to_one=False, skip_prk_steps=True)
    return scheduler


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- data


def shard_paths(data_dir: str, split: str) -> list[str]:
    """The `split` ("train"/"val") shards of a prepared folder: dataset.json's list, else `split-*.tar`."""
    manifest = os.path.join(data_dir, "dataset.json")
    if os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as f:
            names = json.load(f).get(f"{split}_shards", [])
        return [os.path.join(data_dir, n) for n in names]
    return sorted(glob.glob(os.path.join(data_dir, f"{split}-*.tar")))


def load_captioned_images(
    paths: list[str], resolution: int, max_images: int | None = None
) -> tuple[list[str], torch.Tensor]:
    """(captions, uint8 images N x 3 x R x R) of the image + caption samples of prepared shards,
    in key order within each shard, each image squashed to `resolution` x `resolution` (Lanczos, no
    crop): the VAE pretraining and tokenizer data, not the training stream's decode. Tars are read
    with the data package's reader; a shard it cannot read fully raises ValueError."""
    captions: list[str] = []
    images: list[np.ndarray] = []
    for path in paths:
        log = BadInputLog()
        pending: dict[str, dict[str, bytes]] = {}
        for raw in read_tar_shards([path], log):
            pending.setdefault(raw.key, {}).update(raw.members)
        if log.total():
            bad = [k for k, v in log.counts.items() if v]
            raise ValueError(f"{path}: {bad} shard; rewrite it with `sd-train prepare`")
        for key in sorted(pending):
            parts = pending[key]
            img_bytes = next((parts[e] for e in IMAGE_SUFFIXES if e in parts), None)
            if img_bytes is None or "txt" not in parts:
                continue
            image = Image.open(io.BytesIO(img_bytes)).convert("RGB")
            if image.size != (resolution, resolution):
                image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
            images.append(np.asarray(image))
            captions.append(parts["txt"].decode("utf-8"))
            if max_images is not None and len(images) >= max_images:
                return captions, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    if not images:
        raise ValueError(f"no image+caption samples in {paths}; run `sd-train prepare-emoji --out DIR` first")
    return captions, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- VAE pretraining


@torch.no_grad()
def vae_psnr(vae: Any, images: torch.Tensor, batch: int = 64) -> float:
    """Reconstruction PSNR in dB (pixels in [0, 1], posterior mode) of uint8 `images`."""
    was_training = vae.training
    vae.eval()
    sq_err, count = 0.0, 0
    for i in range(0, len(images), batch):
        x = uint8_to_unit_range(images[i : i + batch])
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        sq_err += float((((recon - x) / 2) ** 2).sum())  # /2: [-1, 1] -> [0, 1] units
        count += x.numel()
    vae.train(was_training)
    return 10.0 * math.log10(1.0 / max(sq_err / count, 1e-12))


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 0: the decay alone gave ~1 dB over a constant lr.

    Not `sd_train.optim.lr_factor` with schedule=cosine: that one rounds pi * ((s - w) / n) where
    this rounds pi * (s - w) / n, so its LRs differ in the last bits and the built VAE would too."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def pretrain_vae(
    vae: Any,
    images: torch.Tensor,
    steps: int,
    seed: int,
    batch: int = VAE_BATCH,
    lr: float = VAE_LR,
    log_every: int = 100,
) -> float:
    """Train `vae` in place on uint8 `images`: MSE reconstruction + VAE_KL_WEIGHT x KL, AdamW.

    Batches are drawn with replacement from a seeded generator. Returns the seconds it took.
    """
    if steps <= 0:
        return 0.0
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = min(VAE_WARMUP, max(1, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, warmup))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        x = uint8_to_unit_range(images[torch.randint(0, len(images), (batch,), generator=gen)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        rec_loss = torch.nn.functional.mse_loss(recon, x)
        loss = rec_loss + VAE_KL_WEIGHT * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            print(f"vae step {step + 1}/{steps} mse {rec_loss.item():.4f} {time.perf_counter() - t0:.0f}s", flush=True)
    vae.eval()
    return time.perf_counter() - t0


@torch.no_grad()
def latent_stats(vae: Any, images: torch.Tensor, seed: int, batch: int = 64) -> dict[str, float]:
    """Mean and std of posterior samples (what the trainer feeds the UNet) and of posterior means.

    scaling_factor = 1 / std(samples) makes the UNet's inputs unit-variance, as SD's 0.18215 did.
    """
    gen = torch.Generator().manual_seed(seed)
    samples, means = [], []
    for i in range(0, len(images), batch):
        posterior = vae.encode(uint8_to_unit_range(images[i : i + batch])).latent_dist
        samples.append(posterior.sample(generator=gen))
        means.append(posterior.mean)
    z, m = torch.cat(samples), torch.cat(means)
    return {
        "sample_mean": float(z.mean()),
        "sample_std": float(z.std()),
        "mode_mean": float(m.mean()),
        "mode_std": float(m.std()),
    }


# --------------------------------------------------------------------------- the build


def _build_vae(
    train_images: torch.Tensor, val_images: torch.Tensor, resolution: int, vae_steps: int, seed: int
) -> tuple[Any, dict[str, Any]]:
    """Build, pretrain and scale the VAE; returns it and the vae_report.json content."""
    vae = build_vae(resolution, seed + 1)
    psnr_before = vae_psnr(vae, val_images)
    seconds = pretrain_vae(vae, train_images, vae_steps, seed)
    psnr_after = vae_psnr(vae, val_images)
    psnr_train = vae_psnr(vae, train_images[:PSNR_TRAIN_IMAGES])
    stats = latent_stats(vae, train_images[:SCALE_IMAGES], seed)
    scaling_factor = 1.0 / stats["sample_std"]
    vae.register_to_config(scaling_factor=scaling_factor)
    report = {
        "psnr_db_before": round(psnr_before, 3),
        "psnr_db": round(psnr_after, 3),
        "psnr_images": len(val_images),
        "psnr_db_train": round(psnr_train, 3),
        "psnr_train_images": min(len(train_images), PSNR_TRAIN_IMAGES),
        "steps": vae_steps,
        "batch_size": VAE_BATCH,
        "lr": VAE_LR,
        "kl_weight": VAE_KL_WEIGHT,
        "seconds": round(seconds, 1),
        "train_images": len(train_images),
        "resolution": resolution,
        "latent_size": resolution // 2,
        "scaling_factor": scaling_factor,
        "latent_stats": stats,
        "torch_threads": torch.get_num_threads(),
    }
    return vae, report


def build_tiny_sd(
    data_dir: str, out_dir: str, resolution: int = 32, vae_steps: int = VAE_STEPS, seed: int = 0, family: str = "sd"
) -> dict[str, Any]:
    """Build the tiny SD (or, `family="sdxl"`, SDXL) folder in `out_dir` from the prepared shards in `data_dir`.

    Returns sd_train_tiny.json's content. Same seed and data -> bitwise-same weights (the VAE
    pretraining also, given the same thread count).
    """
    if resolution <= 0 or resolution % 2:
        raise UsageError(f"--resolution={resolution} must be a positive even number (the VAE halves it)")
    train_paths, val_paths = shard_paths(data_dir, "train"), shard_paths(data_dir, "val")
    if not train_paths:
        raise UsageError(
            f"--data {data_dir}: no train shards there; run `sd-train prepare-emoji --out {data_dir}` first"
        )
    captions, train_images = load_captioned_images(train_paths, resolution, VAE_MAX_IMAGES)
    val_images = load_captioned_images(val_paths, resolution)[1] if val_paths else train_images[:256]

    os.makedirs(out_dir, exist_ok=True)
    tok_dir = os.path.join(out_dir, "tokenizer")
    tokenizer = train_tokenizer(captions, tok_dir)
    with open(os.path.join(tok_dir, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(tok_dir, "merges.txt"), encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().splitlines()[1:] if line]
    if family == "sdxl":
        vae, vae_report = _build_vae(train_images, val_images, resolution, vae_steps, seed)
        pipe = tiny_sdxl.build_pipeline(tokenizer, tok_dir, vae, TINY_UNET, resolution // 2, seed)
        return _save(pipe, out_dir, (vocab, merges), vae_report, tiny_sdxl.summary(data_dir, resolution, seed, pipe))
    text_encoder = build_text_encoder(tokenizer, seed)
    vae, vae_report = _build_vae(train_images, val_images, resolution, vae_steps, seed)
    unet = build_unet(resolution // 2, TEXT_HIDDEN_SIZE, seed + 2)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    summary = _summary(data_dir, resolution, seed, tokenizer, text_encoder, vae, unet, vae_report)
    return _save(pipe, out_dir, (vocab, merges), vae_report, summary)


def _save(pipe: Any, out_dir: str, bpe: tuple[dict, list], vae_report: dict, summary: dict) -> dict[str, Any]:
    """Write the pipeline, each tokenizer's BPE files (the pipeline's save writes tokenizer.json
    only), vae_report.json and sd_train_tiny.json; returns the summary."""
    pipe.save_pretrained(out_dir)
    for name in ("tokenizer", "tokenizer_2"):
        if os.path.isdir(os.path.join(out_dir, name)):
            _write_bpe_files(os.path.join(out_dir, name), *bpe)
    with open(os.path.join(out_dir, "vae_report.json"), "w") as f:
        json.dump(vae_report, f, indent=2)
    with open(os.path.join(out_dir, "sd_train_tiny.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _summary(
    data_dir: str,
    resolution: int,
    seed: int,
    tokenizer: Any,
    text_encoder: Any,
    vae: Any,
    unet: Any,
    report: dict[str, Any],
) -> dict[str, Any]:
    """sd_train_tiny.json: what was built, from what, and how big."""
    params = {"unet": count_params(unet), "vae": count_params(vae), "text_encoder": count_params(text_encoder)}
    return {
        "data_dir": os.path.abspath(data_dir),
        "resolution": resolution,
        "latent_size": resolution // 2,
        "seed": seed,
        "params": params,
        "vocab_size": len(tokenizer),
        "text_hidden_size": TEXT_HIDDEN_SIZE,
        "vae_scaling_factor": report["scaling_factor"],
        "vae_psnr_db": report["psnr_db"],
        "unet_block_out_channels": list(unet.config.block_out_channels),
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
    }


def main_build_tiny(argv: list[str]) -> int:
    """`sd-train build-tiny`: build the tiny offline SD model folder from prepared shards."""
    p = argparse.ArgumentParser(prog="sd-train build-tiny", description=main_build_tiny.__doc__)
    p.add_argument("--data", default="data/emoji", help="folder written by `sd-train prepare-emoji` / `prepare`")
    p.add_argument("--out", default="models/tiny-sd", help="output diffusers folder")
    p.add_argument("--resolution", type=int, default=32, help="training resolution in pixels (latent = resolution/2)")
    p.add_argument(
        "--vae-steps", type=int, default=VAE_STEPS, help=f"VAE pretraining steps of batch {VAE_BATCH} (0 skips)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every random init and of VAE batches")
    p.add_argument(
        "--family", choices=["sd", "sdxl"], default="sd", help="sdxl: two text encoders, pooled + size conditioning"
    )
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    summary = build_tiny_sd(args.data, args.out, args.resolution, args.vae_steps, args.seed, args.family)
    with open(os.path.join(args.out, "vae_report.json")) as f:
        report = json.load(f)
    n = summary["params"]
    text = " + ".join(f"{n[k]:,}" for k in ("text_encoder", "text_encoder_2") if k in n)
    print(
        f"built {args.out} ({args.family}) in {time.perf_counter() - t0:.0f}s: unet {n['unet']:,} vae {n['vae']:,} "
        f"text {text} params; "
        f"VAE PSNR {report['psnr_db_before']:.1f} -> {report['psnr_db']:.1f} dB held-out "
        f"({report['psnr_db_train']:.1f} dB on training images) after {report['steps']} steps "
        f"({report['seconds']:.0f}s); scaling_factor {report['scaling_factor']:.4f}"
    )
    return 0
