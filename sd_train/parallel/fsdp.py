"""FSDP2 (or DDP) data parallelism, with checkpoints through torch.distributed.checkpoint (DCP).

We apply FSDP2 (`fully_shard`) ourselves instead of through `Accelerator.prepare`: accelerate
enables FSDP only for GPU setups and silently runs unsharded on CPU, so going through it would make
the CPU tests exercise a different path than the GPU runs. Which submodules become FSDP units is
the model's business (sd_train.model.parallelize); this module only applies the wrapping.

Under FSDP2 every parameter is a DTensor sharded `Shard(0)` over the 1-D mesh; the EMA keeps one
plain tensor per local shard (`DTensorLayout`), and DCP writes one file per rank that reloads on any
world size, or in one process with no process group.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.nn.parallel import DistributedDataParallel

from sd_train import dcp_io
from sd_train.config import DistArgs, PerfArgs
from sd_train.host_sync import read_floats
from sd_train.langevin import NoisePiece
from sd_train.optim import clip_grad_norm_, local_shard
from sd_train.parallel.process_group import DistInfo
from sd_train.parallel.strategy import AsyncSave, OptimizerFactory, Strategy
from sd_train.perf import compile_module

# `auto` is resolved by sd_train.preflight for a run; a bare DistArgs (benches, tests) means fp32.
DTYPES = {"auto": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16}

log = logging.getLogger(__name__)


def _channels_last_input(module: torch.nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of `perf.channels_last`: the latents enter in channels_last, and the
    convolutions keep that layout (FSDP2 gathers weights contiguous, so the input decides)."""
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


class DTensorLayout:
    """Where a rank's piece of each parameter lives under FSDP2 (`p.to_local()`) or DDP (`p`),
    and how to label or gather the EMA of that piece. DeepSpeed's layouts are in
    sd_train.parallel.deepspeed."""

    # `DTensor.to_local()` per parameter per update costs more than the lerp itself on small
    # models, so the views are looked up once per window. The optimizer updates the sharded
    # storage in place, so they stay current (tests/e2e/test_distributed checks it).
    cache_views = True
    name = "dtensor"

    def __init__(self, model: torch.nn.Module | None = None):
        self.model = model

    def views(self, named_params: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
        return [local_shard(p).detach() for _, p in named_params]

    forward_views = views  # the EMA reads the shards the forward gathers

    def release(self) -> None:
        """Drop every parameter FSDP2 still holds gathered, so the next forward gathers from the
        sharded storage. The root is wrapped with `reshard_after_forward=False` and reshards only
        after a backward: after a `no_grad` forward its unsharded conv_in, time embedding and
        conv_out stay registered, and a forward right after an EMA swap would use those raw
        weights (measured on 2 ranks: off by 5.5 against a plain module holding the EMA, where raw
        and EMA differ by 8.4; 0.0 after resharding)."""
        if self.model is None:
            return
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def global_tensor(self, p: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
        """The shard labelled as the global tensor it is a piece of, for DCP. The global shape and
        stride are passed because FSDP2 pads uneven shards."""
        if isinstance(p, DTensor):
            return DTensor.from_local(
                shard, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False
            )
        return shard

    def full(self, p: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
        """The whole tensor (a collective for sharded params)."""
        t = self.global_tensor(p, shard)
        return t.full_tensor() if isinstance(t, DTensor) else t

    def stored_shapes(self, named_params) -> dict[str, list[int]]:
        """`global_tensor` keeps every parameter's own shape: nothing to record."""
        return {}


class FSDPStrategy(Strategy):
    """FSDP2 on each unit the model names and then the root (`dist.strategy=fsdp2`), or DDP
    (`ddp`); gradients clipped to the global norm; DCP checkpoints."""

    checkpoint_format = "dcp"
    writes_completion_marker = True  # DCP's coordinator writes .metadata after every rank's shards
    supports_async_save = True

    def __init__(
        self,
        args: DistArgs,
        info: DistInfo,
        max_grad_norm: float,
        units: Callable[[torch.nn.Module], list[torch.nn.Module]],
        perf: Optional[PerfArgs] = None,
        layers: Callable[[torch.nn.Module], list[torch.nn.Module]] = lambda unit: [],
    ):
        self.args = args
        self.perf = perf or PerfArgs()
        self.info = info
        self.name = "ddp" if args.strategy == "ddp" else "fsdp2"
        self.max_grad_norm = max_grad_norm
        self.units = units  # the model's FSDP units (blocks), in forward order
        self.layers = layers  # the finer units inside one of them (dist.fsdp_units=layers)
        self._stager: Optional[DefaultStager] = None  # async saves: one for the run, see _async_stager
        self._noise_pieces: Optional[list[NoisePiece]] = None  # views of the sharded storage: stable

    def wrap(self, unet: torch.nn.Module, make_optimizer: OptimizerFactory) -> None:
        self.model = self.wrap_model(unet)
        self.optimizer = make_optimizer(self.model)
        self.skip_on_device = skips_on_device(self.optimizer)
        """Fused Adam(W): the non-finite skip is decided by the kernel from a device flag (see step)."""

    def wrap_model(self, unet: torch.nn.Module) -> torch.nn.Module:
        """DDP, or FSDP2 on each unit and then the root; returns the model the loop calls.
        `perf.compile` compiles each unit first, so that FSDP2's hooks (registered by
        `fully_shard` afterwards) stay outside the compiled graphs."""
        if self.perf.channels_last:
            if self.name == "ddp":  # FSDP2 refuses non-contiguous parameters; there the input decides
                unet.to(memory_format=torch.channels_last)
            unet.register_forward_pre_hook(_channels_last_input)
        if self.perf.compile:
            for unit in self.units(unet):
                compile_module(unit, self.perf.compile_backend)
        if self.name == "ddp":
            device_ids = [self.info.device.index] if self.info.device.type == "cuda" else None
            return DistributedDataParallel(unet, device_ids=device_ids)
        mp = MixedPrecisionPolicy(
            param_dtype=DTYPES[self.args.param_dtype], reduce_dtype=DTYPES[self.args.reduce_dtype]
        )
        forward_order: list[torch.nn.Module] = []  # the units, in the order forward gathers them
        for unit in self.units(unet):
            inner = self.layers(unit) if self.args.fsdp_units == "layers" else []
            for layer in inner:  # children first: a parent's unit then holds only what is left
                fully_shard(
                    layer, mesh=self.info.mesh, reshard_after_forward=self.args.reshard_after_forward, mp_policy=mp
                )
            fully_shard(unit, mesh=self.info.mesh, reshard_after_forward=self.args.reshard_after_forward, mp_policy=mp)
            forward_order += [unit, *inner]
        # The root's params are needed again right at the start of backward: keep them gathered.
        fully_shard(unet, mesh=self.info.mesh, reshard_after_forward=False, mp_policy=mp)
        if self.args.prefetch > 0:
            k = self.args.prefetch
            for i, unit in enumerate(forward_order):
                unit.set_modules_to_forward_prefetch(forward_order[i + 1 : i + 1 + k])
                unit.set_modules_to_backward_prefetch(forward_order[max(0, i - k) : i][::-1])
        self.num_units = len(forward_order)
        return unet

    @property
    def module(self) -> torch.nn.Module:
        """DDP wraps the UNet in `.module`; FSDP2 keeps the module, with a new class."""
        return getattr(self.model, "module", self.model)

    # ---- one optimizer step ---------------------------------------------------------------------

    def set_grad_sync(self, enabled: bool) -> None:
        if isinstance(self.model, FSDPModule):
            self.model.set_requires_gradient_sync(enabled)
        else:  # DDP reads it in forward
            self.model.require_backward_grad_sync = enabled

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        loss.backward()

    def step(self, also_read: Sequence[torch.Tensor] = ()) -> tuple[bool, float, list[float]]:
        """Clip to the global norm, and step only if it is finite. A NaN anywhere reaches every
        rank's norm through the gradient reduction, so all ranks skip together. Reading the norm
        is the step's one host sync; `also_read` rides along in the same transfer.

        With fused Adam(W) the update is queued before that read: the kernel takes `found_inf`
        (1.0 when the norm is not finite, computed on the device) and then leaves parameters,
        moments and step counts as they were, so no host round trip stands between the backward
        and the optimizer kernels. The read still tells the loop whether the step counted."""
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        grad_norm = clip_grad_norm_(self.model.parameters(), max_norm)
        if self.skip_on_device:
            self.optimizer.found_inf = (~torch.isfinite(grad_norm)).to(torch.float32)
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
            grad_norm, *extra = read_floats([grad_norm, *also_read])
            return math.isfinite(grad_norm), grad_norm, extra
        grad_norm, *extra = read_floats([grad_norm, *also_read])
        finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        return finite, grad_norm, extra

    def ema_layout(self) -> DTensorLayout:
        return DTensorLayout(self.module)

    def noise_pieces(self) -> list[NoisePiece]:
        """Each parameter's local shard (the weights AdamW steps: FSDP2 keeps them fp32 whatever the
        compute dtype), keyed by its global offset. Looked up once: the optimizer updates the
        sharded storage in place."""
        if self._noise_pieces is None:
            self._noise_pieces = [
                dtensor_noise_piece(n, p) for n, p in self.module.named_parameters() if p.requires_grad
            ]
        return self._noise_pieces

    # ---- checkpoints ----------------------------------------------------------------------------

    def _tensor_state(self, shadows: dict) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd, **{k: s.tensor_state_dict() for k, s in shadows.items()}}

    def _async_stager(self) -> DefaultStager:
        """The stager of every async save of the run. It keeps one CPU buffer per tensor storage it
        has copied (keyed by the live storage), so from the second save on staging is a copy into
        buffers that already exist: pinned on CUDA, written from a side stream without blocking
        the compute stream. Pinned memory and non-blocking copies need CUDA; on CPU the buffers are
        ordinary (pageable) memory, still kept for the run. Staging runs in a background thread
        either way; the loop waits for it only before the next optimizer step (the Checkpointer)."""
        if self._stager is None:
            cuda = self.info.device.type == "cuda"
            options = StagingOptions(
                use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=True, use_non_blocking_copy=cuda
            )
            self._stager = DefaultStager(options)
            kind = "pinned" if cuda else "pageable (CPU run: pinned memory needs CUDA)"
            log.info(f"async checkpoints: staging in the background into {kind} CPU buffers kept for the run")
        return self._stager

    def save(
        self, folder: Path, shadows: dict, process_group=None, on_written: Optional[Callable[[], None]] = None
    ) -> Optional[AsyncSave]:
        state = self._tensor_state(shadows)
        storage_writer = dcp_io.writer(folder, on_written)
        if process_group is None:
            dcp.save(state, checkpoint_id=str(folder), storage_writer=storage_writer)
            return None
        stager = self._async_stager()
        if self.info.device.type == "cuda":
            # The staging copies run on their own stream, which does not wait for this one: let the
            # optimizer and EMA kernels still queued here finish first (a saving step may sync).
            torch.cuda.current_stream(self.info.device).synchronize()
        response = dcp.async_save(
            state,
            checkpoint_id=str(folder),
            storage_writer=storage_writer,
            process_group=process_group,
            async_stager=stager,
        )
        return AsyncSave(staged=response.staging_completion, written=response.upload_completion)

    def close(self) -> None:
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def load(self, folder: Path, shadows: dict) -> None:
        state = self._tensor_state(shadows)
        dcp_io.load(state, folder)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def load_model_and_optimizer(self, folder: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp_io.load(state, folder)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def describe_load_error(self, folder: Path, error: BaseException) -> str:
        return describe_dcp_load_error(folder, error)

    # ---- export and topology ----------------------------------------------------------------------

    def topology(self) -> dict:
        params = [p for _, p in self.module.named_parameters()]
        return {
            "local_param_bytes": sum(local_shard(p).numel() * p.element_size() for p in params),
            "placements": sorted({str(p.placements) if isinstance(p, DTensor) else "replicated" for p in params}),
            "all_dtensor": all(isinstance(p, DTensor) for p in params),
            "fsdp_units": getattr(self, "num_units", 0),  # wrapped below the root (0: DDP)
        }


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` skips a step itself when handed `found_inf`: torch's fused Adam and
    AdamW read it (the attribute GradScaler sets); foreach kernels and SGD do not."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and all(
        g.get("fused") for g in optimizer.param_groups
    )


def describe_dcp_load_error(folder: Path, error: BaseException) -> str:
    """DCP's errors do not always name the file; find shard files that are shorter than the
    metadata says, so the warning points at the culprit. A CheckpointException is told by the
    errors it wraps (its own text is their tracebacks)."""
    if isinstance(error, CheckpointException):
        text = "; ".join(f"rank {r}: {type(e).__name__}: {e}" for r, (e, _) in sorted(error.failures.items()))[:300]
    else:
        text = f"{type(error).__name__}: {str(error)[:300]}"
    try:
        md = dcp_io.read_metadata(folder)
        need: dict[str, int] = {}
        for item in (md.storage_data or {}).values():
            name = item.relative_path
            need[name] = max(need.get(name, 0), item.offset + item.length)
        short = [n for n, size in need.items() if not (folder / n).is_file() or (folder / n).stat().st_size < size]
        if short:
            return f"truncated or missing shard file(s) {[str(folder / n) for n in sorted(short)]} ({text})"
    except Exception as e:  # noqa: BLE001 -- the metadata itself is unreadable or refused: the cause
        return f"{folder / '.metadata'} unreadable: {type(e).__name__}: {str(e)[:300]}"
    return text


def dtensor_noise_piece(name: str, p: torch.Tensor) -> NoisePiece:
    """A parameter's local piece and where it starts in the flattened parameter: 0 for a plain
    (DDP) tensor; for a DTensor sharded on dim 0 (FSDP2, HSDP's shard dim; replicas get the same
    offset) the first local row times the row length, from torch's own shard arithmetic (FSDP2
    shards unevenly, torch.chunk-style)."""
    local = local_shard(p).detach()
    if not isinstance(p, DTensor):
        return NoisePiece(name, p.numel(), 0, local)
    if any(not (pl.is_replicate() or (isinstance(pl, Shard) and pl.dim == 0)) for pl in p.placements):
        raise NotImplementedError(
            f"optim.langevin: parameter {name} is placed {p.placements}; the noise follows Shard(0) and Replicate only"
        )
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    row = math.prod(p.shape[1:])
    return NoisePiece(name, p.numel(), offset[0] * row if p.dim() else 0, local)
