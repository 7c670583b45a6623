"""The forward process and targets against diffusers' DDPMScheduler; min-SNR and dropout."""

from types import SimpleNamespace

import pytest
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
    sched = sd_scheduler()
    empty = Conditioning(torch.full((1, 3, 8), -7.0))
    obj = DiffusionObjective(ObjectiveArgs(caption_dropout=0.3), sched.alphas_cumprod, empty)
    emb = torch.ones(4000, 3, 8)
    out = obj.drop_captions(Conditioning(emb)).text_embeds
    dropped = (out[:, 0, 0] == -7.0).float().mean().item()
    assert 0.27 < dropped < 0.33
    assert torch.equal(make(caption_dropout=0.0)[1].drop_captions(Conditioning(emb)).text_embeds, emb)


def test_noise_offset_is_one_draw_per_sample_and_channel():
    """Offset noise is the plain noise plus noise_offset times one normal draw per (sample, channel),
    drawn after it from the same generator: written out here with the same seed."""
    _, obj = make(noise_offset=0.1)
    latents = torch.zeros(3, 4, 2, 2)
    torch.manual_seed(5)
    noise = obj.sample_noise(latents)
    torch.manual_seed(5)
    plain = torch.randn(3, 4, 2, 2)
    assert torch.equal(noise, plain + 0.1 * torch.randn(3, 4, 1, 1))
    torch.manual_seed(5)
    assert torch.equal(make()[1].sample_noise(latents), plain)


def test_noise_offset_shifts_channel_means():
    torch.manual_seed(0)
    _, obj = make(noise_offset=0.5)
    noise = obj.sample_noise(torch.zeros(256, 4, 16, 16))
    per_channel_mean_std = noise.mean(dim=(2, 3)).std()
    assert per_channel_mean_std > 0.4  # without the offset it would be ~1/16


class RecordingUNet(torch.nn.Module):
    """Stands in for the UNet: records what the loss feeds it and predicts a fixed fraction of its
    input, so every sample has its own, known error."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, noisy, timesteps, encoder_hidden_states):
        self.seen.append((noisy.clone(), timesteps.clone(), encoder_hidden_states.clone()))
        return SimpleNamespace(sample=0.5 * noisy)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_applies_min_snr_weights(prediction_type):
    """loss() with snr_gamma set equals the mean of min-SNR-weighted per-sample errors, computed here
    from what the UNet was fed and diffusers' schedule: the noise is recovered from the noisy input."""
    sched, obj = make(prediction_type, snr_gamma=5.0, caption_dropout=0.0)
    x0 = torch.randn(64, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    unet = RecordingUNet()
    text = torch.randn(64, 3, 8, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    loss = obj.loss(unet, x0, Conditioning(text))
    noisy, t, seen_text = unet.seen[0]
    # Timesteps uniform over the whole schedule, drawn first from the global generator; the
    # captions reach the UNet (no dropout here).
    torch.manual_seed(0)
    assert torch.equal(t, torch.randint(0, 1000, (64,))) and torch.equal(seen_text, text)
    acp = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    eps = (noisy - acp.sqrt() * x0) / (1 - acp).sqrt()
    target = eps if prediction_type == "epsilon" else acp.sqrt() * eps - (1 - acp).sqrt() * x0
    per_sample = (0.5 * noisy - target).square().mean(dim=(1, 2, 3))
    snr = (acp / (1 - acp)).flatten()
    weights = torch.minimum(snr, torch.tensor(5.0)) / (snr if prediction_type == "epsilon" else snr + 1)
    assert (weights < 0.99).sum() >= 8, "enough samples whose weight is not 1, or the check shows nothing"
    torch.testing.assert_close(loss, (weights * per_sample).mean(), rtol=1e-5, atol=0)
    # Without snr_gamma the same draws give the plain mean.
    _, plain = make(prediction_type, caption_dropout=0.0)
    torch.manual_seed(0)
    torch.testing.assert_close(
        plain.loss(RecordingUNet(), x0, Conditioning(torch.zeros(64, 3, 8))), per_sample.mean(), rtol=1e-5, atol=0
    )


def test_bf16_inputs_stay_bf16_and_the_schedule_is_fp32():
    """The schedule is kept in fp32 whatever it came in (a float64 one too), and the noising and
    the caption dropout return the dtype of the latents and embeddings they are given."""
    sched = sd_scheduler()
    obj = DiffusionObjective(
        ObjectiveArgs(caption_dropout=0.5), sched.alphas_cumprod.double(), Conditioning(torch.zeros(1, 3, 8))
    )
    assert obj.alphas_cumprod.dtype == torch.float32 and obj.num_timesteps == 1000
    x = torch.randn(2, 4, 8, 8).bfloat16()
    t = torch.tensor([3, 700])
    assert obj.add_noise(x, x, t).dtype == obj.velocity(x, x, t).dtype == torch.bfloat16
    assert make(noise_offset=0.1)[1].sample_noise(x).dtype == torch.bfloat16
    assert (
        obj.drop_captions(Conditioning(torch.ones(8, 3, 8, dtype=torch.bfloat16))).text_embeds.dtype == torch.bfloat16
    )
