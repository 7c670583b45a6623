"""SDXL's FSDP2 units and FLOPs, computed on the meta device (shapes only: no weights, no GPU):

    python bench/sdxl_units.py                    # the unit table for 8 ranks, bf16 gathers
    python bench/sdxl_units.py --ranks 64 --flops # + forward+backward FLOPs per image at 1024² and 832x1216

For `dist.fsdp_units=blocks` (each down/mid/up block a unit) and `layers` (also each resnet and each
BasicTransformerBlock; see sd_train.model.parallelize) it prints the units' sizes, and what one
unit's all-gather moves per rank (a ring all-gather over n ranks: (n-1)/n of the gathered bytes,
bench/comm_volume.py), which is also the gathered memory a unit holds while it runs. The FLOPs are
sd_train.perf.training_flops_per_image, the FlopCounterMode count behind `speed/mfu`.
"""

from __future__ import annotations

import argparse
import json

import benchlib
import torch
from comm_volume import BYTES, ring
from diffusers import UNet2DConditionModel

from sd_train.model.parallelize import block_layers, fsdp_units
from sd_train.perf import training_flops_per_image


def numel(module: torch.nn.Module, exclude: set[int] = frozenset()) -> int:
    return sum(p.numel() for p in module.parameters() if id(p) not in exclude)


def unit_sizes(unet: torch.nn.Module, mode: str) -> list[tuple[str, str, int]]:
    """(name, class, params) of every unit below the root, in forward order, as FSDPStrategy wraps
    them: inner layers first, so a block's unit holds only what they leave."""
    names = {id(m): n for n, m in unet.named_modules()}
    rows = []
    for unit in fsdp_units(unet):
        inner = block_layers(unit) if mode == "layers" else []
        taken = {id(p) for layer in inner for p in layer.parameters()}
        rows.append((names[id(unit)], type(unit).__name__, numel(unit, taken)))
        rows += [(names[id(layer)], type(layer).__name__, numel(layer)) for layer in inner]
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=8, help="ranks of the shard group (one node)")
    p.add_argument("--param-dtype", choices=BYTES, default="bf16")
    p.add_argument("--flops", action="store_true", help="also count FLOPs per image (~10 s on 2 CPU cores)")
    args = p.parse_args()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**benchlib.UNET_CONFIGS["sdxl"])
    total = numel(unet)
    assert total == benchlib.SDXL_PARAMS, total
    size = BYTES[args.param_dtype]
    report: dict = {"bench": "sdxl_units", "params": total, "ranks": args.ranks, "param_dtype": args.param_dtype}
    for mode in ("blocks", "layers"):
        rows = unit_sizes(unet, mode)
        root = total - sum(n for _, _, n in rows)
        big = max(((name, n) for name, _, n in rows), key=lambda r: r[1])
        sizes = sorted(n for _, _, n in rows)
        median = sizes[len(sizes) // 2]
        per_unit = ring("all_gather", big[1] * size, args.ranks)
        print(
            f"{mode:<6} {len(rows):3d} units + root ({root / 1e6:.1f}M): largest {big[0]} {big[1] / 1e6:.1f}M params "
            f"= {big[1] * size / 1e9:.2f} GB gathered, {per_unit / 1e9:.2f} GB received per rank; median unit "
            f"{median / 1e6:.1f}M, smallest {sizes[0] / 1e6:.2f}M"
        )
        report[mode] = {
            "units": len(rows),
            "root_params": root,
            "largest": {
                "name": big[0],
                "params": big[1],
                "gathered_bytes": big[1] * size,
                "all_gather_bytes_per_rank": per_unit,
            },
            "median_params": median,
            "smallest_params": sizes[0],
        }
        if mode == "blocks":
            for name, _, n in rows:
                print(f"    {name:<14} {n / 1e6:8.1f}M  {n * size / 1e9:5.2f} GB gathered")
        else:  # the units by kind: how many of each size
            kinds: dict[tuple[str, int], int] = {}
            for _, kind, n in rows:
                kinds[(kind, round(n / 1e5))] = kinds.get((kind, round(n / 1e5)), 0) + 1
            for (kind, n), count in sorted(kinds.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
                print(f"    {count:3d} x {kind:<24} {n / 10:7.1f}M  {n * 1e5 * size / 1e9:5.2f} GB gathered")
    if args.flops:
        for h, w in ((1024, 1024), (832, 1216)):
            f = training_flops_per_image(unet, (4, h // 8, w // 8), (77, 2048), torch.device("meta"))
            print(f"forward+backward per image at {h}x{w}: {f / 1e12:.2f} TFLOP")
            report[f"flops_{h}x{w}"] = f
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
