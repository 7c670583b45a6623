"""What every shadow of the weights shares: K fp32 copies of this rank's pieces of the trainable
parameters, where the strategy's `EMALayout` says they live, each moved towards the weights with
one `torch._foreach_lerp_` and no collective. `ShardedEMA` keeps one, `PowerEMAProfiles` one per
profile; they differ only in the weight each update takes and in what they record."""

from __future__ import annotations

import torch

from sd_train.ema.contracts import EMALayout


def fp32_shadow(tensors: list[torch.Tensor], copy_weights: bool) -> list[torch.Tensor]:
    """An fp32 shadow of each local tensor: a copy of the weights, or zeros to be filled by a load.
    fp32 even for bf16 params: 1 - decay = 1e-4 is below bf16's resolution."""
    with torch.no_grad():
        return [
            t.to(torch.float32, copy=True) if copy_weights else torch.zeros_like(t, dtype=torch.float32)
            for t in tensors
        ]


class ShadowPieces:
    """Owns `count` shadows of this rank's parameter pieces (None until allocated) and the views of
    the weights they follow. Subclasses name the per-rank keys (`piece_key`) and say what they are
    (`what`, for error messages)."""

    what = "shadow"

    def __init__(self, model: torch.nn.Module, layout: EMALayout, count: int):
        self.layout = layout
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.count = count
        self.pieces: list[list[torch.Tensor]] | None = None
        self._locals: list[torch.Tensor] = []

    @property
    def is_open(self) -> bool:
        return self.pieces is not None

    def allocate(self, copy_weights: bool) -> None:
        """Create the shadows (copies of the weights, or zeros to be filled by a load)."""
        locals_ = self.layout.views(self.named_params)
        self._locals = locals_ if self.layout.cache_views else []
        self.pieces = [fp32_shadow(locals_, copy_weights) for _ in range(self.count)]

    def weights(self) -> list[torch.Tensor]:
        """The pieces of the weights the shadows follow, now."""
        return self._locals if self.layout.cache_views else self.layout.views(self.named_params)

    def lerp(self, weights: list[float]) -> None:
        """Move shadow k towards the weights by `weights[k]` (1 - its decay): one foreach pass each."""
        locals_ = self.weights()
        with torch.no_grad():
            for shadow, weight in zip(self.pieces, weights):
                torch._foreach_lerp_(shadow, locals_, weight)

    def local_bytes(self) -> int:
        """Shadow bytes held by this rank (0 before the start)."""
        return sum(t.numel() * t.element_size() for s in self.pieces for t in s) if self.pieces else 0

    def piece_key(self, index: int, name: str) -> str:
        """The per-rank key of shadow `index`'s piece of parameter `name`."""
        raise NotImplementedError

    def local_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's pieces by `piece_key`, for per-rank files (DeepSpeed)."""
        if self.pieces is None:
            return {}
        return {
            self.piece_key(i, n): s
            for i, shadow in enumerate(self.pieces)
            for (n, _), s in zip(self.named_params, shadow)
        }

    def load_local_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Fill the shadows (allocated by `load_meta_state_dict`) from `local_state_dict` output."""
        if self.pieces is None:
            return
        with torch.no_grad():
            for key, s in self.local_state_dict().items():
                if key not in state or state[key].shape != s.shape:
                    saved = tuple(state[key].shape) if key in state else "missing"
                    raise ValueError(f"{self.what} piece {key!r}: saved {saved}, expected {tuple(s.shape)}")
                s.copy_(state[key])

    def global_tensors(self, index: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Shadow `index` as global tensors by parameter name (`layout.global_tensor`: DTensors
        where sharded), cast to `dtype` if given."""
        return {
            n: self.layout.global_tensor(p, s if dtype in (None, s.dtype) else s.to(dtype))
            for (n, p), s in zip(self.named_params, self.pieces[index])
        }
