"""Metrics: a JSONL file that is always written, plus optional wandb and tensorboard.

Only the main process logs; other ranks get a `NullMetrics` that does nothing. wandb is imported
lazily, and a missing key never stops a run: it falls back to the JSONL log with one warning.
Metric names are grouped: `train/`, `optim/`, `speed/`, `memory/`, `ema/`, `data/`, `val/`.

A resumed run reads forward: `start(step)` drops the rows a previous launch wrote for steps after
the checkpoint this launch resumed from (they are logged again, bitwise equal) and writes a
`resumed` event, so metrics.jsonl holds each step once, in order. wandb and tensorboard already hold
those steps; they get only steps past the highest one logged before, the same monotonic history.
"""

from __future__ import annotations

import json
import math
import os
import resource
import secrets
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from sd_train.config import MetricsArgs
from sd_train.parallel.process_group import all_reduce_max as reduce_max
from sd_train.parallel.process_group import all_reduce_sum


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if hasattr(v, "item"):
        return v.item()
    return v


class NullMetrics:
    """What non-main ranks get: every sink is a no-op. The cadence is the same on every rank,
    because the loop gathers the logged values with collectives at the steps it names."""

    def __init__(self, args: MetricsArgs):
        self.args = args
        # The last value logged under each name, with its step (the end-of-run summary reads it).
        self.latest: dict[str, tuple[int, Any]] = {}
        # The highest step a previous launch logged (set by `start`): wandb and tensorboard
        # already hold every step up to it.
        self.logged_before = -1

    def should_log(self, step: int) -> bool:
        return step % self.args.log_every == 0

    def log(self, step: int, values: dict[str, Any]) -> None:
        pass

    def log_image(self, step: int, name: str, path: str, image=None) -> None:
        pass

    def log_config(self, config: dict, plan: dict) -> None:
        pass

    def start(self, step: int, event: Optional[dict[str, Any]] = None) -> None:
        pass

    def close(self) -> None:
        pass


class Metrics(NullMetrics):
    """Owns the run's metric sinks and the logging cadence."""

    def __init__(self, args: MetricsArgs, output_dir: str, run_name: str):
        super().__init__(args)
        self.dir = Path(output_dir)
        self.path = self.dir / "metrics.jsonl"
        self.jsonl = open(self.path, "a", buffering=1)
        if self.jsonl.tell() > 0 and _last_byte(self.path) != b"\n":
            self.jsonl.write("\n")  # a killed launch's half-written last line stays a line of its own
        self.wandb = self._init_wandb(run_name) if args.wandb else None
        self.tb = self._init_tensorboard() if args.tensorboard else None

    def _init_wandb(self, run_name: str):
        """Continue the same wandb run across resumes by keeping its id in the run folder."""
        id_file = self.dir / "wandb_run_id.txt"
        try:
            import wandb

            # Our own id (wandb 0.31 dropped wandb.util.generate_id): 8 lowercase hex chars is a
            # valid wandb run id, and keeping it in the run folder makes resumes continue the run.
            run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
            run = wandb.init(
                project=self.args.wandb_project,
                group=self.args.wandb_group or None,
                name=run_name,
                id=run_id,
                resume="allow",
                dir=str(self.dir),
            )
            id_file.write_text(run_id)
            return run
        except Exception as e:  # no key, no network, not installed: keep training, say so once
            warnings.warn(
                f"wandb disabled for this run ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                "Metrics still go to metrics.jsonl. Set WANDB_MODE=offline to log without an account.",
                stacklevel=2,
            )
            return None

    def _init_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(str(self.dir / "tensorboard"))
        except Exception as e:
            warnings.warn(f"tensorboard disabled ({e}); metrics still go to metrics.jsonl", stacklevel=2)
            return None

    def start(self, step: int, event: Optional[dict[str, Any]] = None) -> None:
        """This launch logs from `step` on: drop the rows of later steps (and, from step 0, every
        step row: the run starts over) and write `event` (e.g. the resume) at `step`. Rows without
        a step (each launch's config) stay."""
        self.jsonl.close()
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines() if self.path.exists() else []:
            try:
                row = json.loads(line)
            except ValueError:
                dropped += 1  # the half-written last line of a killed launch
                continue
            row_step = row.get("step") if isinstance(row, dict) else None
            if isinstance(row_step, int):
                self.logged_before = max(self.logged_before, row_step)
                if row_step > step or (step == 0 and row_step == 0):
                    dropped += 1
                    continue
                # What the run logged before this launch counts as its latest values until relogged.
                self.latest.update({k: (row_step, v) for k, v in row.items() if k not in ("step", "time")})
            kept.append(line)
        if dropped:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            os.replace(tmp, self.path)
        self.jsonl = open(self.path, "a", buffering=1)
        if event is not None:
            self.jsonl.write(json.dumps({"step": step, "time": time.time(), **event, "dropped_rows": dropped}) + "\n")

    def log(self, step: int, values: dict[str, Any]) -> None:
        values = {k: _jsonable(v) for k, v in values.items()}
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self.latest.update({k: (step, v) for k, v in values.items()})
        if step <= self.logged_before:
            return  # wandb and tensorboard have this step from the launch that logged it first
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def log_image(self, step: int, name: str, path: str, image=None) -> None:
        """`path` is where the picture is (or is being) written; `image` (a PIL image), when
        given, is what wandb gets, so that it never waits for or reads the file."""
        self.jsonl.write(json.dumps({"step": step, "image": name, "path": str(path)}) + "\n")
        if self.wandb is not None and step > self.logged_before:
            import wandb

            self.wandb.log({name: wandb.Image(image if image is not None else str(path))}, step=step)

    def log_config(self, config: dict, plan: dict) -> None:
        self.jsonl.write(json.dumps({"config": config, "ema_plan": {k: _jsonable(v) for k, v in plan.items()}}) + "\n")
        if self.wandb is not None:
            self.wandb.config.update({**config, "ema_plan": plan}, allow_val_change=True)

    def close(self) -> None:
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def build_metrics(args: MetricsArgs, output_dir: str, run_name: str, is_main: bool) -> NullMetrics:
    if not is_main:
        return NullMetrics(args)
    os.makedirs(output_dir, exist_ok=True)
    return Metrics(args, output_dir, run_name)


class StepWindow:
    """Owns the throughput figures between two logged steps: samples trained, wall time (and the
    part of it spent in evaluation and checkpoints, which `speed/img_per_s_per_gpu` leaves out),
    time per phase of the step, the host syncs of plain steps and the peak memory. `read()`
    returns the `speed/` and `memory/` metrics and starts a new window; it is a collective (the
    memory peak is the max over ranks), called at the same steps on every rank.

    Phase times come from CUDA events on a GPU (device time, read at log time, when the loop may
    sync) and from the host clock on CPU; `data` is always the host's wait for the loader.

    FLOPs: `flops_per_image` times the samples trained (one training shape), or with `step_flops`
    (`data.buckets`: each step's micro-batches have their own shapes) the FLOPs each step reports
    in `step_ended`, summed over ranks when read."""

    def __init__(
        self,
        global_batch_size: int,
        device: torch.device,
        world_size: int = 1,
        flops_per_image: Optional[float] = None,
        peak_tflops: Optional[float] = None,
        step_flops: bool = False,
    ):
        self.global_batch_size = global_batch_size
        self.device = device
        self.world_size = world_size
        self.flops_per_image = flops_per_image
        self.peak_tflops = peak_tflops
        self.step_flops = step_flops
        self.run_peak_gb = 0.0
        # This launch's training samples and time over every window read so far (the summary's img/s).
        self.run_samples = 0
        self.run_train_s = 0.0
        self._reset()

    def _reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.excluded_s = 0.0
        self.samples = 0
        self.flops = 0.0
        self.steps = 0
        self.step_start = self.start
        self.phase_host: dict[str, float] = defaultdict(float)
        self.phase_events: dict[str, list] = defaultdict(list)
        self.plain_steps = 0
        self.plain_step_syncs = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def restart(self) -> None:
        """Start the first window now (the loop begins), not when the run was built."""
        self._reset()

    def step_started(self) -> None:
        self.step_start = time.perf_counter()

    def step_ended(self, data_wait: float, taken: bool, flops: float = 0.0) -> None:
        """`flops`: this rank's forward+backward FLOPs of the step (with `step_flops`)."""
        self.data_wait += data_wait
        self.samples += self.global_batch_size if taken else 0
        self.flops += flops if taken else 0.0
        self.steps += 1

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time one phase of a step (`forward_backward`, `optimizer`, `ema`); phases add up
        over micro-batches and steps."""
        if self.device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            yield
            end.record()
            self.phase_events[name].append((begin, end))
        else:
            t = time.perf_counter()
            yield
            self.phase_host[name] += time.perf_counter() - t

    @contextmanager
    def excluded(self) -> Iterator[None]:
        """Wall time inside this block (evaluation, checkpoint saves) is not training time."""
        t = time.perf_counter()
        yield
        self.excluded_s += time.perf_counter() - t

    def count_host_syncs(self, count: int) -> None:
        """The host reads of one step that neither logged, evaluated nor saved (sd_train.host_sync)."""
        self.plain_steps += 1
        self.plain_step_syncs += count

    def _phase_seconds(self) -> dict[str, float]:
        if self.device.type != "cuda":
            return dict(self.phase_host)
        torch.cuda.synchronize(self.device)
        return {n: sum(b.elapsed_time(e) for b, e in pairs) / 1000 for n, pairs in self.phase_events.items()}

    def read(self) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = now - self.start
        train_time = max(elapsed - self.excluded_s, 1e-9)
        per_gpu = self.samples / train_time / self.world_size
        self.run_samples += self.samples
        self.run_train_s += train_time
        steps = max(self.steps, 1)
        allocated, reserved = reduce_max(list(window_peak_memory_gb(self.device)), self.device)
        self.run_peak_gb = max(self.run_peak_gb, peak_memory_gb(self.device))
        values = {
            "speed/img_per_s": self.samples / elapsed,
            "speed/img_per_s_per_gpu": per_gpu,
            "speed/step_time_s": now - self.step_start,
            "speed/data_wait_share": self.data_wait / elapsed,
            "speed/data_ms": 1000 * self.data_wait / steps,
            **{f"speed/{n}_ms": 1000 * v / steps for n, v in sorted(self._phase_seconds().items())},
            "memory/peak_gb": self.run_peak_gb,
            "memory/peak_allocated_gb": allocated,
            "memory/peak_reserved_gb": reserved,
        }
        if self.step_flops:  # a collective on every rank, like the memory peak above
            values["speed/tflops_per_gpu"] = (
                all_reduce_sum([self.flops], self.device)[0] / self.world_size / train_time / 1e12
            )
        elif self.flops_per_image:
            values["speed/tflops_per_gpu"] = per_gpu * self.flops_per_image / 1e12
        if "speed/tflops_per_gpu" in values:
            if self.peak_tflops:
                values["speed/mfu"] = values["speed/tflops_per_gpu"] / self.peak_tflops
        if self.plain_steps:
            values["speed/host_syncs_per_step"] = self.plain_step_syncs / self.plain_steps
        self._reset()
        return values

    def run_img_per_s_per_device(self) -> Optional[float]:
        """Images per second per device over this launch's training time (windows read so far)."""
        return self.run_samples / self.run_train_s / self.world_size if self.run_train_s > 0 else None


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def window_peak_memory_gb(device: torch.device) -> tuple[float, float]:
    """(allocated, reserved) peak since the window's reset on CUDA; on CPU, where there is no
    resettable peak, the process's peak RSS for both."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30
    rss = peak_memory_gb(device)
    return rss, rss


class Progress:
    """The progress bar: tqdm on the main process's stderr, nothing on the other ranks (every rank
    drawing its own bar garbles the console). Opened when the loop starts."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total
        self.bar: Optional[tqdm] = None

    def start(self, step: int) -> None:
        if self.enabled:
            # disable=False: shown even where TQDM_DISABLE quiets the libraries' bars (sd_train.console).
            self.bar = tqdm(total=self.total, initial=step, dynamic_ncols=True, desc="train", disable=False)

    def advance(self, taken: bool) -> None:
        if self.bar is not None:
            self.bar.update(1 if taken else 0)

    def show(self, **values: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class KeyLog:
    """The audit log of consumed sample keys (`data.log_keys`): `<output_dir>/keys/rank{R}.txt`,
    one `step<TAB>key` line per sample, the step negated for a skipped step. Each launch appends a
    `# start` line, because a relaunch may recompute steps after it."""

    def __init__(self, output_dir: Path, rank: int, enabled: bool):
        self.path = Path(output_dir) / "keys" / f"rank{rank}.txt" if enabled else None

    def start(self, step: int) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(f"# start\t{step}\n")

    def record(self, step: int, taken: bool, keys: list[str]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write("".join(f"{step if taken else -step}\t{k}\n" for k in keys))
