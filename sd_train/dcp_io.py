"""Reading torch.distributed.checkpoint (DCP) folders without running code from them, and writing
them with each rank's checksum manifest (sd_train.checksums).

DCP's FileSystemReader reads `.metadata` with a bare `pickle.load`, and its default load planner
reads every non-tensor entry (the optimizer's param_groups: lr, betas, ...) with
`torch.load(weights_only=False)`. A checkpoint, a post-hoc snapshot or a folder handed to
`sd-train export` from elsewhere could then run any code it names. Every DCP read in sd-train
(resume, `checkpoint.init_from`, `sd-train export`, `sd-train posthoc`) goes through this module:

- `SafeReader` is DCP's FileSystemReader with `read_metadata` through `MetadataUnpickler`, which
  builds only DCP's own metadata classes and the few plain values they hold (torch.Size, dtypes,
  the layout, a pathlib path). Any other global (`os.system`, `builtins.eval`, ...) is refused
  before anything is called. Tensors were already read with `torch.load(weights_only=True)` by DCP.
- `SafeLoadPlanner` is DCP's DefaultLoadPlanner with non-tensor entries read by
  `torch.load(weights_only=True)`: numbers, strings, lists, dicts, tuples, tensors.

Both hook in where DCP's own classes are meant to be extended (a StorageReader and a LoadPlanner
passed to `dcp.load`), and only the two reading methods differ from DCP's.

`ManifestWriter` is DCP's FileSystemWriter that calls `on_written()` on each rank once that rank's
files are written, inside DCP's write step: the coordinator gathers every rank's write results
(and so waits for every `on_written`) before it writes `.metadata`. The same writer serves sync and
async saves.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.planner import ReadItem, SavePlan, SavePlanner
from torch.futures import Future

# What a DCP `.metadata` pickle may name (torch 2.13 writes these; seen with pickletools on our
# checkpoints and snapshots, FSDP2 and ZeRO-3 layouts).
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "StorageMeta",
        "MetadataIndex",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout from its name, e.g. "torch.strided"
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint's metadata names something that is not DCP metadata."""


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"the checkpoint's .metadata names {module}.{name}, which is not part of DCP's metadata: refusing to "
            "load it (unpickling it could run code)"
        )


class SafeReader(FileSystemReader):
    """DCP's file-system reader, with `.metadata` read by `MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise UnsafeCheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, with non-tensor entries read as weights-only data."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class ManifestWriter(FileSystemWriter):
    """DCP's file-system writer, with `on_written()` once this rank's files are on disk."""

    def __init__(self, path: str | Path, on_written: Callable[[], None]):
        super().__init__(str(path))
        self.on_written = on_written

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        written = super().write_data(plan, planner)
        written.wait()  # FileSystemWriter writes in this thread: the future is already done
        self.on_written()
        return written


def writer(folder: str | Path, on_written: Optional[Callable[[], None]]) -> Optional[FileSystemWriter]:
    """The storage writer of a save into `folder` (None: DCP's default, when nothing is to run)."""
    return ManifestWriter(folder, on_written) if on_written is not None else None


def read_metadata(folder: str | Path) -> dcp_metadata.Metadata:
    return SafeReader(str(folder)).read_metadata()


def load(state: dict, folder: str | Path, no_dist: bool = False) -> None:
    """`dcp.load(state, checkpoint_id=folder)`, reading nothing that runs code. The metadata is read
    once first, so that a refused one raises UnsafeCheckpointError itself rather than inside DCP's
    CheckpointException (a BaseException that names no cause)."""
    read_metadata(folder)
    dcp.load(state, storage_reader=SafeReader(str(folder)), planner=SafeLoadPlanner(), no_dist=no_dist)
