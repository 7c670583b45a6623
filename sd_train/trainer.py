"""The training loop. A run is built (`Trainer(cfg)`: setup, data, model, optimizer, wrap), described
(`describe`: the plans, what the hot path runs), resumed (`resume`) and trained (`train`: the loop).

The loop only calls components; each decides its own cadence: `ema.update(step)` knows whether the
window is open, `checkpointer.save(step, ...)` whether a save is due, `metrics.should_log(step)`
whether to log, `evaluator.should_run(step)` whether to evaluate, and `StepSignals` carries the
votes the ranks agree on every step (stop on SIGTERM or Ctrl-C, save on the clock).

Launch (see docs/launching.md):
    python train.py --config configs/demo.yaml                     # one process (still FSDP2)
    accelerate launch --config_file launch/accelerate/cpu2.yaml train.py --config configs/test.yaml
    torchrun --nproc_per_node 8 train.py --config configs/sd2_base_256.yaml
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, Optional

import torch

from sd_train import console
from sd_train.checkpoint import Checkpointer
from sd_train.config import TrainConfig, config_to_dict, dump_config
from sd_train.data.buckets import bucket_set, pixel_factor
from sd_train.data.health import data_health
from sd_train.data.loader import build_train_loader
from sd_train.data.precomputed import sample_posterior
from sd_train.data.prefetch import stager_for
from sd_train.ema.plan import plan_from_config, posthoc_plan_from_config
from sd_train.ema.posthoc import PowerEMAProfiles
from sd_train.ema.sharded import ShardedEMA
from sd_train.errors import (
    BadDataError,
    CheckpointLoadError,
    ConfigError,
    NonFiniteError,
)
from sd_train.evaluation import Evaluator
from sd_train.export import export_checkpoint
from sd_train.faults import FaultInjector
from sd_train.host_sync import COUNTER as HOST_SYNCS
from sd_train.host_sync import read_float
from sd_train.langevin import LangevinNoise
from sd_train.metrics import KeyLog, Progress, StepWindow, build_metrics
from sd_train.model.conditioning import Conditioning, stored_conditioning
from sd_train.model.parts import as_step_input, encode_pixels, encode_text, encode_tokens, load_sd_parts
from sd_train.objective import DiffusionObjective
from sd_train.optim import build_lr_schedule, build_optimizer
from sd_train.parallel.build import build_strategy, write_topology
from sd_train.parallel.process_group import (
    all_gather_object,
    all_reduce_max,
    barrier,
    destroy,
    init_distributed,
    reduce_tensor_,
)
from sd_train.paths import POSTHOC_DIR, checkpoint_is_complete, complete_steps, snapshot_steps, step_dir
from sd_train.perf import (
    apply_backend_flags,
    bucket_flops_per_image,
    micro_batch_flops,
    peak_tflops,
    static_shapes_for_buckets,
    training_flops_per_image,
    use_fused_adamw,
)
from sd_train.rng import RankRNG, seed_all
from sd_train.run_lock import OutputDirLock
from sd_train.run_summary import RunSummary
from sd_train.step_signals import INTERRUPTED_EXIT, StepSignals, StepVotes, StopRequests
from sd_train.train_state import DataPosition, StepResult, TrainState

log = logging.getLogger(__name__)


class Trainer:
    """Owns the components of one run and the loop that drives them."""

    # ---- build -----------------------------------------------------------------------------------

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.started = time.monotonic()
        self.info = init_distributed(cfg.dist)
        console.set_rank(self.info.rank)
        self.cfg = cfg = self._agreed_async_save(cfg)
        self.backend_flags = apply_backend_flags(cfg.perf, self.info.device)
        self.out = Path(cfg.output_dir)
        self._prepare_output_dir()
        self.faults = FaultInjector(self.info.rank)
        self.stop_requests = StopRequests(self.info.is_main)
        self.faults.stop_requested = self.stop_requests.requested
        seed_all(cfg.seed + self.info.rank)  # per-rank noise/timesteps; weights come from the folder or `seed`
        self.accum = cfg.grad_accum_steps(self.info.world_size)

        frozen_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
        self.parts = load_sd_parts(cfg.model, self.info.device, cfg.seed, frozen_dtype)
        # data.buckets: the same set the loader builds (a torch-free read of the model's configs).
        self.buckets = (
            bucket_set(cfg.data, pixel_factor(cfg.model.pretrained_path)) if cfg.data.buckets != "none" else None
        )
        self.bucket_flops: dict[tuple[int, int], float] = {}
        """data.buckets: forward+backward FLOPs per image by latent (h, w), counted once at startup."""
        self.flops_per_image = self._count_flops() if cfg.perf.count_flops else None
        if cfg.perf.compile and self.buckets is not None:
            static_shapes_for_buckets(len(self.buckets.sizes))
        self.peak_tflops = peak_tflops(cfg.perf, self.info.device)
        self.strategy = build_strategy(cfg, self.info, self.accum)
        self.fused = use_fused_adamw(cfg.perf, self.info.device)
        # Counted before wrapping: ZeRO-3 leaves the module's parameters empty (numel 0).
        self.num_params = sum(p.numel() for p in self.parts.unet.parameters() if p.requires_grad)
        self.strategy.wrap(self.parts.unet, lambda module: build_optimizer(module, cfg.optim, fused=self.fused))
        self.model, self.optimizer = self.strategy.model, self.strategy.optimizer
        # The inputs' dtype follows the params the forward reads: bf16 in DeepSpeed's bf16 mode,
        # which casts the module but not its inputs (FSDP2 keeps fp32 params and casts both itself).
        self.parts.step_dtype = next(self.strategy.module.parameters()).dtype
        self.lr_schedule = build_lr_schedule(self.optimizer, cfg.optim, cfg.max_steps)
        # Both plans were checked by sd_train.preflight before any process group started.
        self.plan = plan_from_config(cfg.ema, cfg.max_steps)
        self.ema = ShardedEMA(self.strategy.module, self.plan, self.strategy.ema_layout())
        ema_start = self.plan.step_start_ema if self.plan.enabled else None
        self.langevin = LangevinNoise(cfg.optim.langevin, cfg.seed, cfg.optim.lr, ema_start, self.strategy)
        self.posthoc_plan = posthoc_plan_from_config(cfg.ema, cfg.max_steps)
        self.posthoc = (
            PowerEMAProfiles(self.strategy.module, self.posthoc_plan, self.strategy.ema_layout())
            if self.posthoc_plan.enabled
            else None
        )
        empty = encode_text(self.parts, [""], self.info.device).map(lambda t: as_step_input(t, self.parts.step_dtype))
        self.objective = DiffusionObjective(cfg.objective, self.parts.noise_scheduler.alphas_cumprod, empty)

        self.loader = build_train_loader(
            cfg,
            self.info.rank,
            self.info.world_size,
            tokenize=self.parts.caption_tokenizer(),
            stager=stager_for(self.info.device, cfg.perf.device_prefetch),
            rank_param_bytes=self.strategy.topology()["local_param_bytes"],
        )
        self.metrics = build_metrics(cfg.metrics, cfg.output_dir, cfg.run_name or self.out.name, self.info.is_main)
        self.evaluator = Evaluator(cfg, self.parts, self.objective, self.info, self.ema, self.metrics, self.out)
        self.evaluator.fault_hook = lambda phase, step: self.faults.trip(phase, step)
        if not cfg.data.precomputed:
            self.parts.load("vae", *self.parts.text_encoder_names)  # the step runs them all
        else:
            # The step reads stored latents and embeddings: the text encoder was needed only for
            # the empty caption and the evaluator's fixed inputs, the VAE only to decode samples.
            self.parts.release(
                *self.parts.text_encoder_names, *(() if self.evaluator.sampler is not None else ("vae",))
            )
        self.state = TrainState()
        self.start_step = 0  # where this launch began (set by `resume`)
        self.checkpointer = self._build_checkpointer()
        self.key_log = KeyLog(self.out, self.info.rank, cfg.data.log_keys)
        self.signals = StepSignals(self.stop_requests, self.checkpointer.clock_vote, self.info.device)
        self.window = StepWindow(
            cfg.global_batch_size,
            self.info.device,
            self.info.world_size,
            self.flops_per_image,
            self.peak_tflops,
            step_flops=bool(self.bucket_flops),
        )
        self.progress = Progress(self.info.is_main, cfg.max_steps)
        self.end_summary: Optional[RunSummary] = None  # the main process's, once the run finished

    def _agreed_async_save(self, cfg: TrainConfig) -> TrainConfig:
        """`cfg` with the ranks agreed on async saves. `checkpoint.async_save=auto` was decided by
        each rank's memory plan before the process group existed, and a rank that planned before
        its node's step estimate was cached may have decided otherwise; the async saver's group is
        created collectively, so saves are synchronous everywhere if they are anywhere."""
        if self.info.world_size == 1:
            return cfg
        (sync_somewhere,) = all_reduce_max([0.0 if cfg.checkpoint.async_save else 1.0], self.info.device)
        if not (sync_somewhere and cfg.checkpoint.async_save):
            return cfg
        log.info("checkpoint.async_save=auto: synchronous saves (another rank's memory plan chose them)")
        return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, async_save=False))

    def _build_checkpointer(self) -> Checkpointer:
        """Everything a checkpoint holds, registered once: the tensors (through the Strategy), the
        shadows, the shared progress and schedule, each rank's RNG and data position, the config."""
        cfg = self.cfg
        checkpointer = Checkpointer(
            cfg.checkpoint,
            cfg.output_dir,
            self.info.rank,
            self.info.world_size,
            cfg.max_steps,
            self.strategy,
            {"ema": self.ema, **({"posthoc": self.posthoc} if self.posthoc is not None else {})},
            global_states={"train": self.state, "lr_scheduler": self.lr_schedule},
            rank_states={
                "rng": RankRNG(cfg.seed, self.info.rank, lambda: self.state.step),
                "data": DataPosition(self.loader, self.info.device),
            },
            config=config_to_dict(cfg),
        )
        checkpointer.fault_hook = lambda phase, step: self.faults.trip(phase, step)
        return checkpointer

    def _prepare_output_dir(self) -> None:
        """The run folder and the resolved config in it, before any rank writes there. First the
        output_dir lock: one launch per folder, taken by rank 0 while the other ranks wait for its
        answer (sd_train.run_lock)."""
        self.out_lock = OutputDirLock(self.cfg.output_dir)
        refused = all_gather_object(self.out_lock.acquire() if self.info.is_main else None)[0]
        if refused is not None:
            raise ConfigError(refused)  # output_dir is in use: exit 2, like any refused config
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.out / "config.yaml")
        barrier()

    def _count_flops(self) -> float:
        """Forward+backward FLOPs of one training image at this run's shape, on the plain UNet
        before it is wrapped (sd_train.perf.training_flops_per_image). With data.buckets, per bucket
        (`bucket_flops`), and the largest bucket's figure is returned."""
        unet, parts = self.parts.unet, self.parts
        text = (parts.token_length, parts.text_width)
        if self.buckets is not None:
            f = parts.latent_downsampling
            latents = [(h // f, w // f) for h, w in self.buckets.sizes]
            self.bucket_flops = bucket_flops_per_image(unet, latents, text, self.info.device)
            return self.bucket_flops[latents[self.buckets.largest()]]
        latent = self.cfg.data.resolution // parts.latent_downsampling
        return training_flops_per_image(unet, (unet.config.in_channels, latent, latent), text, self.info.device)

    # ---- describe ---------------------------------------------------------------------------------

    def describe(self) -> None:
        """Say what this run will do (main process): the EMA and post-hoc plans and the hot path,
        also written to ema_plan.json, the config row of metrics.jsonl and topology.json (collective)."""
        figures = self.plan.figures()
        live_numel = None
        if self.posthoc is not None:
            live_numel = sum(v.numel() for v in self.posthoc.layout.views(self.posthoc.named_params))
            figures.update(self.posthoc_plan.figures(self.num_params, self.info.world_size, live_numel))
        self.metrics.log_config(config_to_dict(self.cfg), figures)
        log.info(self.plan.describe())
        log.info(self._describe_hot_path())
        if self.buckets is not None:  # the set, its largest bucket (the activation peak), FLOPs per bucket
            f = self.parts.latent_downsampling
            gflops = [self.bucket_flops.get((h // f, w // f), 0.0) / 1e9 for h, w in self.buckets.sizes]
            log.info(f"buckets: {self.buckets.describe(gflops if self.bucket_flops else None)}")
        if self.posthoc is not None:
            log.info(self.posthoc_plan.describe(self.num_params, self.info.world_size, live_numel))
        if self.info.is_main:
            (self.out / "ema_plan.json").write_text(json.dumps(figures, indent=1))
        cfg = self.cfg
        write_topology(
            self.out / "topology.json",
            self.strategy,
            self.info,
            {"strategy": cfg.dist.strategy, "zero_stage": cfg.dist.zero_stage, "grad_accum_steps": self.accum},
        )

    def _describe_hot_path(self) -> str:
        flops = f"{self.flops_per_image / 1e9:.2f} GFLOP" if self.flops_per_image else "not counted"
        flops += " (the largest bucket)" if self.bucket_flops else ""
        peak = f"{self.peak_tflops:g} TFLOP/s per device" if self.peak_tflops else "unknown (no speed/mfu)"
        flags = ", ".join(f"{k}={v}" for k, v in self.backend_flags.items())
        frozen = ", ".join(self.parts.resident()) or "none"
        vae_dtype = self.parts.vae_dtype
        vae = f"VAE {str(vae_dtype).removeprefix('torch.')}, " if vae_dtype != self.parts.frozen_dtype else ""
        cfg = self.cfg
        precision = f"params {cfg.dist.param_dtype}" + (" under bf16 autocast" if cfg.autocast_bf16() else "")
        return (
            f"hot path: {self.info.device.type}, {precision}, AdamW {'fused' if self.fused else 'foreach'}"
            f"{' (non-finite skip in the kernel)' if self.strategy.skip_on_device else ''}, {flags}, "
            f"compile={self.cfg.perf.compile}, channels_last={self.cfg.perf.channels_last}, "
            f"device_prefetch={self.loader.stager.lookahead > 0}; "
            f"frozen encoders {str(self.parts.frozen_dtype).removeprefix('torch.')} under inference_mode, {vae}"
            f"resident for the step: {frozen}; forward+backward per image {flops}; peak {peak}"
        )

    # ---- resume -----------------------------------------------------------------------------------

    def resume(self) -> None:
        """Load the newest complete checkpoint of this run (or start from checkpoint.init_from), and
        make metrics.jsonl read forward from the step this launch starts at."""
        # Refusals (resume=none over checkpoints, another backend's checkpoint) come from preflight.
        loaded = self.checkpointer.load()
        if loaded is None and self.cfg.checkpoint.init_from:
            self.checkpointer.init_from(Path(self.cfg.checkpoint.init_from))
        elif loaded is not None and self.cfg.checkpoint.init_from:
            log.info(f"checkpoint.init_from ignored: this run already has checkpoints ({loaded.folder})")
        event = None
        if loaded is not None:
            log.info(
                f"resumed from {loaded.folder} at step {self.state.step} "
                f"(saved by {loaded.saved_world_size} ranks, now {self.info.world_size})"
            )
            event = {
                "event": "resumed",
                "from": str(loaded.folder),
                "saved_world_size": loaded.saved_world_size,
                "world_size": self.info.world_size,
            }
        self.start_step = self.state.step
        self.metrics.start(self.state.step, event)

    # ---- one optimizer step ------------------------------------------------------------------------

    def _encode(self, batch: dict) -> tuple[torch.Tensor, Conditioning]:
        """(latents, conditioning) of a batch, as contiguous tensors of the step's dtype (SDXL's
        time ids from the batch's geometry)."""
        dev, dtype = self.info.device, self.parts.step_dtype
        if "latent_mean" in batch:  # precomputed shards (sd-train precompute): the stored posterior
            # is sampled here, on device, from the checkpointed global RNG, with the call
            # `encode_pixels` makes: the same random numbers as online encoding, bitwise.
            # Copied as stored (fp16 shards stay fp16 on the wire) without blocking the host (the
            # loader pins its batches; with the device prefetch they are already there), then
            # converted on the device.
            mean = batch["latent_mean"].to(dev, non_blocking=True).to(dtype)
            std = batch["latent_std"].to(dev, non_blocking=True).to(dtype)
            latents = sample_posterior(mean, std, self.parts.vae_scale).contiguous()
            return latents, stored_conditioning(batch, dev, dtype)
        # The frozen encoders run under inference_mode (in bf16 with mixed_precision=bf16); the
        # loader's workers tokenized the captions.
        latents = encode_pixels(self.parts, batch["pixels"], dev)
        cond = encode_tokens(self.parts, batch, dev).map(lambda t: as_step_input(t, dtype))
        return as_step_input(latents, dtype), cond.with_geometry(batch)

    def train_step(self, data_iter: Iterator[dict]) -> StepResult:
        """Accumulate gradients over micro-batches, then step unless any rank saw a non-finite
        value; the Strategy's step is the agreement (see Strategy.step). Its read of the grad
        norm (with the step's votes) is the step's only host sync: the loss stays on the device
        until a logged step reads it."""
        cfg = self.cfg
        syncs_before = HOST_SYNCS.count
        window = self.window
        window.step_started()
        step = self.state.step + 1
        self.optimizer.zero_grad(set_to_none=True)
        # float64, summed micro-batch by micro-batch: the same value, bit for bit, as the Python
        # float sum of each micro-batch's loss that this replaced.
        local_loss = torch.zeros((), dtype=torch.float64, device=self.info.device)
        data_wait, keys, flops = 0.0, [], 0.0
        autocast = torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16())
        for micro in range(self.accum):
            t = time.perf_counter()
            batch = next(data_iter)
            data_wait += time.perf_counter() - t
            keys.extend(batch.get("keys", []))
            with window.phase("forward_backward"):
                latents, cond = self._encode(batch)
                flops += micro_batch_flops(self.bucket_flops, latents)
                last = micro == self.accum - 1
                self.strategy.set_grad_sync(last)
                with autocast:
                    loss = self.objective.loss(self.model, latents, cond) / self.accum
                if self.faults.trip("mid_step", step):
                    loss = loss * float("nan")
                self.strategy.backward(loss, last)
                local_loss += loss.detach().double()
        with window.phase("optimizer"):
            self.checkpointer.wait_staged()  # an async save's copy must be done before the weights change
            finite, grad_norm, votes = self.strategy.step([self.signals.reduced()])
            # Freed now rather than at the next step's start: the EMA update, evaluation and
            # checkpoint saves in between then hold no gradients (SD2 at 2 ranks: 1.6 GiB per rank).
            self.optimizer.zero_grad(set_to_none=True)
        if finite:
            if self.langevin.enabled:
                with window.phase("noise"):  # optim.langevin: with the LR this step was taken with
                    self.langevin.after_step(step, self.lr_schedule.get_last_lr()[0])
            self.lr_schedule.step()
            self.state.step = step
            self.state.consecutive_skips = 0
            self.state.samples_seen += cfg.global_batch_size
            with window.phase("ema"):
                self.ema.update(step)
                if self.posthoc is not None:
                    self.posthoc.update(step)
        else:
            self._skip(step, local_loss)
        self.key_log.record(step, finite, keys)
        return StepResult(local_loss, grad_norm, data_wait, finite, StepSignals.agreed(votes), syncs_before, flops)

    def _skip(self, step: int, local_loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.state.skipped_steps += 1
        self.state.consecutive_skips += 1
        bad_ranks = [r for r, v in enumerate(all_gather_object(math.isfinite(read_float(local_loss)))) if not v]
        where = f"rank(s) {bad_ranks}" if bad_ranks else "a gradient (losses were finite)"
        log.warning(
            f"step {step}: non-finite loss/gradient on {where}; step skipped "
            f"(weights, optimizer, LR schedule and EMA untouched)"
        )
        if self.state.consecutive_skips >= self.cfg.max_consecutive_skips:
            raise NonFiniteError(
                f"{self.state.consecutive_skips} consecutive non-finite steps, the last at step {step} on {where}; "
                "stopping without writing a checkpoint. Lower optim.lr or check the data"
            )

    # ---- what is due after a step -----------------------------------------------------------------

    def after_step(self, result: StepResult) -> StepVotes:
        """Everything whose cadence may fall on this step, each component deciding: log, evaluate,
        snapshot the post-hoc profiles, save. Returns the stop votes the ranks agree on: those read
        with the step, or, on steps that read the host anyway, asked once more after the save."""
        step, taken = self.state.step, result.taken
        self.window.step_ended(result.data_wait, taken, result.flops)
        self.progress.advance(taken)
        logged = self.metrics.should_log(step) and taken or step == self.cfg.max_steps
        if logged:
            self.log_step(step, result)
        evaluated = self.evaluator.should_run(step) and taken
        with self.window.excluded():  # img/s per GPU counts training time only
            if evaluated:
                self.metrics.log(step, self.evaluator.run(step, self.model))
            if self.posthoc is not None:
                self.posthoc.maybe_snapshot(self.out / POSTHOC_DIR, step, self.info.rank)
            saved = self.checkpointer.save(step, clock_due=result.votes.clock_due)
            self._log_saves(step)
        synced = logged or evaluated or saved
        if not synced:
            self.window.count_host_syncs(HOST_SYNCS.count - result.syncs_before)
        if result.votes.stop or not synced:
            return result.votes
        return self.signals.agree_now()

    def data_health(self) -> dict:
        """The run's data figures over all ranks, stopping above data.max_bad_fraction (a collective)."""
        return data_health(self.loader, self.cfg.data, self.info.device)

    def log_step(self, step: int, result: StepResult) -> None:
        """The logged figures of a step: the loss averaged over ranks, optimizer, speed window, EMA
        and data health (the last two are collectives, so every rank calls this at the same steps)."""
        loss = read_float(reduce_tensor_(result.loss.clone()))
        values = {
            "train/loss": loss / self.info.world_size,
            "optim/lr": self.lr_schedule.get_last_lr()[0],
            "optim/grad_norm": result.grad_norm,
            "optim/skipped_steps": self.state.skipped_steps,
            **({"optim/noise_std": self.langevin.last_std} if self.langevin.enabled else {}),
            **self.window.read(),
            "ema/open": self.ema.is_open,
            "ema/updates": self.ema.num_updates,
            "ema/local_bytes": self.ema.local_bytes(),
            **self.data_health(),
        }
        self.metrics.log(step, values)
        self.progress.show(loss=f"{values['train/loss']:.4f}", img_s=f"{values['speed/img_per_s']:.1f}")

    def _log_saves(self, step: int) -> None:
        """The figures of each save finished by now (rank 0's times; only the main process logs)."""
        for figures in self.checkpointer.take_figures():
            self.metrics.log(step, figures)

    # ---- the loop ---------------------------------------------------------------------------------

    def train(self) -> int:
        """Train to max_steps, or until the ranks agree to stop. Returns the exit code."""
        data_iter = self._begin()
        while self.state.step < self.cfg.max_steps:
            votes = self.after_step(self.train_step(data_iter))
            if votes.stop:
                return self._stop(votes)
        return self._finish()

    def _begin(self) -> Iterator[dict]:
        """Before the first step of this launch: the key log's launch marker, the step-0 baseline
        held-out loss of a new run, the progress bar, and Ctrl-C armed to save and stop."""
        self.key_log.start(self.state.step)
        if self.state.step == 0 and self.evaluator.validator is not None:  # the baseline the run must beat
            self.metrics.log(0, self.evaluator.baseline(self.model))
        data_iter = iter(self.loader)
        self.progress.start(self.state.step)
        self.window.restart()
        self.stop_requests.arm_interrupt()
        return data_iter

    def _stop(self, votes: StepVotes) -> int:
        """Every rank saves the step they stopped at, together; exit 0 after SIGTERM (a preemption
        or time limit: the job is requeued), 130 after Ctrl-C."""
        step = self.state.step
        self.checkpointer.save(step, force=True)
        self.checkpointer.wait()
        self._log_saves(step)
        self.progress.close()
        if votes.terminated:
            log.info(f"preempted (SIGTERM): saved a complete checkpoint at step {step}; exiting 0")
            return 0
        log.info(f"interrupted at step {step}; saved step {step}; rerun the same command to resume")
        return INTERRUPTED_EXIT

    def _finish(self) -> int:
        """After the last step: the last save, the data summary, the export, the run summary."""
        self.progress.close()
        self.checkpointer.wait()
        self._log_saves(self.state.step)
        health = self.data_health()
        if self.info.is_main:
            summary = {"step": self.state.step, "skipped_steps": self.state.skipped_steps, **health}
            (self.out / "data_summary.json").write_text(json.dumps(summary, indent=1))
            # Printed by `run` once the export (after the process group is gone) has said its paths.
            self.end_summary = self.summary(health)
        return 0

    def export_job(self) -> Optional[Callable[[], list[Path]]]:
        """The end-of-run export, for the main process to run once the process group is gone and
        this trainer is freed (`run`): it reads the final checkpoint, so it holds one UNet at a time
        instead of the training state plus the gathered raw UNet and EMA. None where nothing is due
        (export_at_end off, another rank, or a run stopped before max_steps)."""
        cfg, step = self.cfg, self.state.step
        if not (cfg.export_at_end and self.info.is_main and step == cfg.max_steps):
            return None
        folder, out, faults = step_dir(self.checkpointer.root, step), self.out / "export", self.faults
        if not checkpoint_is_complete(folder) and self.checkpointer.loaded_folder is not None:
            folder = self.checkpointer.loaded_folder  # resumed at its last step from another run's folder
        return lambda: export_checkpoint(
            folder,
            cfg.model.pretrained_path,
            out,
            cfg.objective.prediction_type,
            before_write=lambda: faults.trip("export_write", step),
            zero_dropped_captions=cfg.objective.zero_dropped_captions,
        )

    def summary(self, health: dict) -> RunSummary:
        """The end-of-run figures (main process: the logged values are its own); `run` adds the
        export's paths."""
        latest = self.metrics.latest

        def last(name: str):
            return latest.get(name)

        return RunSummary(
            output_dir=self.out,
            step=self.state.step,
            start_step=self.start_step,
            skipped_steps=self.state.skipped_steps,
            world_size=self.info.world_size,
            wall_s=time.monotonic() - self.started,
            img_per_s_per_device=self.window.run_img_per_s_per_device(),
            train_loss=last("train/loss"),
            val_raw=last("val/loss_raw"),
            val_ema=last("val/loss_ema"),
            checkpoints=[step_dir(self.checkpointer.root, s) for s in complete_steps(self.checkpointer.root)],
            samples_read=health["data/samples_read"],
            bad={
                k.removeprefix("data/bad_"): v
                for k, v in health.items()
                if k.startswith("data/bad_") and k != "data/bad_shards"
            },
            filtered=health["data/filtered"],
            posthoc_snapshots=len(snapshot_steps(self.out / POSTHOC_DIR)) if self.posthoc is not None else 0,
        )

    def close(self) -> None:
        self.checkpointer.close()
        destroy()
        # The sample grids still being written: waited for with no process group left, so a slow
        # disk on the main process keeps no peer in a collective.
        self.evaluator.close()
        self.metrics.close()
        # The output_dir lock stays held: `run` releases it after the export written into output_dir.


# Raised on every rank alike (each is decided collectively), so the main process alone reports them.
KNOWN_ERRORS: tuple = (NonFiniteError, CheckpointLoadError, BadDataError)


def run(cfg: TrainConfig) -> int:
    """Build, describe, resume and train with a validated, resolved config (from
    sd_train.entry.validated_config: no `auto` strategy left). Returns the exit code.

    A rank that fails leaves with os._exit: its peers may be blocked in a collective with it, and
    a graceful teardown (destroy_process_group, loader workers, atexit) can then block forever,
    while our SIGTERM handler would keep the launcher from killing it. The launcher sees the
    non-zero exit and stops the other ranks."""
    trainer = None
    try:
        trainer = Trainer(cfg)
        trainer.describe()
        trainer.resume()
        rc = trainer.train()
        export = trainer.export_job()
    except ConfigError as e:
        _die(2, f"config error: {e}", main_only=True)
    except KNOWN_ERRORS as e:
        _die(1, f"error: {e}", main_only=True)
    except KeyboardInterrupt:  # Ctrl-C before the loop armed its handler: nothing new to save
        _die(INTERRUPTED_EXIT, "interrupted before the first step of this launch: nothing to save", main_only=True)
    except BaseException:
        traceback.print_exc()
        _die(1, "error: training failed (traceback above)")
    trainer.close()
    summary, out_lock = trainer.end_summary, trainer.out_lock
    if export is not None:
        del trainer  # the model, optimizer and EMA go before the export reads a UNet
        gc.collect()
        try:
            started = time.perf_counter()
            paths = export()
            log.info(f"exported: {', '.join(str(p) for p in paths)} in {time.perf_counter() - started:.1f} s")
        except BaseException:
            traceback.print_exc()
            _die(1, "error: the export of the final checkpoint failed (traceback above)")
        if summary is not None:
            summary.exports = list(paths)
    out_lock.release()  # after the export: a second launch must not start while it writes export/
    if summary is not None:
        log.info(summary.format())
    return rc


def _die(code: int, message: str, main_only: bool = False) -> None:
    if console.is_main() or not main_only:
        print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)
