"""The frozen VAE and text encoder (sd_train.model.parts): loaded on first use and released on
demand, run under inference_mode (in bf16 with mixed_precision=bf16), and handed to the training
step as normal fp32 tensors, with the fp32 step bitwise that of the plain no_grad encoders."""

from __future__ import annotations

import pickle

import pytest
import torch

from sd_train.config import ModelArgs, ObjectiveArgs, TrainConfig
from sd_train.data.loader import build_train_loader, val_samples
from sd_train.model.conditioning import Conditioning
from sd_train.model.parts import (
    as_step_input,
    encode_pixels,
    encode_text,
    encode_tokens,
    load_sd_parts,
    uint8_to_unit_range,
)
from sd_train.model.tokenize import CaptionTokenizer, tokenize_captions
from sd_train.objective import DiffusionObjective

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def batch(tiny_assets) -> tuple[torch.Tensor, list[str]]:
    pixels, captions, _ = val_samples(str(tiny_assets["data"] / "val-000000.tar"), 4, 32)
    return pixels, captions


def _parts(tiny_assets, dtype: torch.dtype = torch.float32):
    return load_sd_parts(ModelArgs(pretrained_path=str(tiny_assets["model"])), CPU, seed=0, frozen_dtype=dtype)


def _step(
    parts, latents: torch.Tensor, embeds: torch.Tensor, autocast: bool = False, dropout: float = 0.5
) -> tuple[torch.Tensor, list]:
    """One training micro-batch's loss and UNet gradients, from a fixed RNG state."""
    torch.manual_seed(1)
    empty = encode_text(parts, [""], CPU).map(lambda t: as_step_input(t, parts.step_dtype))
    objective = DiffusionObjective(ObjectiveArgs(caption_dropout=dropout), parts.noise_scheduler.alphas_cumprod, empty)
    parts.unet.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = objective.loss(parts.unet, latents, Conditioning(embeds))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in parts.unet.parameters()]


def test_frozen_parts_load_on_first_use_and_release(tiny_assets) -> None:
    parts = _parts(tiny_assets)
    assert parts.resident() == [] and not parts.loads  # the UNet alone
    assert parts.vae_scale > 0 and parts.latent_downsampling == 2 and parts.token_length == 77
    assert not parts.text_encoder.training and not any(p.requires_grad for p in parts.text_encoder.parameters())
    assert parts.resident() == ["text_encoder"] and parts.loads == {"text_encoder": 1}
    assert parts.vae_scale == float(parts.vae.config.scaling_factor)
    parts.release("text_encoder")
    assert parts.resident() == ["vae"]
    parts.text_encoder  # noqa: B018 -- loads again, and counts
    assert parts.loads == {"text_encoder": 2, "vae": 1}
    parts.load("vae", "text_encoder")  # already there: nothing loads
    assert parts.loads == {"text_encoder": 2, "vae": 1} and parts.resident() == ["text_encoder", "vae"]


def test_inference_mode_encoders_give_the_no_grad_step_bitwise(tiny_assets, batch) -> None:
    pixels, captions = batch
    parts = _parts(tiny_assets)
    ids = tokenize_captions(parts.tokenizer, captions, parts.token_length)

    torch.manual_seed(0)
    latents = encode_pixels(parts, pixels, CPU)
    embeds = encode_tokens(parts, {"input_ids": ids}, CPU).text_embeds
    assert latents.is_inference() and embeds.is_inference()
    # The encoders as they ran before: under no_grad, the posterior drawn from the same RNG state.
    torch.manual_seed(0)
    with torch.no_grad():
        ref_latents = parts.vae.encode(uint8_to_unit_range(pixels)).latent_dist.sample() * parts.vae_scale
        ref_embeds = parts.text_encoder(ids)[0]
    assert torch.equal(latents, ref_latents) and torch.equal(embeds, ref_embeds)

    # Autograd refuses inference tensors where the UNet saves its input (the cross-attention's
    # text, when no caption dropout replaced it by a fresh tensor): what as_step_input is for.
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        _step(parts, ref_latents.contiguous(), embeds, dropout=0.0)
    loss, grads = _step(parts, as_step_input(latents, torch.float32), as_step_input(embeds, torch.float32))
    ref_loss, ref_grads = _step(parts, ref_latents.contiguous(), ref_embeds)
    assert torch.equal(loss, ref_loss) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


def test_bf16_encoders_hand_fp32_inputs_to_the_step(tiny_assets, batch) -> None:
    pixels, captions = batch
    fp32, bf16 = _parts(tiny_assets), _parts(tiny_assets, torch.bfloat16)
    assert bf16.vae.dtype == bf16.text_encoder.dtype == torch.bfloat16 and bf16.step_dtype == torch.float32
    torch.manual_seed(0)
    latents = encode_pixels(bf16, pixels, CPU, sample=False)
    embeds = encode_text(bf16, captions, CPU).text_embeds
    assert latents.dtype == embeds.dtype == torch.bfloat16
    step_latents, step_embeds = as_step_input(latents, torch.float32), as_step_input(embeds, torch.float32)
    assert step_latents.dtype == step_embeds.dtype == torch.float32 and not step_embeds.is_inference()
    # Within bf16 rounding of the fp32 encoders (8 mantissa bits, a few layers deep).
    want_latents, want_embeds = (
        encode_pixels(fp32, pixels, CPU, sample=False),
        encode_text(fp32, captions, CPU).text_embeds,
    )
    for got, want in ((step_latents, want_latents), (step_embeds, want_embeds)):
        assert (got - want).abs().max() <= 0.05 * want.abs().max()
    loss, grads = _step(bf16, step_latents, step_embeds, autocast=True)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)


def test_loader_workers_tokenize_as_the_encoder_did(tiny_assets) -> None:
    parts = _parts(tiny_assets)
    tokenize = parts.caption_tokenizer()
    assert tokenize == CaptionTokenizer((parts.tokenizer,), (77,))
    caption = ["an emoji of a red apple"]
    assert torch.equal(pickle.loads(pickle.dumps(tokenize))(caption)["input_ids"], tokenize(caption)["input_ids"])
    cfg = TrainConfig()
    cfg.data.train_shards = f"{tiny_assets['data']}/train-{{000000..000007}}.tar"
    cfg.micro_batch_size = 4
    loader = build_train_loader(cfg, 0, 1, max_epochs=1, tokenize=tokenize)
    batches = list(loader)
    assert len(batches) == 32
    for b in batches:  # the ids the trainer's own tokenizing gave, and so the same embeddings
        ids = parts.tokenizer(
            b["captions"], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        assert b["input_ids"].dtype == torch.int64 and torch.equal(b["input_ids"], ids)
    assert "input_ids_2" not in batches[0]  # SD: one tokenizer
    assert torch.equal(
        encode_tokens(parts, batches[0], CPU).text_embeds, encode_text(parts, batches[0]["captions"], CPU).text_embeds
    )


@pytest.mark.parametrize("vae_dtype", ["bf16", "fp16"])
def test_vae_dtype_apart_from_the_text_encoder(tiny_assets, batch, vae_dtype) -> None:
    """`model.vae_dtype` sets the VAE's dtype alone (fp16 is refused for SDXL by preflight, not
    here); its latents reach the step in the step's dtype, near the fp32 VAE's."""
    pixels, _ = batch
    args = ModelArgs(pretrained_path=str(tiny_assets["model"]), vae_dtype=vae_dtype)
    parts = load_sd_parts(args, CPU, seed=0)
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[vae_dtype]
    assert parts.vae.dtype == want and parts.text_encoder.dtype == torch.float32
    latents = as_step_input(encode_pixels(parts, pixels, CPU, sample=False), torch.float32)
    ref = encode_pixels(_parts(tiny_assets), pixels, CPU, sample=False)
    assert latents.dtype == torch.float32 and (latents - ref).abs().max() <= 0.05 * ref.abs().max()
