"""Langevin noise (the "diffusion term"): after each optimizer step, every trainable parameter gets
theta <- theta + N(0, 2 * D * lr_t) per element (`optim.langevin`, off by default).

With SGD this is the Euler-Maruyama step of Langevin dynamics, d(theta) = -grad L dt + sqrt(2 D) dW
with dt = lr: stochastic gradient Langevin dynamics (Welling & Teh 2011), whose iterates sample
exp(-L / D) instead of settling in one minimum. With AdamW the same noise is added after its update
(the drift is then Adam's, not the gradient).

**The same noise at any world size and after any resume.** Element i of the flattened parameter
named p at optimizer step t gets noise that is a function of (seed, t, p, i) only. The flattened
parameter is cut into fixed chunks of `CHUNK` elements; chunk k is `torch.randn` of the chunk's
length from a generator seeded with a hash of (seed, t, crc32(p), k). A rank generates only the
chunks its own piece overlaps: its FSDP2 shard, ZeRO-3 partition or ZeRO-2 master fragment, keyed by
that piece's *global* offset in the flattened parameter (the strategy's `noise_pieces`). So 1, 2
or 64 ranks add the same numbers to the same elements, and a resumed run, which knows t, adds what
the uninterrupted run added: the noise keeps no state of its own. A rank generates at most the
parts of two chunks beyond its piece (where the piece's edges cut a chunk).

The noise goes into the weights the optimizer steps: under DeepSpeed the fp32 master partitions
(a copy of them would be overwritten by the next step), after which the strategy refreshes the
copies the forward reads (`Strategy.after_noise`).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Protocol

import torch

from sd_train.config import LangevinArgs

# Elements per chunk: 256 KiB of fp32, so the scratch chunk stays in a core's L2 cache between
# the randn that writes it and the add that reads it (one pass over the parameter in memory).
CHUNK = 1 << 16
_MASK64 = (1 << 64) - 1
_NOISE_DOMAIN = 0x4C414E47  # "LANG": keeps these seeds apart from any other use of the run's seed


@dataclass
class NoisePiece:
    """This rank's piece of one parameter, as the noise sees it."""

    name: str  # the parameter's name in the plain UNet (keys its noise)
    numel: int  # elements of the whole parameter
    offset: int  # where `local` starts in the flattened parameter
    # The values the optimizer steps (the fp32 master where there is one), any shape: element i of
    # the piece is element i of `local.reshape(-1)`, whatever its memory layout.
    local: torch.Tensor


def _splitmix64(x: int) -> int:
    """One step of splitmix64 (Steele et al. 2014): a bijective 64-bit mix."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _name_key(name: str) -> int:
    return zlib.crc32(name.encode())


def _seed_base(seed: int) -> int:
    return _splitmix64((seed & _MASK64) ^ _NOISE_DOMAIN)


def chunk_seed(seed: int, step: int, name: str, chunk: int) -> int:
    """The generator seed of chunk `chunk` of parameter `name` at `step` (63 bits, as torch takes):
    splitmix64 folded over (seed, step, crc32(name), chunk)."""
    x = _seed_base(seed)
    for part in (step, _name_key(name), chunk):
        x = _splitmix64(x ^ (part & _MASK64))
    return x >> 1


@dataclass
class _Plan:
    """A contiguous piece's chunks, worked out once: (chunk index, the scratch view `normal_`
    fills, the part of it the piece holds, the piece's view that receives it)."""

    name_key: int
    ops: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]


def noise_std(args: LangevinArgs, step: int, lr: float, peak_lr: float, ema_start: int | None) -> float:
    """The noise's standard deviation at `step` (taken with learning rate `lr`): sqrt(2 D lr),
    with D scaled by lr / peak_lr under `diffusion_schedule=lr`; 0 once the EMA window is open
    under `stop_at_ema`."""
    if args.diffusion <= 0 or (args.stop_at_ema and ema_start is not None and step >= ema_start):
        return 0.0
    d = args.diffusion * (lr / peak_lr if args.diffusion_schedule == "lr" else 1.0)
    return math.sqrt(2.0 * d * lr)


class ChunkedNoise:
    """Adds the (seed, step, parameter, element)-keyed noise to pieces of parameters. Owns one
    generator and one scratch chunk per device."""

    def __init__(self, seed: int, chunk: int = CHUNK):
        self.seed = seed
        self.chunk = chunk
        self._gens: dict[torch.device, torch.Generator] = {}
        self._scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._plans: dict[tuple, _Plan] = {}
        self._base = _seed_base(seed)

    def _tools(self, like: torch.Tensor) -> tuple[torch.Generator, torch.Tensor]:
        dev = like.device
        if dev not in self._gens:
            self._gens[dev] = torch.Generator(device=dev)
        key = (dev, like.dtype)
        if key not in self._scratch:
            self._scratch[key] = torch.empty(self.chunk, device=dev, dtype=like.dtype)
        return self._gens[dev], self._scratch[key]

    def _plan(self, piece: NoisePiece, flat: torch.Tensor, used: dict[tuple, _Plan]) -> _Plan:
        """The chunk operations of a piece whose values are the 1-D `flat`. Kept for the next step
        when the piece is contiguous (`flat` views its own storage), keyed by where it lives: the
        strategies hand the same storage every step. A cached view keeps its storage alive, so an
        equal address is the same storage; plans not used by a step are dropped after it."""
        key = (piece.name, piece.numel, piece.offset, flat.data_ptr(), flat.numel(), flat.dtype, flat.device)
        plan = self._plans.get(key)
        if plan is not None:
            used[key] = plan
            return plan
        _, scratch = self._tools(flat)
        start, end = piece.offset, piece.offset + flat.numel()
        ops = []
        for k in range(start // self.chunk, (end - 1) // self.chunk + 1):
            c0 = k * self.chunk
            length = min(self.chunk, piece.numel - c0)  # from the whole parameter: the same on every rank
            lo, hi = max(start, c0), min(end, c0 + length)
            ops.append((k, scratch[:length], scratch[lo - c0 : hi - c0], flat[lo - start : hi - start]))
        plan = _Plan(_name_key(piece.name), ops)
        if piece.local.is_contiguous():
            used[key] = plan
        return plan

    @torch.no_grad()
    def add_(self, pieces: list[NoisePiece], step: int, std: float) -> None:
        """Add std * noise to every piece, in place. Per chunk: one seed, one `normal_` into the
        scratch chunk (small enough to stay in cache) and one add into the piece."""
        x_step = _splitmix64(self._base ^ (step & _MASK64))
        used: dict[tuple, _Plan] = {}
        for piece in pieces:
            if piece.local.numel() == 0:
                continue
            # A non-contiguous piece (DDP with channels_last) gets its noise in logical order.
            target = piece.local if piece.local.is_contiguous() else piece.local.contiguous()
            gen, _ = self._tools(target)
            plan = self._plan(piece, target.view(-1), used)
            x_name = _splitmix64(x_step ^ plan.name_key)
            for k, fill, part, dst in plan.ops:
                gen.manual_seed(_splitmix64(x_name ^ k) >> 1)
                fill.normal_(generator=gen)
                dst.add_(part, alpha=std)
            if target is not piece.local:
                piece.local.copy_(target)
        self._plans = used


class NoiseTargets(Protocol):
    """Where the noise goes: what sd_train.parallel.strategy.Strategy implements."""

    def noise_pieces(self) -> list[NoisePiece]: ...

    def after_noise(self) -> None: ...


class LangevinNoise:
    """Owns when and how much noise the weights get after an optimizer step (`optim.langevin`);
    the strategy says where each rank's pieces of the weights live. Stateless between steps: the
    noise of step t is a function of the seed and t, so a resume needs no checkpoint entry."""

    def __init__(self, args: LangevinArgs, seed: int, peak_lr: float, ema_start: int | None, strategy: NoiseTargets):
        self.args = args
        self.peak_lr = peak_lr
        self.ema_start = ema_start
        self.strategy = strategy
        self.noise = ChunkedNoise(seed)
        self.last_std = 0.0

    @property
    def enabled(self) -> bool:
        return self.args.diffusion > 0

    def after_step(self, step: int, lr: float) -> None:
        """Call after optimizer step `step` was taken with learning rate `lr` (before the LR
        schedule moves on)."""
        self.last_std = noise_std(self.args, step, lr, self.peak_lr, self.ema_start)
        if self.last_std == 0.0:
            return
        self.noise.add_(self.strategy.noise_pieces(), step, self.last_std)
        self.strategy.after_noise()
