"""The training loop. It reads top to bottom: setup, data, model, optimizer, wrap, resume, loop.

The loop only calls components; each decides its own cadence: `ema.update(step)` knows whether the
window is open, `checkpointer.save(step, ...)` whether a save is due, `metrics.should_log(step)`
whether to log, `self.eval_due(step)` whether to evaluate.

Launch (see README):
    python train.py --config configs/demo.yaml                     # one process (still FSDP2)
    accelerate launch --config_file launch/accelerate/cpu2.yaml train.py --config configs/test.yaml
    torchrun --nproc_per_node 8 train.py --config configs/sd2_base.yaml
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from sd_train import distributed as D
from sd_train.checkpoint import CheckpointLoadError, Checkpointer
from sd_train.config import ConfigError, TrainConfig, config_to_dict, dump_config
from sd_train.data.bad_input import BadDataError
from sd_train.data.precomputed import sample_posterior
from sd_train.ema import ShardedEMA
from sd_train.ema_plan import plan_from_config
from sd_train.evaluation import Sampler, Validator, save_grid
from sd_train.faults import FaultInjector
from sd_train.metrics import build_metrics
from sd_train.model import encode_pixels, encode_text, load_sd_parts
from sd_train.objective import DiffusionObjective
from sd_train.optim import build_lr_schedule, build_optimizer
from sd_train.rng import load_rng_state_dict, rng_state_dict, seed_all

log = logging.getLogger("sd_train")


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclass
class TrainState:
    """Progress that every rank shares; saved in trainer_state.json."""

    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


class Preemption:
    """SIGTERM sets a flag; the ranks agree on it once per step (any rank's signal counts), then
    save a complete checkpoint and exit 0. The handler itself does nothing else: no I/O in a signal
    handler, and no rank may leave a collective half-done."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        flag, = D.all_reduce_sum([1.0 if self.requested else 0.0], device)
        return flag > 0


class Trainer:
    """Owns the components of one run and the loop that drives them."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.info = D.init_distributed(cfg.dist)
        self.out = Path(cfg.output_dir)
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out / "config.yaml")
        D.barrier()
        self.faults = FaultInjector(self.info.rank)
        self.preemption = Preemption()
        seed_all(cfg.seed + self.info.rank)  # per-rank noise/timesteps; weights come from the folder or `seed`
        self.accum = cfg.grad_accum_steps(self.info.world_size)

        self.parts = load_sd_parts(cfg.model, self.info.device, cfg.seed)
        self.zero = None  # the DeepSpeed engine (sd_train.zero) when dist.strategy=deepspeed
        if cfg.dist.strategy == "deepspeed":
            from sd_train.zero import ZeroEngine

            self.optimizer = build_optimizer(self.parts.unet, cfg.optim)
            self.zero = ZeroEngine(self.parts.unet, self.optimizer, cfg, self.info, self.accum)
            self.model = self.zero.engine
        else:
            self.model = D.shard_unet(self.parts.unet, cfg.dist, self.info)
            self.optimizer = build_optimizer(self.model, cfg.optim)
        self.lr_schedule = build_lr_schedule(self.optimizer, cfg.optim, cfg.max_steps)
        self.plan = plan_from_config(cfg.ema, cfg.max_steps)
        self.plan.check()
        self.ema = ShardedEMA(D.unwrap(self.model), self.plan, self.zero.layout if self.zero else None)
        empty = encode_text(self.parts, [""], self.info.device)
        self.objective = DiffusionObjective(cfg.objective, self.parts.noise_scheduler.alphas_cumprod, empty)

        from sd_train.data.loader import build_train_loader

        self.loader = build_train_loader(cfg, self.info.rank, self.info.world_size)
        self.validator = Validator(cfg, self.parts, self.objective, self.info) if cfg.data.val_shards and cfg.eval.every_steps else None
        self.sampler = Sampler(cfg, self.parts, self.info) if cfg.eval.every_steps and cfg.eval.prompts else None
        self.checkpointer = Checkpointer(cfg.checkpoint, cfg.output_dir, self.info.rank, self.info.world_size, cfg.max_steps,
                                        zero=self.zero)
        self.checkpointer.fault_hook = lambda phase, step: self.faults.trip(phase, step)
        self.state = TrainState()
        self.metrics = build_metrics(cfg.metrics, cfg.output_dir, cfg.run_name or self.out.name, self.info.is_main)
        self.metrics.log_config(config_to_dict(cfg), self.plan.figures())
        if self.info.is_main:
            print(self.plan.describe(), flush=True)
            (self.out / "ema_plan.json").write_text(json.dumps(self.plan.figures(), indent=1))
        self._write_topology()
        self._resume()

    def _write_topology(self) -> None:
        """Record how the UNet is really laid out (world size, DTensor placements, local bytes):
        accelerate can silently run unsharded, so a run states what it did."""
        from torch.distributed.tensor import DTensor

        params = list(D.unwrap(self.model).named_parameters())
        if self.zero is not None:
            mine = {"rank": self.info.rank, **self.zero.topology()}
        else:
            mine = {
                "rank": self.info.rank,
                "local_param_bytes": sum(_local_numel(p) * p.element_size() for _, p in params),
                "placements": sorted({str(p.placements) if isinstance(p, DTensor) else "replicated" for _, p in params}),
                "all_dtensor": all(isinstance(p, DTensor) for _, p in params),
            }
        ranks = D.all_gather_object(mine)
        if self.info.is_main:
            topo = {"world_size": self.info.world_size, "backend": dist.get_backend(), "strategy": self.cfg.dist.strategy,
                    "zero_stage": self.cfg.dist.zero_stage,
                    "device": str(self.info.device), "grad_accum_steps": self.accum, "ranks": ranks}
            (self.out / "topology.json").write_text(json.dumps(topo, indent=1))

    # ---- state --------------------------------------------------------------------------------

    def global_state(self) -> dict:
        return {
            "train": self.state.state_dict(),
            "lr_scheduler": self.lr_schedule.state_dict(),
            "ema": self.ema.meta_state_dict(),
            "config": config_to_dict(self.cfg),
        }

    def rank_state(self) -> dict:
        return {"rng": rng_state_dict(), "data": self.loader.state_dict()}

    def _load_global(self, g: dict) -> None:
        self.state.load_state_dict(g["train"])
        self.lr_schedule.load_state_dict(g["lr_scheduler"])

    def _resume(self) -> None:
        if self.cfg.checkpoint.resume == "none" and self.checkpointer.candidates_exist():
            raise ConfigError(
                f"checkpoint.resume=none but {self.checkpointer.root} holds checkpoints: use a new output_dir, or resume=auto"
            )
        loaded = self.checkpointer.load(self.model, self.optimizer, self.ema, self._load_global)
        if loaded is None:
            return
        global_state, rank_state = loaded
        if rank_state is not None:
            load_rng_state_dict(rank_state["rng"])
            self.loader.load_state_dict(rank_state["data"])
        else:
            # World size changed: per-rank RNG streams and data positions have no counterpart.
            # Fresh per-rank seeds (mixed with the step so they differ from the run's start), and
            # the data stream moves on to the next epoch, agreed by all ranks (the loader warns).
            seed_all(self.cfg.seed + 7919 * self.state.step + self.info.rank)
            saved_world = int(global_state["world_size"])
            folder = self.checkpointer.loaded_folder
            old = torch.load(folder / f"rank_{min(self.info.rank, saved_world - 1)}.pt", weights_only=False)
            self.loader.load_state_dict(old["data"])
            epoch = int(D.all_reduce_max([float(self.loader.reshard_epoch or 0)], self.info.device)[0])
            self.loader.start_at_epoch(epoch)
        if self.info.is_main:
            print(f"resumed from {self.checkpointer.loaded_folder} at step {self.state.step} "
                  f"(saved by {global_state['world_size']} ranks, now {self.info.world_size})", flush=True)

    # ---- one optimizer step ------------------------------------------------------------------

    def _encode(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.info.device
        if "latent_mean" in batch:  # precomputed shards (sd_train.precompute): the stored posterior
            # is sampled here, on device, from the checkpointed global RNG, with the call
            # `encode_pixels` makes: the same random numbers as online encoding, bitwise.
            vae_dtype, text_dtype = self.parts.vae.dtype, self.parts.text_encoder.dtype
            mean, std = batch["latent_mean"].to(dev, vae_dtype), batch["latent_std"].to(dev, vae_dtype)
            latents = sample_posterior(mean, std, self.parts.vae_scale)
            embeds = batch["text_embeds"].to(dev, text_dtype)
        else:
            latents = encode_pixels(self.parts, batch["pixels"], dev)
            embeds = encode_text(self.parts, batch["captions"], dev)
        # One layout for both paths. The VAE returns channels_last latents for batches > 1 on CPU
        # (diffusers' attention reshape, kept by the convs after it), and the objective's randn_like
        # follows the layout: on a channels_last tensor torch draws other numbers and advances the
        # generator differently (measured). Contiguous latents make the noise independent of that.
        return latents.contiguous(), embeds

    def train_step(self, data_iter) -> dict:
        """Accumulate gradients over micro-batches, then step unless any rank saw a non-finite
        value. The global grad norm is the agreement: a NaN anywhere reaches every rank's norm
        through the gradient reduction, so all ranks skip together with no extra collective."""
        cfg, dev = self.cfg, self.info.device
        step = self.state.step + 1
        self.optimizer.zero_grad(set_to_none=True)
        local_loss, data_wait, keys = 0.0, 0.0, []
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
        for micro in range(self.accum):
            t = time.perf_counter()
            batch = next(data_iter)
            data_wait += time.perf_counter() - t
            keys.extend(batch.get("keys", []))
            latents, embeds = self._encode(batch)
            last = micro == self.accum - 1
            if self.zero is None:
                D.set_grad_sync(self.model, last)
            with autocast:
                loss = self.objective.loss(self.model, latents, embeds) / self.accum
            if self.faults.trip("mid_step", step):
                loss = loss * float("nan")
            if self.zero is not None:
                self.zero.backward(loss, last)
            else:
                loss.backward()
            local_loss += float(loss.detach())
        finite, grad_norm = self.zero.step() if self.zero is not None else self._clip_and_step()
        if finite:
            self.lr_schedule.step()
            self.state.step = step
            self.state.consecutive_skips = 0
            self.state.samples_seen += cfg.global_batch_size
            self.ema.update(step)
        else:
            self._skip(step, local_loss)
        if cfg.data.log_keys:
            with open(self.out / "keys" / f"rank{self.info.rank}.txt", "a") as f:
                f.write("".join(f"{step if finite else -step}\t{k}\n" for k in keys))
        return {"loss": local_loss, "grad_norm": grad_norm, "data_wait": data_wait, "finite": finite}

    def _clip_and_step(self) -> tuple[bool, float]:
        """FSDP2/DDP: clip to the global norm, and step only if it is finite."""
        max_norm = self.cfg.optim.max_grad_norm if self.cfg.optim.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        return finite, grad_norm

    def _skip(self, step: int, local_loss: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.state.skipped_steps += 1
        self.state.consecutive_skips += 1
        bad_ranks = [r for r, v in enumerate(D.all_gather_object(math.isfinite(local_loss))) if not v]
        where = f"rank(s) {bad_ranks}" if bad_ranks else "a gradient (losses were finite)"
        if self.info.is_main:
            print(f"WARNING: step {step}: non-finite loss/gradient on {where}; step skipped "
                  f"(weights, optimizer, LR schedule and EMA untouched)", flush=True)
        if self.state.consecutive_skips >= self.cfg.max_consecutive_skips:
            raise NonFiniteError(
                f"{self.state.consecutive_skips} consecutive non-finite steps, the last at step {step} on {where}; "
                "stopping without writing a checkpoint. Lower optim.lr or check the data"
            )

    # ---- side jobs with their own cadence -------------------------------------------------------

    def eval_due(self, step: int) -> bool:
        every = self.cfg.eval.every_steps
        return every > 0 and (step % every == 0 or step == self.cfg.max_steps)

    def evaluate(self, step: int) -> dict:
        out: dict = {}
        variants = [("raw", None)] + ([("ema", self.ema)] if self.ema.is_open else [])
        for name, ema in variants:
            ctx = ema.swapped_in() if ema is not None else _null()
            with ctx:
                if self.validator is not None:
                    out[f"val/loss_{name}"] = self.validator.loss(self.model)
                if self.sampler is not None:
                    images = self.sampler.sample(self.model)
                    if self.info.is_main:
                        path = save_grid(images, self.out / "samples" / f"step_{step:08d}_{name}.png")
                        self.metrics.log_image(step, f"samples/{name}", str(path))
        return out

    def data_health(self) -> dict:
        """Sum bad-sample counts over ranks and stop above data.max_bad_fraction."""
        from sd_train.data.bad_input import check_bad_fraction

        counts = self.loader.bad_counts()
        names = sorted(counts)
        summed = D.all_reduce_sum([counts[n] for n in names] + [self.loader.samples_read()], self.info.device)
        totals = {n: int(v) for n, v in zip(names, summed)}
        read = int(summed[-1])
        shards = sorted({s for lst in D.all_gather_object(self.loader.bad_shards()) for s in lst})
        check_bad_fraction(totals, read, self.cfg.data.max_bad_fraction, self.cfg.data.min_samples_for_bad_check, shards)
        return {"data/samples_read": read, "data/bad_shards": shards, **{f"data/bad_{n}": v for n, v in totals.items()}}

    # ---- the loop ------------------------------------------------------------------------------

    def train(self) -> int:
        cfg = self.cfg
        if cfg.data.log_keys:
            (self.out / "keys").mkdir(parents=True, exist_ok=True)
            with open(self.out / "keys" / f"rank{self.info.rank}.txt", "a") as f:
                f.write(f"# start\t{self.state.step}\n")  # a relaunch may recompute steps after it
        if self.state.step == 0 and self.validator is not None:  # the baseline the run must beat
            self.metrics.log(0, {"val/loss_raw": self.validator.loss(self.model)})
        data_iter = iter(self.loader)
        bar = _progress(self.info.is_main, self.state.step, cfg.max_steps)
        window_t, window_wait, window_samples = time.perf_counter(), 0.0, 0
        while self.state.step < cfg.max_steps:
            t0 = time.perf_counter()
            result = self.train_step(data_iter)
            step = self.state.step
            window_wait += result["data_wait"]
            window_samples += cfg.global_batch_size if result["finite"] else 0
            bar.update(1 if result["finite"] else 0)
            if self.metrics.should_log(step) and result["finite"] or step == cfg.max_steps:
                loss, = D.all_reduce_sum([result["loss"]], self.info.device)
                elapsed = time.perf_counter() - window_t
                values = {
                    "train/loss": loss / self.info.world_size,
                    "optim/lr": self.lr_schedule.get_last_lr()[0],
                    "optim/grad_norm": result["grad_norm"],
                    "optim/skipped_steps": self.state.skipped_steps,
                    "speed/img_per_s": window_samples / elapsed,
                    "speed/step_time_s": time.perf_counter() - t0,
                    "speed/data_wait_share": window_wait / elapsed,
                    "memory/peak_gb": _peak_memory_gb(self.info.device),
                    "ema/open": self.ema.is_open,
                    "ema/updates": self.ema.num_updates,
                    "ema/local_bytes": self.ema.local_bytes(),
                    **self.data_health(),
                }
                self.metrics.log(step, values)
                bar.set_postfix(loss=f"{values['train/loss']:.4f}", img_s=f"{values['speed/img_per_s']:.1f}")
                window_t, window_wait, window_samples = time.perf_counter(), 0.0, 0
            if self.eval_due(step) and result["finite"]:
                self.metrics.log(step, self.evaluate(step))
            self.checkpointer.save(step, self.model, self.optimizer, self.ema, self.global_state(), self.rank_state())
            if self.preemption.agreed(self.info.device):
                self.checkpointer.save(step, self.model, self.optimizer, self.ema, self.global_state(), self.rank_state(), force=True)
                self.checkpointer.wait()
                if self.info.is_main:
                    print(f"preempted (SIGTERM): saved a complete checkpoint at step {step}; exiting 0", flush=True)
                return 0
        bar.close()
        self.checkpointer.wait()
        self.finish()
        return 0

    def finish(self) -> None:
        health = self.data_health()
        if self.info.is_main:
            summary = {"step": self.state.step, "skipped_steps": self.state.skipped_steps, **health}
            (self.out / "data_summary.json").write_text(json.dumps(summary, indent=1))
        if self.cfg.export_at_end:
            from sd_train.export import export_from_training, full_model_state

            if self.zero is not None:
                gather = lambda: self.zero.full_model_state(self.info.is_main)  # noqa: E731
            else:
                gather = lambda: full_model_state(self.model)  # noqa: E731
            paths = export_from_training(gather, self.ema, self.cfg.model.pretrained_path, self.out / "export",
                                         self.cfg.objective.prediction_type, self.info.is_main)
            if self.info.is_main:
                print("exported:", ", ".join(str(p) for p in paths), flush=True)

    def close(self) -> None:
        self.metrics.close()
        D.destroy()


def _local_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


KNOWN_ERRORS: tuple = (NonFiniteError, CheckpointLoadError, BadDataError)


class _null:
    def __enter__(self):
        return False

    def __exit__(self, *exc):
        return False


def _progress(enabled: bool, start: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, dynamic_ncols=True, desc="train")


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def run(cfg: TrainConfig) -> int:
    """Train with an already validated config (sd_train.entry.main validates it first).

    A rank that fails leaves with os._exit: its peers may be blocked in a collective with it, and
    a graceful teardown (destroy_process_group, loader workers, atexit) can then block forever,
    while our SIGTERM handler would keep the launcher from killing it. The launcher sees the
    non-zero exit and stops the other ranks."""
    trainer = None
    try:
        trainer = Trainer(cfg)
        rc = trainer.train()
    except ConfigError as e:
        _die(2, f"config error: {e}")
    except KNOWN_ERRORS as e:
        _die(1, f"error: {e}")
    except BaseException:
        traceback.print_exc()
        _die(1, "error: training failed (traceback above)")
    trainer.close()
    return rc


def _die(code: int, message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    from sd_train.entry import main as entry_main

    return entry_main(argv)
