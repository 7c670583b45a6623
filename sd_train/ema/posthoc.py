"""Sharded power-function EMA profiles for post-hoc EMA (EDM2), and their snapshots.

Each profile is a shadow exactly like ShardedEMA's: every rank keeps the profile of its own local
shard of each parameter (the same `Strategy.ema_layout()`), and an update is one
`torch._foreach_lerp_` per profile with no collective. Nothing is allocated before the profiles'
start step.

Convention: t counts the steps from the profiles' start, t = 1 at the start step itself, where
beta_1 = 0 makes each profile a copy of the weights; at step s > start, t = s - start + 1 and
beta_t = (1 - 1/t)^(gamma + 1) (sd_train.ema.posthoc_math has the closed form of the result).

Where the profiles live follows the strategy's EMA layout: FSDP2 shards (DDP replicas), ZeRO-3
partitions (`p.ds_tensor`, one fp32 piece per partition), ZeRO-2 replicas (every rank the whole
profile, as it keeps the EMA). Checkpoints carry the live profiles through the strategy, like
ShardedEMA's: DCP key `posthoc` (FSDP2/DDP), `posthoc_rank_R.pt` (DeepSpeed).

Snapshots: `<output_dir>/posthoc/step_XXXXXXXX/`, one DCP save in which each rank writes its piece
of every profile (stored in `ema.posthoc.dtype`), plus `snapshot.json` (step, start, sigma_rels,
gammas) and each rank's checksum manifest (sd_train.checksums, checked by `sd-train posthoc`).
Written as a `.partial` folder and renamed, like checkpoints; never deleted by retention.
The rule that makes one reader serve every strategy: each piece is saved as what it is of a
*global* tensor (`layout.global_tensor`). FSDP2's shards are DTensors of the parameter itself
(Shard(0)); DDP's and ZeRO-2's replicas are plain tensors, which DCP writes once; a ZeRO-3
partition is a slice of the flattened parameter, so it is saved as a 1-D DTensor of numel elements
and `snapshot.json` records the parameters' shapes under `shapes` (absent for the other layouts,
whose stored tensors have the parameter's shape). DCP reloads any of them in one process with no
process group, whatever world size wrote them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from sd_train import dcp_io
from sd_train.checksums import complete_manifest
from sd_train.ema.contracts import EMALayout
from sd_train.ema.plan import PosthocPlan
from sd_train.ema.posthoc_math import power_beta
from sd_train.ema.shadow import ShadowPieces
from sd_train.folders import replace_folder
from sd_train.paths import SNAPSHOT_META, partial_dir, snapshot_is_complete, step_dir

SNAPSHOT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def profile_key(index: int) -> str:
    """DCP key of the index-th profile (sigma_rels order), in checkpoints and snapshots."""
    return f"p{index}"


class PowerEMAProfiles(ShadowPieces):
    """The K power-function profiles of this rank's parameter shards, and their snapshots."""

    what = "post-hoc profile"

    def __init__(self, model: torch.nn.Module, plan: PosthocPlan, layout: EMALayout):
        super().__init__(model, layout, count=len(plan.gammas))
        self.plan = plan
        self.gammas = plan.gammas

    @property
    def shadows(self) -> list[list[torch.Tensor]] | None:
        """Each profile's pieces, in sigma_rels order (None before the start)."""
        return self.pieces

    def piece_key(self, index: int, name: str) -> str:
        """`p<i>.<param name>`: the profile's DCP key, then the parameter."""
        return f"{profile_key(index)}.{name}"

    def update(self, step: int) -> None:
        """Call after every optimizer step taken, with the number of steps taken so far."""
        if not self.plan.enabled or step < self.plan.step_start:
            return
        if self.pieces is None:
            self.allocate(copy_weights=True)  # t = 1: beta 0, a copy of the weights
            return
        t = step - self.plan.step_start + 1
        self.lerp([1.0 - power_beta(gamma, t) for gamma in self.gammas])

    # ---- checkpoint state (the Shadow contract, sd_train.ema.contracts) ------------------------

    def meta_state_dict(self) -> dict:
        return {"open": self.is_open, "step_start": self.plan.step_start, "sigma_rels": list(self.plan.sigma_rels)}

    def load_meta_state_dict(self, state: dict) -> None:
        if list(state["sigma_rels"]) != list(self.plan.sigma_rels) or state["step_start"] != self.plan.step_start:
            raise ValueError(
                f"checkpoint tracked post-hoc profiles sigma_rels={state['sigma_rels']} from step {state['step_start']}"
                f", this run has {self.plan.sigma_rels} from step {self.plan.step_start}: resume with the same "
                "ema.posthoc settings"
            )
        if state["open"]:
            self.allocate(copy_weights=False)
        else:
            self.pieces = None

    def tensor_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Every profile as global tensors (`layout.global_tensor`: DTensors when sharded), cast to
        `dtype` if given (snapshots)."""
        if self.pieces is None:
            return {}
        return {profile_key(i): self.global_tensors(i, dtype) for i in range(self.count)}

    # ---- snapshots ----------------------------------------------------------------------------

    def maybe_snapshot(self, root: Path, step: int, rank: int) -> Path | None:
        """Write the snapshot of `step` if the plan says so (collective: every rank calls it)."""
        if not self.plan.enabled or self.pieces is None or not self.plan.is_snapshot_step(step):
            return None
        return self.write_snapshot(root, step, rank)

    def write_snapshot(self, root: Path, step: int, rank: int) -> Path:
        root = Path(root)
        tmp, final = partial_dir(root, step), step_dir(root, step)
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a crash: never write into it
            tmp.mkdir(parents=True)
        dist.barrier()
        state = {"profiles": self.tensor_state_dict(SNAPSHOT_DTYPES[self.plan.dtype])}
        # The coordinator writes .metadata after every rank's shard and checksum manifest.
        manifest = dcp_io.writer(tmp, lambda: complete_manifest(tmp, rank))
        dcp.save(state, checkpoint_id=str(tmp), storage_writer=manifest)
        if rank == 0:
            meta = {
                "step": step,
                "step_start": self.plan.step_start,
                "sigma_rels": list(self.plan.sigma_rels),
                "gammas": self.gammas,
                "dtype": self.plan.dtype,
                "world_size": dist.get_world_size(),
                "layout": self.layout.name,
            }
            shapes = self.layout.stored_shapes(self.named_params)
            if shapes:
                meta["shapes"] = shapes
            (tmp / SNAPSHOT_META).write_text(json.dumps(meta, indent=1))
            complete_manifest(tmp, 0)  # rank 0's files now include .metadata and snapshot.json
            # The same step again after a resume from an older checkpoint: the run is bitwise
            # deterministic, so the new one replaces it, once complete.
            replace_folder(tmp, final)
        return final


def read_snapshot_meta(folder: Path) -> dict:
    if not snapshot_is_complete(folder):
        raise FileNotFoundError(f"{folder} is not a complete post-hoc snapshot (no {SNAPSHOT_META} or .metadata)")
    return json.loads((Path(folder) / SNAPSHOT_META).read_text())


def load_snapshot_profile(folder: Path, index: int) -> dict[str, torch.Tensor]:
    """One profile of a snapshot as full fp32 tensors, in this process with no process group,
    whatever world size and strategy wrote it. Only that profile is read."""
    shapes = read_snapshot_meta(folder).get("shapes", {})  # ZeRO-3's flattened parameters
    md = dcp_io.read_metadata(folder)
    prefix = f"profiles.{profile_key(index)}."
    state = {
        key[len(prefix) :]: torch.empty(tuple(item.size), dtype=item.properties.dtype)
        for key, item in md.state_dict_metadata.items()
        if key.startswith(prefix)
    }
    if not state:
        raise KeyError(f"{folder} has no profile {index}")
    wrapped = {"profiles": {profile_key(index): state}}
    dcp_io.load(wrapped, folder, no_dist=True)
    return {
        n: t.float().view(shapes[n]) if n in shapes else t.float()
        for n, t in wrapped["profiles"][profile_key(index)].items()
    }
