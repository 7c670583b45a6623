"""Aspect-ratio buckets (data.buckets) on a web-like size distribution: pixels kept, carried share,
loader speed against the square path, and torch.compile's graphs per bucket.

    .venv/bin/python bench/bench_buckets.py [--only pixels,carried,loader,compile] [--images 20000]

The size distribution (`web_sizes`) is LAION-like, not LAION's measured histogram: aspect ratios
drawn from a mixture (square 27%, 4:3 20%, 3:2 15%, 16:9 10%, 2:1 3%, portraits 3:4 10%, 2:3 10%,
9:16 3%, 3:1 and 1:3 1% each, each jittered by up to 5%) and a short side log-normal around 480 px
(sigma 0.45, 96..4000 px), with about 1% tiny images (32..128 px).

- `pixels`: the share of each image's pixels that the training crop keeps (from its size alone):
  the square path's center crop keeps min(w,h)²/(w·h); a bucket's cover crop keeps
  (W·H)/(s²·w·h), s the cover scale. SD 512 px (generated, factor 64, 9 buckets) and SDXL's set at
  1024 px; misfits filtered (their share is printed) or resized in.
- `carried`: the share of samples that wait through an epoch end, by the real bucket buffers
  (sd_train.data.batching) fed with the distribution's assignments: per worker-epoch sizes from
  1,000 to 100,000 samples, micro-batch 8.
- `loader`: samples/s of the real TrainLoader over the same JPEG shards (web-like sizes scaled by
  1/2, photo-like content), square 256 px against buckets at 256 px, 0 and 1 workers, batch 16,
  alternated, best of `--repeat`.
- `compile`: the tiny UNet compiled per FSDP unit as `perf.compile` does (backend aot_eager:
  dynamo's graph capture and AOT autograd without inductor's C++ code generation, which takes
  minutes per graph set on 2 cores), forward+backward at the square shape and at each bucket: graphs
  captured, and per shape the seconds of its first step against a steady one (best of 3), with the
  bucket settings (static shapes, sd_train.perf.static_shapes_for_buckets) and with dynamo's defaults.
Prints tables, then one JSON line.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import random
import sys
import tarfile
import tempfile
import time
from collections import Counter
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import build_unet, emit_json, load_average, print_table  # noqa: E402

from sd_train.data.batching import BucketBuffers, Waiting  # noqa: E402
from sd_train.data.buckets import SDXL_BUCKETS, BucketSet, Misfit, generate_buckets  # noqa: E402
from sd_train.data.decode import ImageTransform  # noqa: E402
from sd_train.data.loader import TrainLoader  # noqa: E402
from sd_train.data.sources import expand_sources  # noqa: E402
from sd_train.data.stream import ShardStream  # noqa: E402

ASPECTS = [(1.0, 0.27), (4 / 3, 0.20), (3 / 2, 0.15), (16 / 9, 0.10), (2.0, 0.03), (3 / 4, 0.10), (2 / 3, 0.10)]
ASPECTS += [(9 / 16, 0.03), (3.0, 0.01), (1 / 3, 0.01)]


def web_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """`n` (H, W) pairs of the LAION-like distribution in the module docstring."""
    rng = random.Random(seed)
    values, weights = [a for a, _ in ASPECTS], [w for _, w in ASPECTS]
    out = []
    for _ in range(n):
        aspect = rng.choices(values, weights)[0] * rng.uniform(0.95, 1.05)  # width / height
        short = (
            rng.uniform(32, 128) if rng.random() < 0.01 else min(4000, max(96, rng.lognormvariate(math.log(480), 0.45)))
        )
        h, w = (short, short * aspect) if aspect >= 1 else (short / aspect, short)
        out.append((max(1, round(h)), max(1, round(w))))
    return out


def kept_square(h: int, w: int) -> float:
    return min(h, w) ** 2 / (h * w)


def kept_bucket(h: int, w: int, bucket: tuple[int, int]) -> float:
    bh, bw = bucket
    s = max(bw / w, bh / h)
    return min(1.0, (bh * bw) / (s * s * h * w))


def pixels_kept(sizes: list[tuple[int, int]]) -> list[dict[str, Any]]:
    sets = {
        "sd 512, generated/64": (BucketSet.of(generate_buckets(512, 64, 4.0)), 512),
        "sdxl 1024, sdxl set": (BucketSet.of(SDXL_BUCKETS), 1024),
    }
    rows = []
    for name, (bucket_set, _) in sets.items():
        for misfits in ("filter", "resize"):
            b = BucketSet(bucket_set.sizes, 4.0, misfits)  # type: ignore[arg-type]
            kept, square, reasons = [], [], Counter()
            for h, w in sizes:
                try:
                    i = b.assign(h, w)
                except Misfit as e:
                    reasons[e.reason] += 1
                    continue
                kept.append(kept_bucket(h, w, b.sizes[i]))
                square.append(kept_square(h, w))
            rows.append(
                {
                    "set": name,
                    "misfits": misfits,
                    "buckets": len(b.sizes),
                    "kept_square": float(np.mean(square)),
                    "kept_buckets": float(np.mean(kept)),
                    "kept_square_p10": float(np.percentile(square, 10)),
                    "kept_buckets_p10": float(np.percentile(kept, 10)),
                    "filtered_share": sum(reasons.values()) / len(sizes),
                    "filtered": dict(reasons),
                }
            )
    return rows


def carried_share(sizes: list[tuple[int, int]], batch: int = 8) -> list[dict[str, Any]]:
    """Feed the real buffers one worker's epochs of assignments; count the carried samples."""
    b = BucketSet.of(generate_buckets(512, 64, 4.0))
    assigned = []
    for h, w in sizes:
        try:
            assigned.append(b.assign(h, w))
        except Misfit:
            pass
    rows = []
    for per_epoch in (1_000, 10_000, 100_000):
        buffers = BucketBuffers(b.names, batch)
        epochs = 3
        for e in range(epochs):
            for i in range(per_epoch):
                buffers.add(assigned[(e * per_epoch + i) % len(assigned)], None, Waiting(0, i, "", (e, i)))
            if e + 1 < epochs:
                buffers.end_epoch()
        rows.append(
            {"samples_per_worker_epoch": per_epoch, "carried_share": buffers.carried / (per_epoch * (epochs - 1))}
        )
    return rows


def photo(h: int, w: int, rng: np.random.Generator) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = [np.sin(xx / w * rng.uniform(1, 6) + yy / h * rng.uniform(1, 6) + rng.uniform(0, 6)) for _ in range(3)]
    array = (np.stack(base, -1) * 0.4 + 0.5 + rng.normal(0, 0.12, (h, w, 3))).clip(0, 1) * 255
    return Image.fromarray(array.astype(np.uint8))


def write_shards(folder: str, sizes: list[tuple[int, int]], shards: int = 4) -> str:
    rng = np.random.default_rng(0)
    per = -(-len(sizes) // shards)
    for s in range(shards):
        with tarfile.open(os.path.join(folder, f"web-{s:06d}.tar"), "w") as tar:
            for i in range(s * per, min(len(sizes), (s + 1) * per)):
                h, w = sizes[i]
                buf = io.BytesIO()
                photo(max(8, h // 2), max(8, w // 2), rng).save(buf, format="JPEG", quality=85)
                for name, data in ((f"{i:09d}.jpg", buf.getvalue()), (f"{i:09d}.txt", b"a photo")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(folder, f"web-{{000000..{shards - 1:06d}}}.tar")


def loader_rate(spec: str, buckets: BucketSet | None, workers: int, batch: int, samples: int) -> float:
    stream = ShardStream(
        expand_sources(spec), rank=0, world_size=1, num_workers=workers, seed=0, batch_size=batch,
        transform=ImageTransform(256, buckets=buckets), shuffle_buffer=0,
    )  # fmt: skip
    it = iter(TrainLoader(stream, workers, prefetch_factor=4))
    for _ in range(2 * 4 * max(1, workers)):  # past the queues the workers filled while starting
        next(it)
    start, seen = time.perf_counter(), 0
    while seen < samples:
        seen += len(next(it)["keys"])
    it.close()
    return seen / (time.perf_counter() - start)


def loader_speed(count: int, repeat: int, samples: int) -> list[dict[str, Any]]:
    buckets = BucketSet.of(generate_buckets(256, 64, 4.0), 4.0, "resize")  # misfits resized: the same images
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        spec = write_shards(folder, web_sizes(count, seed=1))
        for workers in (0, 1):
            best: dict[str, float] = {"square": 0.0, "buckets": 0.0}
            for _ in range(repeat):  # alternated: a busy moment slows both
                for name, b in (("square", None), ("buckets", buckets)):
                    best[name] = max(best[name], loader_rate(spec, b, workers, 16, samples))
            rows.append({"workers": workers, **best, "ratio": best["buckets"] / best["square"]})
    return rows


def compile_graphs(shapes: list[tuple[int, int]], static: bool) -> dict[str, Any]:
    """Compile the tiny UNet's FSDP units (aot_eager) and run one forward+backward per shape, then a
    second step at each: graphs captured, first-step and steady-step seconds."""
    import torch._dynamo

    from sd_train.model.parallelize import fsdp_units
    from sd_train.perf import compile_module, static_shapes_for_buckets

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counters
    torch._dynamo.config.automatic_dynamic_shapes = True
    torch._dynamo.config.recompile_limit = 8
    if static:
        static_shapes_for_buckets(len(shapes))
    unet = build_unet("tiny", 16)
    for unit in fsdp_units(unet):
        compile_module(unit, "aot_eager")
    text = torch.randn(2, 77, 64)

    def step(h: int, w: int) -> float:
        t0 = time.perf_counter()
        x = torch.randn(2, 4, h, w)
        unet(x, torch.tensor([10, 500]), encoder_hidden_states=text).sample.square().mean().backward()
        return time.perf_counter() - t0

    first = [step(h, w) for h, w in shapes]
    steady = [min(step(h, w) for _ in range(3)) for h, w in shapes]  # best of 3: the machine is shared
    stats = torch._dynamo.utils.counters["stats"]
    return {
        "shapes": len(shapes),
        "graphs": int(stats["unique_graphs"]),
        "first_step_s_per_shape": round(sum(first) / len(shapes), 2),
        "steady_step_s_per_shape": round(sum(steady) / len(shapes), 3),
        "dynamic_graphs": "no" if static else "after the 2nd shape (automatic dynamic shapes)",
    }


def compile_cost() -> list[dict[str, Any]]:
    # The tiny UNet's latents of a 32 px run with a factor of 4 (VAE 2 x UNet 2): the 9 buckets at
    # 1/2 scale; the square run has one shape.
    buckets = [(h // 2, w // 2) for h, w in generate_buckets(32, 4, 4.0)]
    rows = [{"run": "square", **compile_graphs([(16, 16)], static=False)}]
    rows.append({"run": "9 buckets, static", **compile_graphs(buckets, static=True)})
    rows.append({"run": "9 buckets, dynamo defaults", **compile_graphs(buckets, static=False)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="pixels,carried,loader,compile", help="comma-separated sections")
    parser.add_argument("--images", type=int, default=20000, help="sizes drawn for `pixels` and `carried`")
    parser.add_argument("--loader-images", type=int, default=400, help="JPEGs written for `loader`")
    parser.add_argument("--samples", type=int, default=320, help="samples timed per loader measurement")
    parser.add_argument("--repeat", type=int, default=3, help="best of N loader runs")
    args = parser.parse_args()
    only = set(args.only.split(","))
    torch.set_num_threads(1)
    result: dict[str, Any] = {"load_average_start": load_average()}
    sizes = web_sizes(args.images)
    if "pixels" in only:
        rows = pixels_kept(sizes)
        print("share of each image's pixels the training crop keeps (mean, 10th percentile)")
        print_table(
            ["set", "misfits", "buckets", "square", "buckets", "square p10", "buckets p10", "filtered"],
            [[r["set"], r["misfits"], r["buckets"], r["kept_square"], r["kept_buckets"], r["kept_square_p10"],
              r["kept_buckets_p10"], r["filtered_share"]] for r in rows],
        )  # fmt: skip
        result["pixels"] = rows
    if "carried" in only:
        rows = carried_share(sizes)
        print("\nsamples carried over an epoch end (SD 512 px, 9 buckets, micro-batch 8)")
        print_table(["samples per worker-epoch", "carried share"], [list(r.values()) for r in rows])
        result["carried"] = rows
    if "loader" in only:
        rows = loader_speed(args.loader_images, args.repeat, args.samples)
        print(f"\nloader samples/s, 256 px, batch 16, best of {args.repeat}")
        print_table(["workers", "square", "buckets", "buckets / square"], [list(r.values()) for r in rows])
        result["loader"] = rows
    if "compile" in only:
        rows = compile_cost()
        print("\ntorch.compile (aot_eager) of the tiny UNet's units: graphs and seconds per shape set")
        headers = ["run", "shapes", "graphs", "first step s / shape", "steady step s / shape", "dynamic graphs"]
        print_table(headers, [list(r.values()) for r in rows])
        result["compile"] = rows
    result["load_average_end"] = load_average()
    emit_json("buckets", result)


if __name__ == "__main__":
    main()
