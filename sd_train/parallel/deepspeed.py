"""DeepSpeed ZeRO-2 / ZeRO-3 through accelerate's DeepSpeed plugin: the alternative to FSDP2.

`dist.strategy=deepspeed` (or `auto` under `accelerate launch --config_file
launch/accelerate/zero3.yaml`). The sd-train config is the one source of the DeepSpeed settings:
`deepspeed_config()` derives batch sizes, accumulation and clipping from it, and
`DeepSpeedStrategy.wrap` hands that dict to `accelerate.DeepSpeedPlugin`. Unlike FSDP, accelerate's
DeepSpeed path does run on CPU (over gloo), so CI exercises the same engine the GPU runs use.

What ZeRO partitions, and where the EMA lives:
- ZeRO-3: every parameter is a 1-D partition `p.ds_tensor` of ceil(numel / world) elements per
  rank (the last rank's padded). The EMA keeps one fp32 piece per partition and lerps it against
  `p.ds_tensor`: no gather, no collective. Small parameters (DeepSpeed's
  `stage3_param_persistence_threshold`, 1e5 elements by default) stay gathered between forwards, so
  their full copy would hide a swap into the partitions: `Zero3Layout.release` partitions them
  (local, no communication) on the way in and out of the EMA swap, and the next forward gathers them
  again from the partitions it sees. Evaluation with the EMA swapped in then sees the EMA in every
  layer, as FSDP2's reshard does for its root.
- ZeRO-3 in DeepSpeed's bf16 mode (`dist.param_dtype=bf16`, the `auto` choice with
  mixed_precision=bf16): `p.ds_tensor` is bf16 and the optimizer holds the fp32 master partition
  of the same ceil(numel / world) elements. The EMA lerps against the fp32 master
  (`Zero3Layout.views`); its swap for evaluation rounds into `p.ds_tensor` (`forward_views`), and
  export gathers the fp32 master. ZeRO-2 refuses bf16 mode (sd_train.preflight says why).
- ZeRO-2: gradients and optimizer state are partitioned, parameters are replicated. DeepSpeed's
  optimizer partition is a slice of one flat buffer per parameter group that cuts through
  parameters, so an EMA following it would depend on DeepSpeed's internal buffer layout. We keep
  the EMA replicated instead (every rank computes the same lerp): no communication, and the memory
  of one fp32 copy of the UNet per rank. docs/parallelism.md says so.
The post-hoc EMA profiles (sd_train.ema.posthoc) use the same layouts: per partition under ZeRO-3,
replicated under ZeRO-2.

Checkpoints: DeepSpeed's own per-rank files under `<step>/zero/` (model and optimizer partitions,
readable by DeepSpeed's zero_to_fp32), plus one `<key>_rank_R.pt` per shadow with this rank's
pieces: `ema_rank_R.pt` (the EMA), `posthoc_rank_R.pt` (the post-hoc profiles, when on). They
resume on the same world size; a different one is refused with the way out (export, then start a
new run from the export). Post-hoc snapshots are not checkpoints: they go through DCP (the
layouts' `global_tensor`), so `sd-train posthoc` reads them in one process.
"""

from __future__ import annotations

import datetime
import glob
import importlib
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from sd_train.config import TrainConfig
from sd_train.host_sync import read_floats
from sd_train.langevin import NoisePiece
from sd_train.parallel.process_group import DistInfo
from sd_train.parallel.strategy import AsyncSave, OptimizerFactory, Strategy

ZERO_DIR = "zero"  # DeepSpeed's checkpoint "tag": the folder inside a step folder


def shadow_file(folder: Path, key: str, rank: int) -> Path:
    """This rank's pieces of the shadow checkpointed under `key` ("ema", "posthoc")."""
    return Path(folder) / f"{key}_rank_{rank}.pt"


def deepspeed_config(cfg: TrainConfig, world_size: int, accum: int) -> dict:
    """The DeepSpeed config, all derived from the sd-train config (none of it is 'auto')."""
    zero: dict = {"stage": cfg.dist.zero_stage}
    d = cfg.dist
    knobs = {
        "overlap_comm": d.zero_overlap_comm,
        "reduce_bucket_size": d.zero_reduce_bucket_size,
        "allgather_bucket_size": d.zero_allgather_bucket_size,
        "stage3_prefetch_bucket_size": d.zero_prefetch_bucket_size,
        "stage3_param_persistence_threshold": d.zero_param_persistence_threshold,
    }
    zero.update({k: v for k, v in knobs.items() if v is not None})  # unset: DeepSpeed's own defaults
    return {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.max_grad_norm,  # 0 disables, as in our config
        "zero_optimization": zero,
        # `dist.param_dtype=bf16` (preflight: ZeRO-3 only; `auto` with mixed_precision=bf16) is
        # DeepSpeed's bf16 mode: bf16 partitions, which the forward gathers (half the all-gather
        # bytes), and fp32 master partitions in the optimizer, which the EMA reads. Otherwise params
        # and master stay fp32 and `mixed_precision=bf16` autocasts the forward.
        "bf16": {"enabled": cfg.dist.param_dtype == "bf16"},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,  # torch SGD (optim.name=sgd) is not on its list
        "steps_per_print": 2**31 - 1,  # our metrics component logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


def _prepare_environment(info: DistInfo) -> None:
    # DeepSpeed 0.19 calls torch.distributed.all_gather_into_tensor / reduce_scatter_tensor, which
    # torch 2.13 marks deprecated: two warnings per rank per step otherwise.
    warnings.filterwarnings(
        "ignore", message=r".*is deprecated\. Please use `torch\.distributed\.", category=FutureWarning
    )
    # On CPU DeepSpeed's first init_distributed compiles a shared-memory op with g++/ninja (50-70 s,
    # or a failure without a compiler). We run over gloo and never use it. The module must be
    # fetched with import_module: `import deepspeed.comm.torch as m` binds the torch package.
    if info.device.type == "cpu":
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    # `accelerate launch` with a DeepSpeed config exports these; accelerate then refuses a config
    # dict ("variables will be ignored"). config.validate already checked they agree with ours.
    for k in list(os.environ):
        if k.startswith("ACCELERATE_DEEPSPEED_") or k in (
            "ACCELERATE_CONFIG_DS_FIELDS",
            "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
            "ACCELERATE_GRADIENT_CLIPPING",
        ):
            os.environ.pop(k)


class DeepSpeedStrategy(Strategy):
    """Owns the DeepSpeed engine: wrap, backward/step, checkpoint I/O, gathers for export."""

    name = "deepspeed"
    checkpoint_format = "zero"
    # DeepSpeed's per-rank files carry no index written after the others: the checkpointer holds a
    # barrier before renaming the folder, so every rank's files are on disk first.
    writes_completion_marker = False

    def __init__(self, cfg: TrainConfig, info: DistInfo, accum: int):
        self.stage = int(cfg.dist.zero_stage)
        self.bf16 = cfg.dist.param_dtype == "bf16"
        self.info = info
        self.timeout_s = cfg.dist.timeout_s
        self.config = deepspeed_config(cfg, info.world_size, accum)

    def wrap(self, unet: torch.nn.Module, make_optimizer: OptimizerFactory) -> None:
        _prepare_environment(self.info)
        # Lazy: deepspeed (through accelerate's plugin) is heavy and only this strategy needs it.
        from accelerate import Accelerator, DeepSpeedPlugin
        from accelerate.utils import InitProcessGroupKwargs
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        optimizer = make_optimizer(unet)
        # The process group already exists (sd_train.parallel.process_group); the kwargs make
        # accelerate agree on its backend: without them, on CPU it believes there is one process.
        pg = InitProcessGroupKwargs(backend=dist.get_backend(), timeout=datetime.timedelta(seconds=self.timeout_s))
        self.accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=self.config), kwargs_handlers=[pg])
        self.engine, _ = self.accelerator.prepare(unet, optimizer)
        self.model = self.engine
        # accelerate registers the ZeRO-3 config with transformers, which then builds every later
        # `from_pretrained` model under deepspeed.zero.Init: a collective. Export loads the frozen
        # parts on the main process only, and hung there waiting for the other ranks (seen). The
        # engine no longer needs the registration once prepared.
        unset_hf_deepspeed_config()
        # The LR schedule drives the torch optimizer DeepSpeed wraps: its param_groups now hold
        # this rank's fp32 partitions, and DeepSpeed steps it with their `lr`.
        self.optimizer = optimizer

    def ema_layout(self):
        if self.stage != 3:
            return ReplicatedLayout()
        return Zero3Layout(list(self.module.parameters()), fp32_master=self.bf16)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    # ---- one optimizer step ----------------------------------------------------------------------

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        """Backward of one micro-batch. The loss is already divided by the accumulation count."""
        self.engine.backward(loss, scale_wrt_gas=False)
        if not last_micro:
            # DeepSpeed counts micro-steps in step(); off the accumulation boundary that is all
            # it does, and the gradient reduction waits for the boundary's backward.
            self.engine.step()

    def step(self, also_read: Sequence[torch.Tensor] = ()) -> tuple[bool, float, list[float]]:
        """The optimizer step at the accumulation boundary: (taken, global grad norm). DeepSpeed
        checks the reduced gradients of every rank and skips a non-finite step on all of them;
        we read its decision from its skip counter, so every rank agrees with no extra collective."""
        skipped = self.engine.skipped_steps
        self.engine.step()
        taken = self.engine.skipped_steps == skipped
        norm = self.engine.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        # DeepSpeed reads its overflow flag and the norm on the host inside engine.step(); ours
        # come on top, in one read.
        extra = read_floats(list(also_read)) if also_read else []
        return taken, (norm if taken else float("inf")), extra

    # ---- Langevin noise ---------------------------------------------------------------------------

    def noise_pieces(self) -> list[NoisePiece]:
        """ZeRO-3: each parameter's fp32 master partition in the optimizer (the values DeepSpeed's
        step updates and then copies into `p.ds_tensor`; in fp32 mode the same storage), at offset
        rank * ceil(numel / world) of the flattened parameter, padding left out. ZeRO-2: the
        replicated parameters, whole on every rank like DDP (`after_noise` then copies each rank's
        slice into its fp32 master fragment): the forward reads the replicas, so every rank needs all
        of their noise, and generating it costs less than the all-gather that would spread it."""
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        if self.stage != 3:
            return [NoisePiece(n, p.numel(), 0, p.detach()) for n, p in named]
        from deepspeed.utils import safe_get_local_fp32_param  # lazy: only DeepSpeed runs get here

        world, rank = dist.get_world_size(), dist.get_rank()
        pieces = []
        for n, p in named:
            numel = int(p.ds_numel)
            per_rank = math.ceil(numel / world)
            valid = max(0, min(per_rank, numel - rank * per_rank))
            master = safe_get_local_fp32_param(p).view(-1)
            pieces.append(NoisePiece(n, numel, rank * per_rank, master[:valid]))
        return pieces

    def after_noise(self) -> None:
        """Make what the forward reads agree with the noisy master weights, as DeepSpeed's own step
        does after its update. ZeRO-3: copy each master partition into `p.ds_tensor` where they are
        different storage (bf16 mode: the copy rounds), then partition the parameters DeepSpeed keeps
        gathered (`Zero3Layout.release`), so the next forward gathers the new values. ZeRO-2: copy
        each rank's slice of the noisy replica into its fp32 master fragment (`_hp_mapping`, which
        DeepSpeed links for every parameter with a fragment on this rank), or the next step would
        start from the noise-free master and overwrite the replicas with it."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        with torch.no_grad():
            if self.stage == 3:
                from deepspeed.utils import safe_get_local_fp32_param  # lazy: only DeepSpeed runs get here

                for p in params:
                    master = safe_get_local_fp32_param(p)
                    if master.data_ptr() != p.ds_tensor.data_ptr():
                        p.ds_tensor.copy_(master.view_as(p.ds_tensor))
                Zero3Layout(params).release()
                return
            for p in params:
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is None:
                    continue
                address = mapping.lp_fragment_address
                mapping.hp_fragment.copy_(p.detach().reshape(-1).narrow(0, address.start, address.numel))

    # ---- checkpoints ----------------------------------------------------------------------------

    def save(self, folder: Path, shadows: dict, process_group=None) -> Optional[AsyncSave]:
        """Collective: DeepSpeed writes every rank's partitions under `folder/zero/`, then each rank
        its pieces of every shadow (`shadow_file`). Always synchronous (config validation refuses
        checkpoint.async_save with DeepSpeed)."""
        self.engine.save_checkpoint(str(folder), tag=ZERO_DIR, save_latest=False)
        for key, shadow in shadows.items():
            torch.save(self._shadow_payload(shadow), shadow_file(folder, key, self.info.rank))
        return None

    def _shadow_payload(self, shadow) -> dict:
        """The pieces of a ShardedEMA-like shadow (`local_state_dict`), with what `offline_state`
        needs to reassemble them: the stage, the world size and every parameter's full shape."""
        shapes = {n: list(p.ds_shape if self.stage == 3 else p.shape) for n, p in shadow.named_params}
        return {
            "zero_stage": self.stage,
            "world_size": self.info.world_size,
            "shapes": shapes,
            "pieces": shadow.local_state_dict(),
        }

    def missing_files(self, folder: Path) -> Optional[str]:
        rank = self.info.rank
        # Every shadow rank 0 wrote (the EMA always, the post-hoc profiles when on), for this rank.
        keys = {"ema"} | {f.name[: -len("_rank_0.pt")] for f in Path(folder).glob("*_rank_0.pt")}
        need = [shadow_file(folder, key, rank) for key in sorted(keys)]
        # bf16 mode prefixes the optimizer files with `bf16_`.
        pattern = f"*zero_pp_rank_{rank}_mp_rank_*_optim_states.pt"
        if not glob.glob(str(Path(folder) / ZERO_DIR / pattern)):
            return f"no {ZERO_DIR}/{pattern}"
        missing = [str(p) for p in need if not p.is_file() or p.stat().st_size == 0]
        return f"missing or empty {missing}" if missing else None

    def load(self, folder: Path, shadows: dict) -> None:
        path, _ = self.engine.load_checkpoint(
            str(folder),
            tag=ZERO_DIR,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
            load_module_strict=True,
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {folder / ZERO_DIR}")
        for key, shadow in shadows.items():
            payload = torch.load(shadow_file(folder, key, self.info.rank), weights_only=False)
            shadow.load_local_state_dict(payload["pieces"])

    # ---- export and topology ----------------------------------------------------------------------

    def topology(self) -> dict:
        params = list(self.module.parameters())
        if self.stage == 3:
            local = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params)
            placement = "zero3-partition"
        else:
            local = sum(p.numel() * p.element_size() for p in params)
            placement = "replicated (zero2: grads and optimizer state partitioned)"
        return {
            "local_param_bytes": local,
            "placements": [placement],
            "all_dtensor": False,
            "zero_stage": self.stage,
            # bf16 in DeepSpeed's bf16 mode (the fp32 master partitions are in the optimizer).
            "param_dtype": str(params[0].dtype).removeprefix("torch.") if params else None,
        }


class Zero3Layout:
    """ShardedEMA layout under ZeRO-3: this rank's piece of each parameter is `p.ds_tensor`, or in
    bf16 mode (`fp32_master`) the fp32 master partition of it in the optimizer, which is what the
    optimizer steps; `p.ds_tensor` is its bf16 rounding. Both have ceil(numel / world) elements, so
    everything below holds for either. The EMA swap still writes into `p.ds_tensor`
    (`forward_views`): that is what the forward gathers."""

    # Re-read each update: DeepSpeed may re-point `ds_tensor.data` (defragmentation, offload);
    # an attribute read per parameter is far cheaper than the lerp on any real UNet.
    cache_views = False
    name = "zero3"

    def __init__(self, params: Sequence[torch.nn.Parameter] = (), fp32_master: bool = False):
        self._meshes: dict[str, DeviceMesh] = {}
        # DeepSpeed marks them at engine creation (`ds_persist`) and keeps them gathered.
        self.persisted = [p for p in params if getattr(p, "ds_persist", False)]
        self.fp32_master = fp32_master

    def release(self) -> None:
        """Partition the persisted parameters: drop their gathered copy and keep the partition
        (`ds_tensor`), with no communication, as DeepSpeed itself does before it rewrites partitions
        on a checkpoint load. The next forward fetches them again from whatever the partitions then
        hold (the EMA inside a swap, the raw weights after it) and keeps them gathered again."""
        if self.persisted:
            self.persisted[0].partition(self.persisted)

    def views(self, named_params) -> list[torch.Tensor]:
        """The pieces the EMA reads: the fp32 master partitions in bf16 mode (DeepSpeed's documented
        `safe_get_local_fp32_param`: a narrow of the optimizer's flat fp32 partition, no copy
        unless the optimizer is offloaded), else the partitions themselves."""
        if not self.fp32_master:
            return [p.ds_tensor for _, p in named_params]
        from deepspeed.utils import safe_get_local_fp32_param  # lazy: only DeepSpeed runs get here

        return [safe_get_local_fp32_param(p) for _, p in named_params]

    def forward_views(self, named_params) -> list[torch.Tensor]:
        """The pieces the forward gathers, which an EMA swap overwrites: the (bf16) partitions."""
        return [p.ds_tensor for _, p in named_params]

    def global_tensor(self, p, shard):
        """The piece labelled, for DCP, as its part of the *flattened* parameter: a 1-D DTensor of
        `p.ds_numel` elements, Shard(0) over the world. ZeRO-3 gives rank r the elements
        [r c, (r + 1) c) of the flat parameter, c = ceil(numel / world), the last ranks padded;
        Shard(0) splits a dimension the same way (torch.chunk), so the piece minus its padding is
        exactly the local shard. `stored_shapes` gives the shape to view the stored tensor as.
        Checkpoints do not use this (they keep DeepSpeed's per-rank files); post-hoc snapshots do."""
        world, rank = dist.get_world_size(), dist.get_rank()
        numel = int(p.ds_numel)
        if shard.dim() != 1 or shard.numel() != math.ceil(numel / world):
            raise RuntimeError(
                f"ZeRO-3 partition of a {tuple(p.ds_shape)} parameter has shape {tuple(shard.shape)} on rank "
                f"{rank}, expected ({math.ceil(numel / world)},): a DeepSpeed partitioning sd-train does not describe"
            )
        valid = max(0, min(shard.numel(), numel - rank * shard.numel()))
        mesh = self._mesh(shard.device.type)
        return DTensor.from_local(shard[:valid], mesh, [Shard(0)], shape=(numel,), stride=(1,), run_check=False)

    def _mesh(self, device_type: str) -> DeviceMesh:
        # Over the default group (no new group, no collective): the world DeepSpeed partitions over.
        if device_type not in self._meshes:
            self._meshes[device_type] = DeviceMesh.from_group(dist.group.WORLD, device_type)
        return self._meshes[device_type]

    def stored_shapes(self, named_params) -> dict[str, list[int]]:
        """`global_tensor` stores each parameter flattened: the shapes to view them as."""
        return {n: list(p.ds_shape) for n, p in named_params}

    def full(self, p: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
        """All-gather the equal-size pieces, drop the padding, restore the shape. Collective."""
        pieces = [torch.empty_like(shard) for _ in range(dist.get_world_size())]
        dist.all_gather(pieces, shard.contiguous())
        return torch.cat(pieces)[: p.ds_numel].view(p.ds_shape)


class ReplicatedLayout:
    """ShardedEMA layout under ZeRO-2: parameters are replicated, so is the EMA."""

    cache_views = False  # DeepSpeed points params into its flat buffers; re-read, never cache
    name = "replicated"

    def release(self) -> None:
        """Replicated params are the weights the forward reads: nothing to release."""

    def views(self, named_params) -> list[torch.Tensor]:
        return [p.detach() for _, p in named_params]

    forward_views = views  # the EMA reads the weights the forward reads

    def global_tensor(self, p, shard):
        """The full tensor, replicated on every rank: DCP writes one copy (its planner spreads the
        replicated tensors over the ranks). Post-hoc snapshots only; checkpoints keep per-rank files."""
        return shard

    def stored_shapes(self, named_params) -> dict[str, list[int]]:
        """Stored with their own shapes: nothing to record."""
        return {}

    def full(self, p: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
        return shard


def offline_state(checkpoint: Path, weights: str) -> dict[str, torch.Tensor]:
    """A UNet's full weights from a DeepSpeed step folder, in one process with no process group:
    `raw` through DeepSpeed's zero_to_fp32 (the fp32 master partitions), `ema` by concatenating the
    ranks' EMA pieces."""
    checkpoint = Path(checkpoint)
    if weights == "raw":
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=ZERO_DIR))
    return offline_shadow(checkpoint, "ema")


def offline_shadow(checkpoint: Path, key: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """The full tensors of the shadow checkpointed under `key` (`shadow_file`), in one process with
    no process group: the pieces named `prefix + parameter name` (the post-hoc profile i has
    prefix `p<i>.`), concatenated over the ranks under ZeRO-3, rank 0's under ZeRO-2."""
    checkpoint = Path(checkpoint)
    files = sorted(checkpoint.glob(f"{key}_rank_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not files:
        raise FileNotFoundError(f"{checkpoint}: no {key}_rank_*.pt files")
    payloads = [torch.load(f, weights_only=False) for f in files]
    first = payloads[0]
    if len(payloads) != first["world_size"]:
        raise FileNotFoundError(
            f"{checkpoint}: {len(payloads)} {key}_rank_*.pt files for a world size of {first['world_size']}"
        )
    out = {}
    for name, shape in first["shapes"].items():
        if first["zero_stage"] != 3:
            out[name] = first["pieces"][prefix + name].view(shape)  # replicated: rank 0 has it all
            continue
        numel = int(torch.Size(shape).numel())
        out[name] = torch.cat([pl["pieces"][prefix + name] for pl in payloads])[:numel].view(shape)
    return out
