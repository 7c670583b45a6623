"""Loader throughput: samples/s per worker, uint8 batched in the worker vs float per sample moved to main.

    .venv/bin/python bench/bench_loader.py [--count 512] [--batch 32] [--samples 1024]

Writes two temporary shard sets (emoji-like 64 px PNG, photo-like 256 px JPEG; `--count` images
in 8 shards each), then reads each with 0 (in-process), 1 and 2 DataLoader workers in two ways:
- `uint8`: the training path, `TrainLoader` (decode, crop, stack `--batch` uint8 samples in the worker);
- `float`: decode the same way, but send each sample as a float32 [-1, 1] tensor to the main process
  (what a per-sample torchvision-style pipeline does).
Timing starts after the first item arrives (worker start-up excluded) and covers `--samples`
samples (the stream loops epochs); the best of `--repeat` runs is kept. Prints a table of
samples/s per worker and one JSON line.

JPEG draft mode (`--only draft` runs just this part): photo-like 512 px and 1024 px JPEGs decoded
to 256 px by the training decoder (draft: reduced-scale DCT, since both are >= 2x 256) and by the
same decoder with draft off (full decode, then resize), timed side by side in one process (best of
`--repeat`, alternating), with the mean PSNR of the draft result against the full decode.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sd_train.data.bad_input import BadInputLog, BadSample
from sd_train.data.decode import ImageTransform, decode_image_sample, to_rgb, transform_image
from sd_train.data.loader import TrainLoader
from sd_train.data.sources import expand_sources
from sd_train.data.stream import ShardStream
from sd_train.data.tar import RawSample, read_shards
from sd_train.model.parts import uint8_to_unit_range

NUM_SHARDS = 8


def emoji_like(rng: random.Random, size: int) -> Image.Image:
    """Flat-colour shapes on white, like a composited Twemoji PNG."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(image)
    color = tuple(rng.randrange(256) for _ in range(3))
    d.ellipse((4, 4, size - 5, size - 5), fill=color, outline=(40, 40, 40), width=2)
    for _ in range(3):
        x, y = rng.randrange(size // 4, 3 * size // 4), rng.randrange(size // 4, 3 * size // 4)
        d.ellipse((x - 4, y - 4, x + 4, y + 4), fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def photo_like(rng: random.Random, size: int) -> Image.Image:
    """Smooth colour gradients plus noise: JPEG decode cost close to a real photo's."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    channels = [np.sin(xx * rng.uniform(1, 6) + yy * rng.uniform(1, 6) + rng.uniform(0, 6)) for _ in range(3)]
    noise = np.random.default_rng(rng.randrange(1 << 30)).normal(0, 0.15, (size, size, 3))
    array = (np.stack(channels, -1) * 0.4 + 0.5 + noise).clip(0, 1) * 255
    return Image.fromarray(array.astype(np.uint8))


def write_set(folder: str, kind: str, count: int) -> str:
    """`count` images of `kind` ("png64" or "jpeg256") in NUM_SHARDS shards; returns a brace spec."""
    rng = random.Random(0)
    per = -(-count // NUM_SHARDS)
    for s in range(NUM_SHARDS):
        with tarfile.open(os.path.join(folder, f"{kind}-{s:06d}.tar"), "w") as tar:
            for i in range(s * per, min(count, (s + 1) * per)):
                buf = io.BytesIO()
                if kind == "png64":
                    emoji_like(rng, 64).save(buf, format="PNG")
                else:
                    photo_like(rng, 256).save(buf, format="JPEG", quality=90)
                ext = "png" if kind == "png64" else "jpg"
                for name, data in ((f"{i:09d}.{ext}", buf.getvalue()), (f"{i:09d}.txt", f"image {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(folder, f"{kind}-{{000000..{NUM_SHARDS - 1:06d}}}.tar")


class FloatPerSample(IterableDataset):
    """The comparison path: same shards and decode, one float32 sample per item."""

    def __init__(self, spec: str, resolution: int) -> None:
        self.urls = expand_sources(spec)[0].urls
        self.transform = ImageTransform(resolution)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        while True:  # endless, like the training stream
            for raw in read_shards(self.urls[worker::workers], BadInputLog()):
                try:
                    s = decode_image_sample(raw, self.transform, None)
                except BadSample:
                    continue
                yield uint8_to_unit_range(torch.from_numpy(s.pixels).permute(2, 0, 1)), s.caption


PREFETCH = 4


def rate(items: Iterator, samples: int, size_of: Callable[[Any], int], warmup: int) -> float:
    """Samples/s over `samples` samples, timed after `warmup` items.

    The warm-up must outlast the queues the workers filled while starting (PREFETCH items each),
    or those free items inflate the rate.
    """
    it = iter(items)
    for _ in range(warmup):
        next(it)
    start, seen = time.perf_counter(), 0
    while seen < samples:
        seen += size_of(next(it))
    return seen / (time.perf_counter() - start)


def measure(spec: str, resolution: int, workers: int, path: str, batch: int, samples: int) -> float:
    if path == "uint8":
        stream = ShardStream(
            expand_sources(spec),
            rank=0,
            world_size=1,
            num_workers=workers,
            seed=0,
            batch_size=batch,
            transform=ImageTransform(resolution),
            shuffle_buffer=0,
        )
        warmup = 2 * PREFETCH * max(1, workers)
        return rate(TrainLoader(stream, workers, prefetch_factor=PREFETCH), samples, lambda b: len(b["keys"]), warmup)
    extra = {"prefetch_factor": PREFETCH} if workers else {}
    loader = DataLoader(FloatPerSample(spec, resolution), batch_size=None, num_workers=workers, **extra)
    return rate(loader, samples, lambda item: 1, 2 * PREFETCH * max(1, workers))


def full_decode(data: bytes, tf: ImageTransform) -> np.ndarray:
    """The training decode with draft mode off: every DCT coefficient, then the resize."""
    with Image.open(io.BytesIO(data)) as image:
        return transform_image(to_rgb(image), tf, None)[0]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def draft_vs_full(count: int, repeat: int, resolution: int = 256) -> dict[str, dict[str, float]]:
    """Per source size: ms per image with and without draft, the speed-up, and the PSNR."""
    tf = ImageTransform(resolution)
    out: dict[str, dict[str, float]] = {}
    for size in (512, 1024):
        rng = random.Random(size)
        jpegs = []
        for _ in range(count):
            buf = io.BytesIO()
            photo_like(rng, size).save(buf, format="JPEG", quality=90)
            jpegs.append(buf.getvalue())
        samples = [RawSample(f"{i}", "bench", {"jpg": d, "txt": b"x"}) for i, d in enumerate(jpegs)]
        times: dict[str, list[float]] = {"draft": [], "full": []}
        for _ in range(repeat):  # alternate, so a busy moment slows both
            start = time.perf_counter()
            drafted = [decode_image_sample(s, tf, None).pixels for s in samples]
            times["draft"].append(time.perf_counter() - start)
            start = time.perf_counter()
            full = [full_decode(d, tf) for d in jpegs]
            times["full"].append(time.perf_counter() - start)
        draft_s, full_s = min(times["draft"]), min(times["full"])
        out[f"jpeg{size}_to{resolution}"] = {
            "draft_ms": round(1000 * draft_s / count, 2),
            "full_ms": round(1000 * full_s / count, 2),
            "speedup": round(full_s / draft_s, 2),
            "psnr_db": round(float(np.mean([psnr(a, b) for a, b in zip(drafted, full)])), 1),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=512, help="images per shard set")
    parser.add_argument("--batch", type=int, default=32, help="micro batch size of the uint8 path")
    parser.add_argument("--samples", type=int, default=1024, help="samples timed per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="best of N (a busy machine only slows runs down)")
    parser.add_argument("--only", choices=("all", "draft"), default="all", help="`draft`: only the JPEG draft part")
    parser.add_argument("--draft-count", type=int, default=64, help="JPEGs per size in the draft part")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the main process only receives; keep it off the workers' cores
    draft = draft_vs_full(args.draft_count, args.repeat)
    print(f"JPEG -> 256 px, ms per image, best of {args.repeat}: draft (reduced-scale DCT) vs full decode")
    for name, row in draft.items():
        print(
            f"{name:<16} draft {row['draft_ms']:>7.2f}  full {row['full_ms']:>7.2f}  "
            f"speed-up {row['speedup']:.2f}x  PSNR vs full {row['psnr_db']:.1f} dB"
        )
    if args.only == "draft":
        print(json.dumps({"bench": "loader_draft", "repeat": args.repeat, "draft": draft}))
        return
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for kind, resolution in (("png64", 64), ("jpeg256", 256)):
            spec = write_set(folder, kind, args.count)
            for workers in (0, 1, 2):
                for path in ("uint8", "float"):
                    runs = [
                        measure(spec, resolution, workers, path, args.batch, args.samples) for _ in range(args.repeat)
                    ]
                    total = max(runs)
                    results.setdefault(kind, {})[f"w{workers}_{path}"] = round(total / max(1, workers), 1)
    cores = os.cpu_count()
    print(f"samples/s per worker (w0 = in-process), best of {args.repeat}, uint8 batch {args.batch}, {cores} cores")
    cols = [f"w{w}_{p}" for w in (0, 1, 2) for p in ("uint8", "float")]
    print(f"{'set':<9}" + "".join(f"{c:>12}" for c in cols))
    for kind, row in results.items():
        print(f"{kind:<9}" + "".join(f"{row[c]:>12.0f}" for c in cols))
    summary = {"bench": "loader", "unit": "samples/s/worker", "batch": args.batch, "repeat": args.repeat}
    print(json.dumps(summary | {"cores": os.cpu_count(), "results": results, "draft": draft}))


if __name__ == "__main__":
    main()
