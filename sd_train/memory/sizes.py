"""The sizes the memory plan needs, read from a diffusers model folder without torch: parameter
counts of the UNet (in all, per FSDP unit, the largest tensor) and of the frozen VAE and text
encoder, from the safetensors headers (an 8-byte length, then JSON naming each tensor's dtype and
shape). Reading them costs milliseconds, so a config is judged before anything heavy is imported.

The FSDP units are named here the way sd_train.model.parallelize wraps them: each down, mid and up
block (`dist.fsdp_units=blocks`), and with `layers` each of their resnets and transformer blocks too,
the block keeping the rest; everything outside the blocks is the root's.
tests/unit/test_memory_plan.py checks these counts against the wrapped module.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from sd_train.errors import ConfigError

# safetensors dtype names -> bytes per element
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_BLOCK = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.")
_LAYER = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.(resnets\.\d+|attentions\.\d+)\.")
_TRANSFORMER = re.compile(
    r"^((?:down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+)\.transformer_blocks\.(\d+)\."
)


class UnsizedModel(ConfigError):
    """The model folder holds no safetensors weights to count, and no step estimate has counted
    them: there is no memory plan to make (a start or a preview says so and goes on unchecked)."""


def safetensors_header(path: Path) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", ...}} of one .safetensors file (its `__metadata__` dropped)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def folder_tensors(folder: Path) -> dict[str, dict] | None:
    """Every tensor of a diffusers/transformers component folder (one file or an index of shards),
    or None when it holds no safetensors weights."""
    for index in sorted(folder.glob("*.safetensors.index.json")):
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, dict] = {}
        for shard in shards:
            out.update(safetensors_header(folder / shard))
        return out
    files = sorted(folder.glob("*.safetensors"))
    # A folder may hold variants (model.fp16.safetensors); the plain file is what from_pretrained reads.
    plain = [f for f in files if f.name.count(".") == 1] or files
    return safetensors_header(plain[0]) if plain else None


def numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def unit_of(name: str, fsdp_units: str, split: frozenset[str] = frozenset()) -> str:
    """The FSDP unit a UNet parameter belongs to (sd_train.model.parallelize), by its name. `split`:
    the attentions made of several transformer blocks (SDXL), each block of which is a unit of its
    own under `layers`, the attention's projections and norm staying with the enclosing block."""
    if fsdp_units == "layers":
        t = _TRANSFORMER.match(name)
        if t and t.group(1) in split:
            return f"{t.group(1)}.transformer_blocks.{t.group(2)}"
        m = _LAYER.match(name)
        if m and f"{m.group(1)}.{m.group(2)}" not in split:
            return f"{m.group(1)}.{m.group(2)}"
    m = _BLOCK.match(name)
    return m.group(1) if m else "root"


def split_attentions(names: list[str]) -> frozenset[str]:
    """The attentions holding more than one transformer block (sd_train.model.parallelize splits those)."""
    blocks: dict[str, set[str]] = {}
    for name in names:
        t = _TRANSFORMER.match(name)
        if t:
            blocks.setdefault(t.group(1), set()).add(t.group(2))
    return frozenset(a for a, ids in blocks.items() if len(ids) > 1)


@dataclass
class ModelSizes:
    """Element counts of one model folder's parts (`text_encoder_numel`: both of SDXL's encoders);
    `unet_file_bytes` is what the UNet's weight file holds."""

    unet_numel: int
    units: dict[str, int]
    """FSDP unit -> parameter elements, under the folder's unit layout ("root": outside the blocks)."""
    largest_tensor: int
    unet_file_bytes: int
    vae_numel: int
    text_encoder_numel: int
    source: str = "safetensors headers"
    tensors: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def largest_unit(self) -> tuple[str, int]:
        """The largest unit other than the root (the root is gathered for the whole step anyway)."""
        blocks = {k: v for k, v in self.units.items() if k != "root"} or self.units
        name = max(blocks, key=blocks.__getitem__)
        return name, blocks[name]

    def regroup(self, fsdp_units: str) -> ModelSizes:
        """The same sizes with units counted for another `dist.fsdp_units`."""
        units: dict[str, int] = {}
        split = split_attentions(list(self.tensors))
        for name, n in self.tensors.items():
            unit = unit_of(name, fsdp_units, split)
            units[unit] = units.get(unit, 0) + n
        return ModelSizes(
            self.unet_numel,
            units,
            self.largest_tensor,
            self.unet_file_bytes,
            self.vae_numel,
            self.text_encoder_numel,
            self.source,
            self.tensors,
        )


def read_model_sizes(model_path: str, fsdp_units: str = "blocks") -> ModelSizes:
    """ModelSizes of a local diffusers SD folder, from its safetensors headers. ConfigError naming
    `model.pretrained_path` when a part has no safetensors weights (the memory plan then needs the
    fake-tensor estimate, which builds the parts from their configs: `dist.memory_check=estimate`)."""
    root = Path(model_path)
    parts = {}
    encoders = ("text_encoder", "text_encoder_2") if (root / "text_encoder_2").is_dir() else ("text_encoder",)
    for part in ("unet", "vae", *encoders):
        tensors = folder_tensors(root / part) if (root / part).is_dir() else None
        if tensors is None:
            raise UnsizedModel(
                f"model.pretrained_path={model_path!r}: {part}/ holds no .safetensors weights, so the memory plan "
                "cannot count its parameters from the file headers; convert it to safetensors, or let the plan "
                "build it on fake tensors (dist.memory_check=estimate, or `sd-train plan --estimate`)"
            )
        parts[part] = tensors
    unet = {name: numel(t["shape"]) for name, t in parts["unet"].items()}
    sizes = ModelSizes(
        unet_numel=sum(unet.values()),
        units={},
        largest_tensor=max(unet.values()),
        unet_file_bytes=sum(numel(t["shape"]) * DTYPE_BYTES.get(t["dtype"], 4) for t in parts["unet"].values()),
        vae_numel=sum(numel(t["shape"]) for t in parts["vae"].values()),
        text_encoder_numel=sum(numel(t["shape"]) for e in encoders for t in parts[e].values()),
        tensors=unet,
    )
    return sizes.regroup(fsdp_units)
