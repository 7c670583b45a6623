"""The one interface between the training loop and how the UNet is spread over the ranks.

Two implementations: `FSDPStrategy` (sd_train.parallel.fsdp: FSDP2 or DDP, checkpoints through
torch.distributed.checkpoint) and `DeepSpeedStrategy` (sd_train.parallel.deepspeed: ZeRO-2/3 through
accelerate's DeepSpeed plugin, DeepSpeed's own per-rank checkpoint files). The trainer, the
checkpointer and export call only what is declared here, so neither holds a branch on the backend.

A Strategy owns the wrapped model and the optimizer it steps:
- `wrap` wraps the UNet and builds the optimizer (DeepSpeed needs the optimizer to wrap);
- `set_grad_sync` / `backward` / `step` are one optimizer step over micro-batches;
- `ema_layout` says where each rank's piece of each parameter lives, for ShardedEMA;
- `noise_pieces` / `after_noise` say the same for the Langevin noise (the optimizer's own pieces);
- `save` / `load` / `missing_files` move the tensor state (model, optimizer, EMA) of a step folder;
- `topology` says how it is really laid out (export reads a checkpoint, sd_train.export).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from sd_train.ema.contracts import EMALayout, Shadow
from sd_train.langevin import NoisePiece

OptimizerFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]


@dataclass
class AsyncSave:
    """A background save: `staged` is done once the tensors are copied off the live state (the
    next optimizer step may change the weights from then on), `written` once the files are."""

    staged: Future
    written: Future


class Strategy(abc.ABC):
    """Owns the wrapped UNet (`model`), the plain UNet inside it (`module`) and the optimizer."""

    name: str
    # Written into trainer_state.json; a run refuses a checkpoint of another format.
    checkpoint_format: str
    # True when the tensor writer publishes its own completion marker only after every rank's
    # files are written (DCP's coordinator writes `.metadata` last). Otherwise the checkpointer
    # holds a barrier before it renames the folder.
    writes_completion_marker: bool
    # Whether `save(..., process_group=...)` can write in the background.
    supports_async_save: bool = False
    # Whether `step` queues the optimizer update before its host read, the optimizer itself
    # skipping a non-finite step from a device flag (fused AdamW's `found_inf`).
    skip_on_device: bool = False

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer

    @abc.abstractmethod
    def wrap(self, unet: torch.nn.Module, make_optimizer: OptimizerFactory) -> None:
        """Wrap `unet` for data parallelism and build the optimizer over its trainable parameters."""

    @property
    @abc.abstractmethod
    def module(self) -> torch.nn.Module:
        """The UNet itself, whose named parameters the EMA follows."""

    # ---- one optimizer step ---------------------------------------------------------------------

    def set_grad_sync(self, enabled: bool) -> None:  # noqa: B027 (a no-op where the engine decides itself)
        """Before each micro-batch's forward: reduce gradients only on the last one. DeepSpeed
        decides this itself from its accumulation count, so the default does nothing."""

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        """Backward of one micro-batch; the loss is already divided by the accumulation count."""

    @abc.abstractmethod
    def step(self, also_read: Sequence[torch.Tensor] = ()) -> tuple[bool, float, list[float]]:
        """The optimizer step at the accumulation boundary: (taken, global grad norm, the values of
        `also_read`). Every rank must reach the same decision with no extra collective. The norm
        is read on the host once (sd_train.host_sync); the loop's other per-step figures
        (`also_read`, e.g. the preemption flag) come back in that same read."""

    # ---- the EMA ------------------------------------------------------------------------------------

    @abc.abstractmethod
    def ema_layout(self) -> EMALayout:
        """Where each rank's piece of each parameter lives, for every shadow of the weights (the
        contract is sd_train.ema.contracts.EMALayout)."""

    # ---- Langevin noise (sd_train.langevin) ------------------------------------------------------

    @abc.abstractmethod
    def noise_pieces(self) -> list[NoisePiece]:
        """This rank's piece of every trainable parameter that the optimizer steps (the fp32
        master where the optimizer keeps one), with its offset in the flattened parameter."""

    def after_noise(self) -> None:  # noqa: B027 (nothing to do where the pieces are the weights)
        """Refresh whatever the forward reads from the pieces `noise_pieces` gave, after noise
        was added to them (DeepSpeed's bf16 partitions, ZeRO-2's master fragments)."""

    # ---- checkpoints --------------------------------------------------------------------------------

    @abc.abstractmethod
    def save(self, folder: Path, shadows: dict[str, Shadow], process_group=None) -> Optional[AsyncSave]:
        """Write this rank's model, optimizer and shadow tensors into `folder` (collective).
        `shadows` maps a checkpoint key to a shadow of the weights: "ema" always, "posthoc" when
        post-hoc EMA is on. With a `process_group` (async saves), stage and write in the
        background and return the futures of both."""

    def close(self) -> None:  # noqa: B027 (only strategies that keep save buffers hold anything)
        """Release what saving keeps for the whole run (the async staging buffers)."""

    def missing_files(self, folder: Path) -> Optional[str]:
        """What this rank would read from `folder` and cannot find, checked before any collective."""
        return None

    @abc.abstractmethod
    def load(self, folder: Path, shadows: dict[str, Shadow]) -> None:
        """Load the tensors of `folder` (collective). Every shadow's `load_meta_state_dict` has
        run, so the shadows exist to receive their pieces. Raises on any failure."""

    def load_model_and_optimizer(self, folder: Path) -> None:
        """Load only the UNet weights and the optimizer state of `folder` (collective): the start of
        a new run from another run's checkpoint (`checkpoint.init_from`)."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot start from another run's checkpoint (checkpoint.init_from); export that "
            "checkpoint and use model.pretrained_path"
        )

    def describe_load_error(self, folder: Path, error: BaseException) -> str:
        """A one-line account of a failed `load`, naming the broken file where possible."""
        return f"{type(error).__name__}: {str(error)[:300]}"

    # ---- export and topology ------------------------------------------------------------------------

    @abc.abstractmethod
    def topology(self) -> dict:
        """This rank's layout: local parameter bytes, placements, whether all are DTensors."""
