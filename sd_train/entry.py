"""`python train.py` / `sd-train train`: parse, load, validate and preflight the config, then train.
Also `sd-train plan` and `train.py --plan`, one path: validate at the previewed world size, print
the plan (sd_train.run_plan) with the memory plan (sd_train.memory), exit 0, or 2 with the reason.

This module imports only the config code and its torch-free checks (no torch, no diffusers), so a
bad config is refused in a fraction of a second, before any process group starts or any heavy
import is paid for. Under a launcher every rank checks its config the same way, and only the main
process prints the refusal: one message, exit 2 on every rank.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Optional

from sd_train import __version__, console
from sd_train.config import ConfigError, TrainConfig, load_config
from sd_train.config.launcher import read_launch_env
from sd_train.memory.plan import MemoryPlan
from sd_train.memory.sizes import UnsizedModel
from sd_train.memory.startup import with_async_decided
from sd_train.preflight import preflight
from sd_train.run_plan import PlanTarget, memory_plan_for, plan_lines, plan_target

log = logging.getLogger(__name__)

INTERRUPTED_EXIT = 130  # 128 + SIGINT (the trainer's Ctrl-C exit, sd_train.step_signals)
NON_MAIN_EXIT_DELAY_S = 2.0

DESCRIPTION = "Train a Stable Diffusion UNet from a YAML config; section.key=value overrides come last and win."
EPILOG = """examples:
  %(prog)s --config configs/demo.yaml
  %(prog)s --config configs/demo.yaml optim.lr=3e-4 output_dir=runs/lr3e-4
  %(prog)s --config configs/demo.yaml --plan --world-size 8    (validate and preview, train nothing)
launchers: torchrun --nproc_per_node 8 train.py --config ...; accelerate launch train.py --config ...
Ctrl-C stops after the current step and saves a checkpoint (exit 130); the same command resumes."""


def build_parser(prog: str, plan_command: bool = False) -> argparse.ArgumentParser:
    """The arguments of a start (`prog` train.py or `sd-train train`) or of `sd-train plan`."""
    if plan_command:
        p = argparse.ArgumentParser(
            prog=prog,
            description="Validate a config at a world size and print its plan (what a start would do), training "
            "nothing: batch arithmetic, output locations, the EMA and post-hoc EMA plans. Exit 0 if it would "
            "start, 2 with the reason if not. The same as `train.py --plan`.",
        )
    else:
        p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--config", required=True, help="the run's YAML config file, e.g. configs/demo.yaml")
    if not plan_command:
        p.add_argument(
            "--plan", action="store_true", help="validate and print the plan, then exit (the same as `sd-train plan`)"
        )
    p.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="plan for N ranks instead of the launcher's (with --plan: e.g. 64 to check a cluster config here)",
    )
    p.add_argument(
        "--ranks-per-node",
        type=int,
        default=None,
        help="with --world-size: ranks on one node (the default FSDP2 shard group); default the launcher's, else 8",
    )
    p.add_argument(
        "--gpu-memory-gib",
        type=float,
        default=None,
        help="with --plan: the memory plan's device memory per GPU (default: this machine's GPU, else a CPU run)",
    )
    p.add_argument(
        "--host-memory-gib",
        type=float,
        default=None,
        help="with --plan: the memory plan's host memory per node (default: this machine's)",
    )
    p.add_argument(
        "--estimate",
        action="store_true",
        help="with --plan: estimate the training step on fake tensors now if no estimate is cached (minutes for SD2)",
    )
    p.add_argument("--verbose", action="store_true", help="also show debug lines and third-party warnings")
    p.add_argument("--version", action="version", version=f"sd-train {__version__}")
    p.add_argument("overrides", nargs="*", help="section.key=value ..., e.g. optim.lr=1e-4 output_dir=runs/x")
    return p


def _parse(argv: list[str], prog: str, plan_command: bool) -> argparse.Namespace:
    ns = build_parser(prog, plan_command).parse_intermixed_args(argv)  # flags may follow the overrides
    ns.plan = plan_command or ns.plan
    return ns


def validated_config(
    argv: list[str], prog: str = "train.py", plan_command: bool = False
) -> tuple[TrainConfig, argparse.Namespace]:
    """(resolved config, namespace): field checks at the world size of the launch (or of the
    plan's `--world-size`, kept as `namespace.target`), then the machine checks of
    sd_train.preflight. Raises ConfigError naming the field."""
    ns = _parse(argv, prog, plan_command)
    preview_only = (ns.world_size, ns.ranks_per_node, ns.gpu_memory_gib, ns.host_memory_gib)
    if not ns.plan and (any(v is not None for v in preview_only) or ns.estimate):
        raise ConfigError(
            "--world-size, --ranks-per-node, --gpu-memory-gib, --host-memory-gib and --estimate preview a plan: "
            "add --plan (or run `sd-train plan`); a start takes its world size from the launcher and its memory "
            "from the machine"
        )
    launch = read_launch_env(os.environ)
    target = plan_target(
        launch.world_size,
        launch.local_world_size,
        ns.world_size,
        ns.ranks_per_node,
        ns.gpu_memory_gib,
        ns.host_memory_gib,
        ns.estimate,
    )
    cfg = load_config(ns.config, ns.overrides)
    cfg.validate(target.world_size)
    environ = target.launcher_environ(dict(os.environ)) if ns.world_size is not None else os.environ
    ns.target = target
    return preflight(cfg, target.world_size, environ), ns


def print_plan(cfg: TrainConfig, target: PlanTarget, config_path: str, memory: Optional[MemoryPlan]) -> None:
    """The plan, then "config OK" or the memory plan's refusal (ConfigError): what `--plan` and
    `sd-train plan` show (main process)."""
    log.info("\n".join(plan_lines(cfg, target, config_path, memory)))
    if memory is not None:
        memory.check()
    log.info("config OK")


def checked_memory(cfg: TrainConfig, ns: argparse.Namespace) -> tuple[TrainConfig, Optional[MemoryPlan]]:
    """(config with `checkpoint.async_save=auto` decided, memory plan): the plan of a preview, or of
    a start unless `dist.memory_check=off`, made before any process group starts so that a refusal
    costs no launch. A start prints it (main process) and checks it here; a preview prints it first
    (`print_plan`). Raises ConfigError when a start does not fit."""
    if not ns.plan and cfg.dist.memory_check == "off":
        return with_async_decided(cfg, None), None
    try:
        memory = memory_plan_for(cfg, ns.target)
    except UnsizedModel as e:  # nothing to plan with: said, not refused (the load will say more)
        log.warning(f"memory plan: not made, nothing checked: {e}")
        return with_async_decided(cfg, None), None
    cfg = with_async_decided(cfg, memory)
    if not ns.plan:
        log.info(memory.describe())
        memory.check()
    return cfg, memory


def main(argv: list[str] | None = None, prog: str = "train.py", plan_command: bool = False) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    console.setup(verbose="--verbose" in argv)  # before any heavy import, and before the checks log
    # The model folders are local: no hub lookup, set before huggingface_hub is first imported
    # (it reads HF_HUB_OFFLINE then; the memory plan may read a model folder).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cfg, ns = validated_config(argv, prog, plan_command)
        cfg, memory = checked_memory(cfg, ns)
        if ns.plan:
            print_plan(cfg, ns.target, ns.config, memory)
            return 0
    except ConfigError as e:
        if console.is_main():  # every rank refuses alike; one says so
            print(f"config error: {e}", file=sys.stderr)
        else:
            # The others leave a moment later: a launcher that sees a silent rank fail first
            # stops the main process before it has said why (seen under accelerate launch).
            time.sleep(NON_MAIN_EXIT_DELAY_S)
        return 2
    try:
        # Lazy: torch and diffusers are paid for only once the config is accepted.
        from sd_train.trainer import run
    except KeyboardInterrupt:  # Ctrl-C while torch loads: nothing started, nothing to save
        if console.is_main():
            print("interrupted before training started: nothing to save", file=sys.stderr)
        return INTERRUPTED_EXIT
    return run(cfg)


def main_train(argv: list[str]) -> int:
    """`sd-train train ...`: the same as `python train.py ...`."""
    return main(argv, prog="sd-train train")


def main_plan(argv: list[str]) -> int:
    """`sd-train plan --config X [--world-size N] [overrides]`: the same as `train.py --plan`."""
    return main(argv, prog="sd-train plan", plan_command=True)
