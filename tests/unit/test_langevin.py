"""The Langevin noise (sd_train.langevin): a function of (seed, step, parameter, element) whatever
piece of the parameter a rank holds, generated only for that piece, with the variance it promises.
The real shardings (FSDP2 over 2 ranks, DeepSpeed's partitions) and the bitwise resume are checked
on real runs: tests/e2e/dist/ema_fsdp2.py, tests/e2e/test_deepspeed.py and the kill chain
(tests/support/runs.py turns the noise on for every end-to-end run)."""

import math

import pytest
import torch

from sd_train.config import LangevinArgs, TrainConfig
from sd_train.errors import ConfigError
from sd_train.langevin import CHUNK, ChunkedNoise, LangevinNoise, NoisePiece, noise_std
from tests.support.random_count import RandomCount

NUMEL = 2 * CHUNK + 12_345  # three chunks, the last one short


def full_noise(numel: int, step: int = 7, name: str = "w", seed: int = 0, chunk: int = CHUNK) -> torch.Tensor:
    """The noise of the whole parameter, as one process holding all of it adds it."""
    t = torch.zeros(numel)
    ChunkedNoise(seed, chunk).add_([NoisePiece(name, numel, 0, t)], step, 1.0)
    return t


def flat_partitions(numel: int, world: int) -> list[tuple[int, int]]:
    """(offset, length) of each rank's piece as ZeRO-3 partitions a flattened parameter:
    ceil(numel / world) each, the last ranks short or empty (their padding holds no noise)."""
    per = math.ceil(numel / world)
    return [(r * per, max(0, min(per, numel - r * per))) for r in range(world)]


def row_shards(rows: int, row_len: int, world: int) -> list[tuple[int, int]]:
    """(offset, length) of each rank's Shard(0) piece: torch.chunk of the rows, as FSDP2 splits."""
    per = math.ceil(rows / world)
    out = []
    for r in range(world):
        lo, hi = min(rows, r * per), min(rows, (r + 1) * per)
        out.append((lo * row_len, (hi - lo) * row_len))
    return out


@pytest.mark.parametrize("world", [2, 3, 7, 64])
def test_any_split_of_a_parameter_gets_the_noise_of_the_whole(world):
    """Flat partitions (ZeRO-3) and uneven row shards (FSDP2) at several world sizes: the pieces,
    each generated on its own, put together equal the whole parameter's noise bitwise; each piece
    generated at most two chunks more than it holds."""
    reference = full_noise(NUMEL)
    rows, row_len = 1023, 193  # 197,439 elements, uneven over every world size here
    row_reference = full_noise(rows * row_len)
    for numel, ref, pieces in (
        (NUMEL, reference, flat_partitions(NUMEL, world)),
        (rows * row_len, row_reference, row_shards(rows, row_len, world)),
    ):
        got = []
        for offset, length in pieces:
            local = torch.zeros(length)
            with RandomCount() as drawn:
                ChunkedNoise(0).add_([NoisePiece("w", numel, offset, local)], 7, 1.0)
            assert drawn.elements <= length + 2 * CHUNK, (offset, length, drawn.elements)
            got.append(local)
        assert torch.equal(torch.cat(got), ref), world


def test_a_small_piece_draws_no_more_than_the_chunks_it_touches():
    """The cost side of the same promise: a rank holding 1/64 of a 64-chunk parameter, its edges
    inside two chunks, draws those two chunks, not the parameter (the bug where every rank
    regenerates the whole tensor)."""
    numel, chunk = 64 * 4096, 4096
    offset = 5 * chunk + 100
    local = torch.zeros(chunk)
    with RandomCount() as drawn:
        ChunkedNoise(0, chunk=chunk).add_([NoisePiece("w", numel, offset, local)], 3, 1.0)
    assert drawn.elements == 2 * chunk
    assert torch.equal(local, full_noise(numel, step=3, chunk=chunk)[offset : offset + chunk])


def test_the_noise_is_keyed_by_seed_step_and_parameter_and_is_standard_normal():
    a = full_noise(NUMEL)
    assert torch.equal(a, full_noise(NUMEL)), "a pure function: the same call, the same numbers"
    for other in (full_noise(NUMEL, step=8), full_noise(NUMEL, name="v"), full_noise(NUMEL, seed=1)):
        assert not torch.equal(a, other)
        assert abs(float(torch.corrcoef(torch.stack([a, other]))[0, 1])) < 0.01
    # Chunks are not copies of each other either.
    assert abs(float(torch.corrcoef(torch.stack([a[:CHUNK], a[CHUNK : 2 * CHUNK]]))[0, 1])) < 0.02
    assert abs(float(a.mean())) < 0.01 and abs(float(a.std()) - 1.0) < 0.01


def test_non_contiguous_pieces_get_the_noise_in_logical_order():
    """DDP with channels_last keeps conv weights non-contiguous: element i is still element i of
    the parameter's logical flattening."""
    w = torch.zeros(8, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    ChunkedNoise(0).add_([NoisePiece("conv", w.numel(), 0, w)], 7, 1.0)
    assert torch.equal(w.reshape(-1), full_noise(w.numel(), name="conv"))


def test_std_is_sqrt_2_d_lr_with_its_schedule_and_stop():
    lr, peak = 2e-4, 1e-3
    assert noise_std(LangevinArgs(diffusion=0.0), 5, lr, peak, None) == 0.0
    assert noise_std(LangevinArgs(diffusion=1e-3), 5, lr, peak, None) == pytest.approx(math.sqrt(2 * 1e-3 * lr))
    scaled = LangevinArgs(diffusion=1e-3, diffusion_schedule="lr")
    assert noise_std(scaled, 5, lr, peak, None) == pytest.approx(math.sqrt(2 * 1e-3 * (lr / peak) * lr))
    stop = LangevinArgs(diffusion=1e-3, stop_at_ema=True)
    assert noise_std(stop, 9, lr, peak, 10) > 0 and noise_std(stop, 10, lr, peak, 10) == 0.0


def test_langevin_noise_adds_std_times_the_keyed_noise_to_the_strategy_pieces():
    """What the trainer calls after a step: the strategy's pieces get std x the keyed noise, and the
    strategy is told afterwards (to refresh the copies the forward reads)."""

    class Pieces:
        def __init__(self):
            self.w = torch.ones(NUMEL)
            self.refreshed = 0

        def noise_pieces(self):
            return [NoisePiece("w", NUMEL, 0, self.w)]

        def after_noise(self):
            self.refreshed += 1

    strategy = Pieces()
    noise = LangevinNoise(LangevinArgs(diffusion=0.5), seed=0, peak_lr=1e-3, ema_start=None, strategy=strategy)
    noise.after_step(7, 1e-3)
    std = math.sqrt(2 * 0.5 * 1e-3)
    assert noise.last_std == pytest.approx(std) and strategy.refreshed == 1
    assert torch.equal(strategy.w, torch.ones(NUMEL).add_(full_noise(NUMEL), alpha=std))


def test_config_refuses_negative_diffusion_and_a_stop_without_an_ema():
    cfg = TrainConfig()
    cfg.optim.langevin.diffusion = -1e-4
    with pytest.raises(ConfigError, match=r"optim.langevin.diffusion=-0.0001 must be"):
        cfg.validate(1)
    cfg = TrainConfig()
    cfg.optim.langevin = LangevinArgs(diffusion=1e-4, stop_at_ema=True)
    cfg.ema.enabled = False
    with pytest.raises(ConfigError, match=r"optim.langevin.stop_at_ema=true .* ema.enabled=false"):
        cfg.validate(1)
