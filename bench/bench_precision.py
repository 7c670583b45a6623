"""The two bf16 policies side by side, and today's mix of both: what each saves for backward, in
which dtype the GroupNorm outputs land, how far the loss and gradients move from fp32, and the
step time.

    .venv/bin/python bench/bench_precision.py [--size tiny] [--batch 4] [--latent 32] [--reps 3] [--device cpu]

One process, one rank (a 1-rank gloo or nccl group), the UNet wrapped by sd_train's own FSDP2
wrapping (`sd_train.parallel.build.shard_unet`) as a run wraps it. Policies:
- "fp32": fp32 params, no autocast (the reference);
- "autocast": fp32 params under `torch.autocast(bf16)` (`mixed_precision=bf16`; DDP and DeepSpeed);
- "bf16 params": FSDP2 `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` with no
  autocast (`dist.param_dtype=bf16`), the policy sd_train uses under FSDP2;
- "both": bf16 params under autocast, what the SD2 templates ran before one policy was chosen.

Saved-for-backward bytes are counted with `torch.autograd.graph.saved_tensors_hooks` (each storage
once), so they are the activation memory a step holds at the end of forward, on any device. The
GroupNorm outputs' dtype is read by forward hooks. The loss and gradient figures are relative
differences against fp32 on the same batch and weights (the gradient's over all tensors together).
The time is a forward+backward, the median of `--reps` interleaved; on CPU bf16 runs through slow
paths, so only a GPU's time ranks the policies by speed, while the bytes and dtypes hold everywhere.

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import Counter
from typing import Any

import benchlib
import torch
import torch.nn.functional as F

POLICIES = {  # name: (FSDP2 param dtype, autocast)
    "fp32": ("fp32", False),
    "autocast": ("fp32", True),
    "bf16 params": ("bf16", False),
    "both": ("bf16", True),
}
TEXT_TOKENS = 77


class SavedBytes:
    """Bytes autograd saves for backward, by dtype, each storage counted once."""

    def __init__(self) -> None:
        self.by_dtype: Counter = Counter()
        self._seen: set[int] = set()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.by_dtype[str(t.dtype).removeprefix("torch.")] += storage.nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def groupnorm_dtypes(model: torch.nn.Module) -> tuple[Counter, list]:
    seen: Counter = Counter()
    handles = [
        m.register_forward_hook(lambda _m, _i, out: seen.update([str(out.dtype).removeprefix("torch.")]))
        for m in model.modules()
        if isinstance(m, torch.nn.GroupNorm)
    ]
    return seen, handles


def run_policy(name: str, args: argparse.Namespace, info: Any, batch: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    from sd_train.config import DistArgs
    from sd_train.parallel.build import shard_unet

    param_dtype, autocast = POLICIES[name]
    model = shard_unet(benchlib.build_unet(args.size, args.latent, seed=0), DistArgs(param_dtype=param_dtype), info).to(
        info.device
    )
    x, t, text, noise = (b.to(info.device) for b in batch)
    amp = torch.autocast(info.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def step(saved: SavedBytes | None = None) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with amp, saved.hooks() if saved else contextlib.nullcontext():
            pred = model(x + noise, t, encoder_hidden_states=text).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        return loss.detach()

    saved = SavedBytes()
    norm_dtypes, handles = groupnorm_dtypes(model)
    loss = step(saved)
    for h in handles:
        h.remove()
    grads = {n: p.grad.full_tensor().float() for n, p in model.named_parameters()}
    times = benchlib.interleaved({name: step}, args.warmup, args.reps)[name]
    return {
        "loss": float(loss),
        "grads": grads,
        "saved_bytes": dict(saved.by_dtype),
        "groupnorm_out": dict(norm_dtypes),
        "ms": benchlib.median_ms(times),
        "pred_dtype": str(model(x[:1], t[:1], encoder_hidden_states=text[:1]).sample.dtype).removeprefix("torch."),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=sorted(benchlib.UNET_CONFIGS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    from sd_train.config import DistArgs
    from sd_train.parallel.process_group import destroy, init_distributed

    info = init_distributed(DistArgs(backend="nccl" if args.device == "cuda" else "gloo"))
    load_before = benchlib.load_average()
    cross = benchlib.UNET_CONFIGS[args.size]["cross_attention_dim"]
    g = torch.Generator().manual_seed(0)
    batch = (
        torch.randn(args.batch, 4, args.latent, args.latent, generator=g),
        torch.randint(0, 1000, (args.batch,), generator=g),
        torch.randn(args.batch, TEXT_TOKENS, cross, generator=g),
        torch.randn(args.batch, 4, args.latent, args.latent, generator=g),
    )
    results = {name: run_policy(name, args, info, batch) for name in POLICIES}
    ref = results["fp32"]
    rows, summary = [], {}
    for name, r in results.items():
        # One relative figure over the whole gradient (a per-tensor ratio blows up on tensors whose
        # fp32 gradient is ~0, e.g. the last conv's bias at init).
        diff2 = sum(float((r["grads"][k] - g32).square().sum()) for k, g32 in ref["grads"].items())
        grad_rel = (diff2 / sum(float(g32.square().sum()) for g32 in ref["grads"].values())) ** 0.5
        total = sum(r["saved_bytes"].values())
        fp32_share = r["saved_bytes"].get("float32", 0) / total
        summary[name] = {
            "saved_mb": total / 2**20,
            "saved_fp32_share": fp32_share,
            "groupnorm_out": r["groupnorm_out"],
            "output_dtype": r["pred_dtype"],
            "loss_rel_diff": abs(r["loss"] - ref["loss"]) / abs(ref["loss"]),
            "grad_rel_diff": grad_rel,
            "ms": r["ms"],
        }
        s = summary[name]
        norms = ", ".join(f"{k} {v}" for k, v in sorted(r["groupnorm_out"].items()))
        rows.append(
            [name, f"{s['saved_mb']:.1f}", f"{fp32_share:.0%}", norms, s["output_dtype"], f"{s['loss_rel_diff']:.1e}",
             f"{grad_rel:.1e}", s["ms"], s["ms"] / ref["ms"]]
        )  # fmt: skip
    print(
        f"\n{args.size} UNet ({benchlib.count_params(benchlib.build_unet(args.size, args.latent)) / 1e6:.2f}M), "
        f"batch {args.batch}, {args.latent}x{args.latent} latents, {args.device}; median of {args.reps}"
    )
    benchlib.print_table(
        ["policy", "saved MB", "fp32 share", "GroupNorm outputs", "UNet output", "|dloss|/loss", "grad rel diff",
         "fwd+bwd ms", "/ fp32"],
        rows,
    )  # fmt: skip
    load_after = benchlib.load_average()
    print(f"\nload average (1 min): {load_before:.2f} before, {load_after:.2f} after")
    benchlib.emit_json("precision", {**vars(args), "policies": summary, "load_avg_1m": [load_before, load_after]})
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
