"""Per-step communication volume per GPU for FSDP, HSDP and DDP at SD2-base size, computed (not
measured: one machine cannot measure an interconnect), and the time it takes at given link speeds.

    python bench/comm_volume.py                       # 4 nodes x 8 GPUs, SD2-base, bf16 gathers
    python bench/comm_volume.py --nodes 8 --intra-gbs 450 --inter-gbs 45

Ring collectives over n ranks move, per rank, (n-1)/n of the buffer for an all-gather or a
reduce-scatter and 2(n-1)/n for an all-reduce. Per optimizer step with gradient accumulation 1:
- FSDP over all W ranks: all-gather of the params in forward and again in backward
  (reshard_after_forward=true), in `dist.param_dtype`, plus a reduce-scatter of the gradients in
  `dist.reduce_dtype`, all across every rank, so across nodes as soon as W spans more than one.
- HSDP, shard groups of S ranks (one node) and R = W/S replicas: the same all-gathers and
  reduce-scatter inside the node (S ranks), plus an all-reduce of each rank's 1/S gradient shard
  across the R replicas: only that crosses nodes.
- DDP: one all-reduce of every gradient across all W ranks.
The time of a collective is set by its slowest link: across nodes, the per-GPU InfiniBand share.
"""

from __future__ import annotations

import argparse
import json

SD2_BASE_PARAMS = 865_910_724  # diffusers UNet2DConditionModel from the SD2-base config
BYTES = {"fp32": 4, "bf16": 2}


def ring(kind: str, nbytes: float, n: int) -> float:
    """Bytes one rank sends (= receives) in a ring collective over n ranks."""
    if n <= 1:
        return 0.0
    factor = {"all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n, "all_reduce": 2 * (n - 1) / n}[kind]
    return factor * nbytes


def volumes(params: int, nodes: int, gpus: int, param_dtype: str, reduce_dtype: str) -> dict[str, dict[str, float]]:
    """Per-GPU bytes per step, split into what stays inside a node and what crosses nodes."""
    world = nodes * gpus
    p_bytes, g_bytes = params * BYTES[param_dtype], params * BYTES[reduce_dtype]
    fsdp = 2 * ring("all_gather", p_bytes, world) + ring("reduce_scatter", g_bytes, world)
    hsdp_intra = 2 * ring("all_gather", p_bytes, gpus) + ring("reduce_scatter", g_bytes, gpus)
    hsdp_inter = ring("all_reduce", g_bytes / gpus, nodes)
    ddp = ring("all_reduce", params * 4, world)  # DDP reduces the fp32 gradients it holds
    cross = nodes > 1
    return {
        "FSDP": {"intra": 0.0 if cross else fsdp, "inter": fsdp if cross else 0.0},
        "HSDP": {"intra": hsdp_intra, "inter": hsdp_inter},
        "DDP": {"intra": 0.0 if cross else ddp, "inter": ddp if cross else 0.0},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=int, default=SD2_BASE_PARAMS)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--param-dtype", choices=BYTES, default="bf16")
    p.add_argument("--reduce-dtype", choices=BYTES, default="fp32")
    p.add_argument("--intra-gbs", type=float, default=450.0, help="per-GPU NVLink bandwidth, GB/s (H100 SXM: ~450)")
    p.add_argument(
        "--inter-gbs", type=float, default=45.0, help="per-GPU InfiniBand bandwidth, GB/s (400 Gb/s NDR: ~45)"
    )
    args = p.parse_args()
    vol = volumes(args.params, args.nodes, args.gpus_per_node, args.param_dtype, args.reduce_dtype)
    world = args.nodes * args.gpus_per_node
    print(
        f"{args.params:,} params, {args.nodes} nodes x {args.gpus_per_node} GPUs (W={world}), params gathered in "
        f"{args.param_dtype}, gradients reduced in {args.reduce_dtype}; links {args.intra_gbs:g} GB/s inside a "
        f"node, {args.inter_gbs:g} GB/s across nodes, per GPU"
    )
    print(f"{'':6} {'inside node GB':>15} {'across nodes GB':>16} {'time ms':>9}  (per GPU per optimizer step)")
    rows = {}
    for name, v in vol.items():
        ms = 1e3 * (v["intra"] / (args.intra_gbs * 1e9) + v["inter"] / (args.inter_gbs * 1e9))
        rows[name] = {"intra_gb": v["intra"] / 1e9, "inter_gb": v["inter"] / 1e9, "ms": ms}
        print(f"{name:6} {v['intra'] / 1e9:15.2f} {v['inter'] / 1e9:16.2f} {ms:9.1f}")
    print(json.dumps({"bench": "comm_volume", "world": world, **vars(args), "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
