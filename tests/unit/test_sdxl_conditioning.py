"""SDXL's conditioning on the tiny SDXL, against diffusers' own StableDiffusionXLPipeline: the text
conditioning is its `encode_prompt` (both encoders' penultimate hidden states side by side, the
pooled projection of text_encoder_2), the sample grid's guided denoising is its denoising loop, and
the exported folder is an SDXL pipeline it loads offline. Plus the objective's SDXL dropout:
caption dropout drops the sequence and pooled embeddings together (the empty caption's, or
zeros), micro-conditioning dropout each size/crop pair on its own, both drawn per sample per step."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

from sd_train.config import ModelArgs, ObjectiveArgs, TrainConfig
from sd_train.evaluation import Sampler
from sd_train.export import save_pipeline
from sd_train.model.conditioning import Conditioning
from sd_train.model.parts import encode_text, load_sd_parts
from sd_train.objective import DiffusionObjective
from sd_train.parallel.process_group import DistInfo

CPU = torch.device("cpu")
PROMPTS = ["a red circle", "a blue triangle on a white background, drawn small", ""]


@pytest.fixture(scope="module")
def parts(tiny_sdxl):
    return load_sd_parts(ModelArgs(pretrained_path=str(tiny_sdxl["model"])), CPU, seed=0)


@pytest.fixture(scope="module")
def pipe(tiny_sdxl) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl["model"], local_files_only=True)


def test_text_conditioning_is_diffusers_encode_prompt(parts, pipe):
    """Equal bitwise (same modules, same ids, same batch): no rounding to allow for."""
    ours = encode_text(parts, PROMPTS, CPU)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device=CPU, do_classifier_free_guidance=False)
    assert ours.text_embeds.shape == (3, 77, 32 + 64) and ours.pooled.shape == (3, 32)
    assert torch.equal(ours.text_embeds, embeds) and torch.equal(ours.pooled, pooled)
    # The rule has teeth here: each encoder's last layer gives other numbers than its penultimate.
    ids = parts.caption_tokenizer()(PROMPTS)
    last = [
        parts.text_encoder(ids["input_ids"], output_hidden_states=True).hidden_states[-1],
        parts.text_encoder_2(ids["input_ids_2"], output_hidden_states=True).hidden_states[-1],
    ]
    assert (torch.cat(last, dim=-1) - embeds).abs().max() > 0.1


def _objective(p: float = 0.0, zero: bool = False, micro: float = 0.0) -> DiffusionObjective:
    empty = Conditioning(torch.full((1, 3, 8), -7.0), torch.full((1, 5), -5.0))
    args = ObjectiveArgs(caption_dropout=p, zero_dropped_captions=zero, microcond_dropout=micro)
    return DiffusionObjective(args, torch.linspace(0.99, 0.01, 1000), empty)


def _cond(n: int) -> Conditioning:
    return Conditioning(torch.ones(n, 3, 8), torch.ones(n, 5), torch.arange(1, 7).repeat(n, 1))


def test_caption_dropout_drops_sequence_and_pooled_together():
    torch.manual_seed(0)
    out = _objective(0.3).drop_captions(_cond(4000))
    seq, pooled = out.text_embeds[:, 0, 0] == -7.0, out.pooled[:, 0] == -5.0
    assert torch.equal(seq, pooled) and 0.27 < seq.float().mean() < 0.33
    assert torch.equal(out.time_ids, _cond(4000).time_ids)  # the sizes stay
    torch.manual_seed(0)
    zeros = _objective(0.3, zero=True).drop_captions(_cond(4000))
    assert torch.equal(zeros.text_embeds[:, 0, 0] == 0, seq) and torch.equal(zeros.pooled[:, 0] == 0, seq)


def test_microconditioning_dropout_zeroes_each_pair_on_its_own():
    torch.manual_seed(0)
    ids = _objective(micro=0.3).drop_microconditioning(_cond(4000)).time_ids
    pairs = (ids.view(-1, 3, 2) == 0).all(dim=2)  # [B, 3]: pair dropped
    kept = ids.view(-1, 3, 2)[~pairs]
    assert torch.equal(kept, _cond(4000).time_ids.view(-1, 3, 2)[~pairs])  # a pair goes whole or not at all
    assert all(0.27 < r < 0.33 for r in pairs.float().mean(0).tolist())
    assert 0.35 < (pairs.sum(1) == 1).float().mean() < 0.5  # independent: 3 x 0.3 x 0.7^2 = 0.44
    state = torch.get_rng_state()
    assert torch.equal(_objective().drop_microconditioning(_cond(8)).time_ids, _cond(8).time_ids)
    assert torch.equal(torch.get_rng_state(), state), "off (the default) draws nothing: SD runs keep their numbers"


def test_dropout_keeps_what_it_does_not_drop_and_the_model_dtype():
    """Micro-conditioning dropout passes the text conditioning through untouched, and caption
    dropout keeps a bf16 run's pooled embeddings bf16 (the dropped caption is stored in fp32):
    promoted to fp32 they would reach a bf16 UNet's add_embedding as another dtype."""
    cond = _cond(64)
    out = _objective(micro=0.5).drop_microconditioning(cond)
    assert out.text_embeds is cond.text_embeds and out.pooled is cond.pooled
    half = Conditioning(cond.text_embeds.bfloat16(), cond.pooled.bfloat16(), cond.time_ids)
    dropped = _objective(0.5).drop_captions(half)
    assert dropped.text_embeds.dtype == dropped.pooled.dtype == torch.bfloat16


def test_dropout_is_drawn_per_step_for_the_same_stored_conditioning():
    """Precomputed embeddings reach the objective unchanged every epoch: the drop is drawn there,
    per sample per step, not once per stored sample."""
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs):
            seen.append((encoder_hidden_states[:, 0, 0] == -7.0).tolist())
            assert torch.equal(encoder_hidden_states[:, 0, 0] == -7.0, added_cond_kwargs["text_embeds"][:, 0] == -5.0)
            return type("Out", (), {"sample": torch.zeros_like(sample)})()

    torch.manual_seed(0)
    objective, stored = _objective(0.5), _cond(16)
    for _ in range(3):
        objective.loss(Spy(), torch.zeros(16, 4, 2, 2), stored)
    assert len({tuple(s) for s in seen}) == 3 and torch.equal(stored.text_embeds, torch.ones(16, 3, 8))


@pytest.mark.parametrize("zero", [False, True])
def test_sample_grid_denoises_as_the_sdxl_pipeline(parts, pipe, zero):
    """The grid's guided DDIM loop from the same initial noise gives StableDiffusionXLPipeline's
    latents; its unconditional branch is the dropped caption's (`zero_dropped_captions`, which
    the export writes as force_zeros_for_empty_prompt)."""
    cfg = TrainConfig()
    cfg.data.resolution, cfg.objective.zero_dropped_captions = 16, zero
    cfg.eval.prompts, cfg.eval.num_inference_steps, cfg.eval.guidance_scale = PROMPTS[:2], 3, 4.0
    sampler = Sampler(cfg, parts, DistInfo(rank=0, world_size=1, local_rank=0, device=CPU, mesh=None))
    ours = sampler.latents(parts.unet)
    noise = torch.randn(sampler.shape, generator=torch.Generator().manual_seed(cfg.eval.sample_seed))
    pipe.scheduler = DDIMScheduler.from_config(parts.noise_scheduler.config, prediction_type="epsilon")
    pipe.register_to_config(force_zeros_for_empty_prompt=zero)
    theirs = pipe(
        PROMPTS[:2], height=16, width=16, num_inference_steps=3, guidance_scale=4.0, latents=noise, output_type="latent"
    ).images
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()


def test_export_is_an_sdxl_pipeline_diffusers_loads(tiny_sdxl, parts, tmp_path):
    state = {k: v + 0.01 for k, v in parts.unet.state_dict().items()}
    out = save_pipeline(str(tiny_sdxl["model"]), state, tmp_path / "ema", "epsilon", zero_dropped_captions=False)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is False
    loaded = StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True)
    assert all(torch.equal(v, state[k]) for k, v in loaded.unet.state_dict().items())
    assert type(loaded.text_encoder_2).__name__ == "CLIPTextModelWithProjection" and loaded.tokenizer_2.pad_token == "!"
