"""The training loop. It reads top to bottom: setup, data, model, optimizer, wrap, resume, loop.

The loop only calls components; each decides its own cadence: `ema.update(step)` knows whether the
window is open, `checkpointer.save(step, ...)` whether a save is due, `metrics.should_log(step)`
whether to log, `evaluator.should_run(step)` whether to evaluate.

Launch (see docs/launching.md):
    python train.py --config configs/demo.yaml                     # one process (still FSDP2)
    accelerate launch --config_file launch/accelerate/cpu2.yaml train.py --config configs/test.yaml
    torchrun --nproc_per_node 8 train.py --config configs/sd2_base_256.yaml
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
from tqdm import tqdm

from sd_train.checkpoint import Checkpointer
from sd_train.config import TrainConfig, config_to_dict, dump_config
from sd_train.data.bad_input import check_bad_fraction
from sd_train.data.decode import CaptionTokenizer
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
from sd_train.export import export_from_training
from sd_train.faults import FaultInjector
from sd_train.host_sync import COUNTER as HOST_SYNCS
from sd_train.host_sync import read_float
from sd_train.metrics import KeyLog, StepWindow, build_metrics
from sd_train.model.parts import as_step_input, encode_pixels, encode_text, encode_tokens, load_sd_parts
from sd_train.objective import DiffusionObjective
from sd_train.optim import build_lr_schedule, build_optimizer
from sd_train.parallel.build import build_strategy, write_topology
from sd_train.parallel.process_group import (
    all_gather_object,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    destroy,
    init_distributed,
    reduce_tensor_,
)
from sd_train.paths import POSTHOC_DIR
from sd_train.perf import apply_backend_flags, peak_tflops, training_flops_per_image, use_fused_adamw
from sd_train.rng import RankRNG, seed_all

log = logging.getLogger("sd_train")


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
    handler, and no rank may leave a collective half-done.

    The per-step agreement costs no host sync of its own: `vote` is summed over ranks on the
    device (in the loop's one per-step all-reduce) and read together with the grad norm
    (Strategy.step). Steps that log, evaluate or save already read values on the host and ask
    `agreed` once more after those, so a signal that arrives while a checkpoint is written stops
    the run at that step."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        (flag,) = all_reduce_sum([1.0 if self.requested else 0.0], device)
        return flag > 0

    def vote(self) -> float:
        """This rank's vote to stop: summed over ranks, the number of ranks that were signalled."""
        return 1.0 if self.requested else 0.0


class DataPosition:
    """The loader's position as a checkpoint entry (rank_R.pt). On another world size each rank
    starts from its nearest saved rank's position, and the ranks agree on the next epoch (the
    loader warns): the per-rank positions of the old world have no counterpart in the new one."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def load_state_dict_from_other_world(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        epoch = int(all_reduce_max([float(self.loader.reshard_epoch or 0)], self.device)[0])
        self.loader.start_at_epoch(epoch)


class Trainer:
    """Owns the components of one run and the loop that drives them."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.info = init_distributed(cfg.dist)
        self.backend_flags = apply_backend_flags(cfg.perf, self.info.device)
        self.out = Path(cfg.output_dir)
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out / "config.yaml")
        barrier()
        self.faults = FaultInjector(self.info.rank)
        self.preemption = Preemption()
        seed_all(cfg.seed + self.info.rank)  # per-rank noise/timesteps; weights come from the folder or `seed`
        self.accum = cfg.grad_accum_steps(self.info.world_size)

        frozen_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
        self.parts = load_sd_parts(cfg.model, self.info.device, cfg.seed, frozen_dtype)
        self.flops_per_image = self._count_flops() if cfg.perf.count_flops else None
        self.peak_tflops = peak_tflops(cfg.perf, self.info.device)
        self.strategy = build_strategy(cfg, self.info, self.accum)
        fused = use_fused_adamw(cfg.perf, self.info.device)
        # Counted before wrapping: ZeRO-3 leaves the module's parameters empty (numel 0).
        num_params = sum(p.numel() for p in self.parts.unet.parameters() if p.requires_grad)
        self.strategy.wrap(self.parts.unet, lambda module: build_optimizer(module, cfg.optim, fused=fused))
        self.model, self.optimizer = self.strategy.model, self.strategy.optimizer
        # The inputs' dtype follows the params the forward reads: bf16 in DeepSpeed's bf16 mode,
        # which casts the module but not its inputs (FSDP2 keeps fp32 params and casts both itself).
        self.parts.step_dtype = next(self.strategy.module.parameters()).dtype
        self.lr_schedule = build_lr_schedule(self.optimizer, cfg.optim, cfg.max_steps)
        self.plan = plan_from_config(cfg.ema, cfg.max_steps)
        self.plan.check()
        self.ema = ShardedEMA(self.strategy.module, self.plan, self.strategy.ema_layout())
        self.posthoc_plan = posthoc_plan_from_config(cfg.ema, cfg.max_steps)
        self.posthoc_plan.check()
        self.posthoc = (
            PowerEMAProfiles(self.strategy.module, self.posthoc_plan, self.strategy.ema_layout())
            if self.posthoc_plan.enabled
            else None
        )
        empty = as_step_input(encode_text(self.parts, [""], self.info.device), self.parts.step_dtype)
        self.objective = DiffusionObjective(cfg.objective, self.parts.noise_scheduler.alphas_cumprod, empty)

        self.loader = build_train_loader(
            cfg,
            self.info.rank,
            self.info.world_size,
            tokenize=CaptionTokenizer(self.parts.tokenizer, self.parts.token_length),
            stager=stager_for(self.info.device, cfg.perf.device_prefetch),
        )
        self.metrics = build_metrics(cfg.metrics, cfg.output_dir, cfg.run_name or self.out.name, self.info.is_main)
        self.evaluator = Evaluator(cfg, self.parts, self.objective, self.info, self.ema, self.metrics, self.out)
        self.evaluator.fault_hook = lambda phase, step: self.faults.trip(phase, step)
        if not cfg.data.precomputed:
            self.parts.load("vae", "text_encoder")  # the step runs both
        else:
            # The step reads stored latents and embeddings: the text encoder was needed only for
            # the empty caption and the evaluator's fixed inputs, the VAE only to decode samples.
            self.parts.release("text_encoder", *(() if self.evaluator.sampler is not None else ("vae",)))
        self.state = TrainState()
        self.checkpointer = Checkpointer(
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
        self.checkpointer.fault_hook = lambda phase, step: self.faults.trip(phase, step)
        self.key_log = KeyLog(self.out, self.info.rank, cfg.data.log_keys)
        figures = self.plan.figures()
        if self.posthoc is not None:
            live_numel = sum(v.numel() for v in self.posthoc.layout.views(self.posthoc.named_params))
            figures.update(self.posthoc_plan.figures(num_params, self.info.world_size, live_numel))
        self.metrics.log_config(config_to_dict(cfg), figures)
        if self.info.is_main:
            print(self.plan.describe(), flush=True)
            print(self._describe_hot_path(fused), flush=True)
            if self.posthoc is not None:
                print(self.posthoc_plan.describe(num_params, self.info.world_size, live_numel), flush=True)
            (self.out / "ema_plan.json").write_text(json.dumps(figures, indent=1))
        write_topology(
            self.out / "topology.json",
            self.strategy,
            self.info,
            {"strategy": cfg.dist.strategy, "zero_stage": cfg.dist.zero_stage, "grad_accum_steps": self.accum},
        )
        self._resume()

    def _count_flops(self) -> float:
        """Forward+backward FLOPs of one training image at this run's shape, on the plain UNet
        before it is wrapped (sd_train.perf.training_flops_per_image)."""
        unet, parts = self.parts.unet, self.parts
        latent = self.cfg.data.resolution // parts.latent_downsampling
        return training_flops_per_image(
            unet,
            (unet.config.in_channels, latent, latent),
            (parts.token_length, parts.text_config.hidden_size),
            self.info.device,
        )

    def _describe_hot_path(self, fused: bool) -> str:
        flops = f"{self.flops_per_image / 1e9:.2f} GFLOP" if self.flops_per_image else "not counted"
        peak = f"{self.peak_tflops:g} TFLOP/s per device" if self.peak_tflops else "unknown (no speed/mfu)"
        flags = ", ".join(f"{k}={v}" for k, v in self.backend_flags.items())
        frozen = ", ".join(self.parts.resident()) or "none"
        cfg = self.cfg
        precision = f"params {cfg.dist.param_dtype}" + (" under bf16 autocast" if cfg.autocast_bf16() else "")
        return (
            f"hot path: {self.info.device.type}, {precision}, AdamW {'fused' if fused else 'foreach'}"
            f"{' (non-finite skip in the kernel)' if self.strategy.skip_on_device else ''}, {flags}, "
            f"compile={self.cfg.perf.compile}, channels_last={self.cfg.perf.channels_last}, "
            f"device_prefetch={self.loader.stager.lookahead > 0}; "
            f"frozen encoders {str(self.parts.frozen_dtype).removeprefix('torch.')} under inference_mode, "
            f"resident for the step: {frozen}; forward+backward per image {flops}; peak {peak}"
        )

    def _resume(self) -> None:
        if self.cfg.checkpoint.resume == "none" and self.checkpointer.candidates_exist():
            raise ConfigError(
                f"checkpoint.resume=none but {self.checkpointer.root} holds checkpoints: use a new "
                "output_dir, or resume=auto"
            )
        loaded = self.checkpointer.load()
        if loaded is None and self.cfg.checkpoint.init_from:
            self.checkpointer.init_from(Path(self.cfg.checkpoint.init_from))
        elif loaded is not None and self.cfg.checkpoint.init_from and self.info.is_main:
            print(f"checkpoint.init_from ignored: this run already has checkpoints ({loaded.folder})", flush=True)
        if loaded is not None and self.info.is_main:
            print(
                f"resumed from {loaded.folder} at step {self.state.step} "
                f"(saved by {loaded.saved_world_size} ranks, now {self.info.world_size})",
                flush=True,
            )

    # ---- one optimizer step ------------------------------------------------------------------

    def _encode(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, text embeddings) of a batch, as contiguous tensors of the step's dtype."""
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
            embeds = batch["text_embeds"].to(dev, non_blocking=True).to(dtype)
            return latents, embeds
        # The frozen encoders run under inference_mode (in bf16 with mixed_precision=bf16); the
        # loader's workers tokenized the captions.
        latents = encode_pixels(self.parts, batch["pixels"], dev)
        embeds = encode_tokens(self.parts, batch["input_ids"], dev)
        return as_step_input(latents, dtype), as_step_input(embeds, dtype)

    def train_step(self, data_iter) -> dict:
        """Accumulate gradients over micro-batches, then step unless any rank saw a non-finite
        value; the Strategy's step is the agreement (see Strategy.step). Its read of the grad
        norm (with the preemption flag) is the step's only host sync: the loss stays on the
        device until a logged step reads it."""
        cfg = self.cfg
        step = self.state.step + 1
        window = self.window
        self.optimizer.zero_grad(set_to_none=True)
        # float64, summed micro-batch by micro-batch: the same value, bit for bit, as the Python
        # float sum of each micro-batch's loss that this replaced.
        local_loss = torch.zeros((), dtype=torch.float64, device=self.info.device)
        data_wait, keys = 0.0, []
        autocast = torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16())
        for micro in range(self.accum):
            t = time.perf_counter()
            batch = next(data_iter)
            data_wait += time.perf_counter() - t
            keys.extend(batch.get("keys", []))
            with window.phase("forward_backward"):
                latents, embeds = self._encode(batch)
                last = micro == self.accum - 1
                self.strategy.set_grad_sync(last)
                with autocast:
                    loss = self.objective.loss(self.model, latents, embeds) / self.accum
                if self.faults.trip("mid_step", step):
                    loss = loss * float("nan")
                self.strategy.backward(loss, last)
                local_loss += loss.detach().double()
        with window.phase("optimizer"):
            self.checkpointer.wait_staged()  # an async save's copy must be done before the weights change
            finite, grad_norm, (signalled, clock_due) = self.strategy.step([self._votes()])
        if finite:
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
        return {
            "loss": local_loss,
            "grad_norm": grad_norm,
            "data_wait": data_wait,
            "finite": finite,
            "preempt": signalled > 0,
            "clock_due": clock_due > 0,
        }

    def _votes(self) -> torch.Tensor:
        """The per-step agreements in one all-reduce, read with the grad norm (no host sync of
        their own): the ranks signalled to stop (Preemption), and rank 0's vote that
        `checkpoint.every_minutes` have passed (the other ranks vote 0). Filled on the device, with
        no host-to-device copy that could wait for the queue."""
        votes = torch.zeros(2, device=self.info.device)
        votes[0].fill_(self.preemption.vote())
        votes[1].fill_(self.checkpointer.clock_vote())
        return reduce_tensor_(votes)

    def _skip(self, step: int, local_loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.state.skipped_steps += 1
        self.state.consecutive_skips += 1
        bad_ranks = [r for r, v in enumerate(all_gather_object(math.isfinite(read_float(local_loss)))) if not v]
        where = f"rank(s) {bad_ranks}" if bad_ranks else "a gradient (losses were finite)"
        if self.info.is_main:
            print(
                f"WARNING: step {step}: non-finite loss/gradient on {where}; step skipped "
                f"(weights, optimizer, LR schedule and EMA untouched)",
                flush=True,
            )
        if self.state.consecutive_skips >= self.cfg.max_consecutive_skips:
            raise NonFiniteError(
                f"{self.state.consecutive_skips} consecutive non-finite steps, the last at step {step} on {where}; "
                "stopping without writing a checkpoint. Lower optim.lr or check the data"
            )

    # ---- side jobs with their own cadence -------------------------------------------------------

    def data_health(self) -> dict:
        """Sum bad-sample and filtered counts over ranks and stop above data.max_bad_fraction
        (filtered samples are not bad input: they are reported, never judged)."""
        counts = self.loader.bad_counts()
        names = sorted(counts)
        filtered = self.loader.filtered_counts()
        rules = list(self.loader.dataset.sample_filter.names)  # the same list on every rank
        local = [counts[n] for n in names] + [filtered.get(r, 0) for r in rules] + [sum(filtered.values())]
        summed = all_reduce_sum(local + [self.loader.samples_read()], self.info.device)
        totals = {n: int(v) for n, v in zip(names, summed)}
        per_rule = {f"data/filtered_{r}": int(v) for r, v in zip(rules, summed[len(names) :])}
        read = int(summed[-1])
        shards = sorted({s for lst in all_gather_object(self.loader.bad_shards()) for s in lst})
        check_bad_fraction(
            totals, read, self.cfg.data.max_bad_fraction, self.cfg.data.min_samples_for_bad_check, shards
        )
        bad = {f"data/bad_{n}": v for n, v in totals.items()}
        per_source: dict[str, int] = {}
        mixed = self.loader.source_counts()  # data.mix=weighted: per-source samples (sum) and epoch (max)
        if mixed:
            samples = all_reduce_sum([n for n, _ in mixed], self.info.device)
            epochs = all_reduce_max([e for _, e in mixed], self.info.device)
            for i, (n, e) in enumerate(zip(samples, epochs)):
                per_source |= {f"data/source{i}_samples": int(n), f"data/source{i}_epoch": int(e)}
        return {
            "data/samples_read": read,
            "data/bad_shards": shards,
            **bad,
            **per_rule,
            "data/filtered": int(summed[-2]),
            **per_source,
        }

    def log_step(self, step: int, result: dict) -> None:
        """The logged figures of a step: the loss averaged over ranks, optimizer, speed window, EMA
        and data health (the last two are collectives, so every rank calls this at the same steps)."""
        loss = read_float(reduce_tensor_(result["loss"].clone()))
        values = {
            "train/loss": loss / self.info.world_size,
            "optim/lr": self.lr_schedule.get_last_lr()[0],
            "optim/grad_norm": result["grad_norm"],
            "optim/skipped_steps": self.state.skipped_steps,
            **self.window.read(),
            "ema/open": self.ema.is_open,
            "ema/updates": self.ema.num_updates,
            "ema/local_bytes": self.ema.local_bytes(),
            **self.data_health(),
        }
        self.metrics.log(step, values)
        self.bar.set_postfix(loss=f"{values['train/loss']:.4f}", img_s=f"{values['speed/img_per_s']:.1f}")

    # ---- the loop ------------------------------------------------------------------------------

    def train(self) -> int:
        cfg = self.cfg
        self.key_log.start(self.state.step)
        if self.state.step == 0 and self.evaluator.validator is not None:  # the baseline the run must beat
            self.metrics.log(0, self.evaluator.baseline(self.model))
        data_iter = iter(self.loader)
        self.bar = _progress(self.info.is_main, self.state.step, cfg.max_steps)
        self.window = StepWindow(
            cfg.global_batch_size, self.info.device, self.info.world_size, self.flops_per_image, self.peak_tflops
        )
        while self.state.step < cfg.max_steps:
            syncs_before = HOST_SYNCS.count
            self.window.step_started()
            result = self.train_step(data_iter)
            step = self.state.step
            self.window.step_ended(result["data_wait"], result["finite"])
            self.bar.update(1 if result["finite"] else 0)
            logged = self.metrics.should_log(step) and result["finite"] or step == cfg.max_steps
            if logged:
                self.log_step(step, result)
            evaluated = self.evaluator.should_run(step) and result["finite"]
            with self.window.excluded():  # img/s per GPU counts training time only
                if evaluated:
                    self.metrics.log(step, self.evaluator.run(step, self.model))
                if self.posthoc is not None:
                    self.posthoc.maybe_snapshot(self.out / POSTHOC_DIR, step, self.info.rank)
                saved = self.checkpointer.save(step, clock_due=result["clock_due"])
                self._log_saves(step)
            if not (logged or evaluated or saved):
                self.window.count_host_syncs(HOST_SYNCS.count - syncs_before)
            if result["preempt"] or ((logged or evaluated or saved) and self.preemption.agreed(self.info.device)):
                self.checkpointer.save(step, force=True)
                self.checkpointer.wait()
                self._log_saves(step)
                if self.info.is_main:
                    print(f"preempted (SIGTERM): saved a complete checkpoint at step {step}; exiting 0", flush=True)
                return 0
        self.bar.close()
        self.checkpointer.wait()
        self._log_saves(self.state.step)
        self.finish()
        return 0

    def _log_saves(self, step: int) -> None:
        """The figures of each save finished by now (rank 0's times; only the main process logs)."""
        for figures in self.checkpointer.take_figures():
            self.metrics.log(step, figures)

    def finish(self) -> None:
        health = self.data_health()
        if self.info.is_main:
            summary = {"step": self.state.step, "skipped_steps": self.state.skipped_steps, **health}
            (self.out / "data_summary.json").write_text(json.dumps(summary, indent=1))
        if self.cfg.export_at_end:
            paths = export_from_training(
                lambda: self.strategy.full_model_state(self.info.is_main),
                self.ema,
                self.cfg.model.pretrained_path,
                self.out / "export",
                self.cfg.objective.prediction_type,
                self.info.is_main,
                before_write=lambda: self.faults.trip("export_write", self.state.step),
            )
            if self.info.is_main:
                print("exported:", ", ".join(str(p) for p in paths), flush=True)

    def close(self) -> None:
        self.checkpointer.close()
        destroy()
        # The sample grids still being written: waited for with no process group left, so a slow
        # disk on the main process keeps no peer in a collective.
        self.evaluator.close()
        self.metrics.close()


KNOWN_ERRORS: tuple = (NonFiniteError, CheckpointLoadError, BadDataError)


def _progress(enabled: bool, start: int, total: int) -> tqdm:
    return tqdm(total=total, initial=start, disable=not enabled, dynamic_ncols=True, desc="train")


def run(cfg: TrainConfig) -> int:
    """Train with a validated, resolved config (from sd_train.entry.validated_config: no `auto` strategy left).

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
