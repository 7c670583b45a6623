"""The forward process and targets against diffusers' DDPMScheduler; min-SNR and dropout."""

import torch
from diffusers import DDPMScheduler

from sd_train.config import ObjectiveArgs
from sd_train.model.conditioning import Conditioning
from sd_train.objective import DiffusionObjective


def sd_scheduler(prediction_type="epsilon"):
    return DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        num_train_timesteps=1000,
        prediction_type=prediction_type,
        clip_sample=False,
    )


def make(prediction_type="epsilon", **kw):
    sched = sd_scheduler(prediction_type)
    return sched, DiffusionObjective(
        ObjectiveArgs(prediction_type=prediction_type, **kw), sched.alphas_cumprod, Conditioning(torch.zeros(1, 3, 8))
    )


def test_add_noise_and_velocity_match_diffusers():
    sched, obj = make("v_prediction")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 8, 8, generator=g)
    eps = torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    torch.testing.assert_close(obj.add_noise(x0, eps, t), sched.add_noise(x0, eps, t), rtol=0, atol=1e-6)
    torch.testing.assert_close(obj.velocity(x0, eps, t), sched.get_velocity(x0, eps, t), rtol=0, atol=1e-6)
    torch.testing.assert_close(obj.target(x0, eps, t), sched.get_velocity(x0, eps, t), rtol=0, atol=1e-6)
    _, eps_obj = make("epsilon")
    assert torch.equal(eps_obj.target(x0, eps, t), eps)


def test_min_snr_weights():
    sched, obj = make("epsilon", snr_gamma=5.0)
    t = torch.tensor([10, 500, 990])
    acp = sched.alphas_cumprod[t]
    snr = acp / (1 - acp)
    torch.testing.assert_close(obj.snr_weights(t), torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert obj.snr_weights(t)[0] < 1 and obj.snr_weights(t)[-1] == 1  # low-noise steps down-weighted
    _, vobj = make("v_prediction", snr_gamma=5.0)
    torch.testing.assert_close(vobj.snr_weights(t), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


def test_caption_dropout_rate_and_value():
    torch.manual_seed(0)
    _, obj = make(caption_dropout=0.3)
    obj.dropped = Conditioning(torch.full((1, 3, 8), -7.0))
    emb = torch.ones(4000, 3, 8)
    out = obj.drop_captions(Conditioning(emb)).text_embeds
    dropped = (out[:, 0, 0] == -7.0).float().mean().item()
    assert 0.27 < dropped < 0.33
    assert torch.equal(make(caption_dropout=0.0)[1].drop_captions(Conditioning(emb)).text_embeds, emb)


def test_noise_offset_shifts_channel_means():
    torch.manual_seed(0)
    _, obj = make(noise_offset=0.5)
    noise = obj.sample_noise(torch.zeros(256, 4, 16, 16))
    per_channel_mean_std = noise.mean(dim=(2, 3)).std()
    assert per_channel_mean_std > 0.4  # without the offset it would be ~1/16
