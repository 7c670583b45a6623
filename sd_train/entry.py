"""`python train.py` / `sd-train train`: parse, load, validate and preflight the config, then train.
Also `sd-train plan`, which prints a config's EMA plan.

This module imports only the config code and its torch-free checks (no torch, no diffusers), so a
bad config is refused in a fraction of a second, before any process group starts or any heavy
import is paid for.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from sd_train.config import ConfigError, TrainConfig, env_world_size, load_config
from sd_train.ema.plan import EMAPlan, plan_from_config
from sd_train.preflight import preflight


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train.py", description="Train a Stable Diffusion UNet. Overrides: section.key=value ..."
    )
    p.add_argument("--config", required=True, help="YAML file, e.g. configs/demo.yaml")
    p.add_argument("--plan", action="store_true", help="validate the config, print the EMA plan, and exit")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=1e-4 output_dir=runs/x")
    return p.parse_intermixed_args(argv)  # `--plan` may come after overrides, or between them


def validated_config(argv: list[str]) -> tuple[TrainConfig, argparse.Namespace]:
    """(resolved config, namespace): field checks, then the machine checks of sd_train.preflight.
    Raises ConfigError naming the field."""
    ns = parse_args(argv)
    cfg = load_config(ns.config, ns.overrides)
    world_size = env_world_size()
    cfg.validate(world_size)
    return preflight(cfg, world_size), ns


def print_plan(cfg: TrainConfig) -> EMAPlan:
    """Print the EMA plan of `cfg` (what `--plan` and `sd-train plan` show) and return it, unchecked."""
    plan = plan_from_config(cfg.ema, cfg.max_steps)
    print(plan.describe())
    return plan


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg, ns = validated_config(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if ns.plan:
        print_plan(cfg)
        print("config OK")
        return 0
    # Lazy: torch and diffusers are paid for only once the config is accepted. The model folders
    # are local: no hub lookup, set before huggingface_hub is first imported (it reads this then).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sd_train.trainer import run

    return run(cfg)


def main_plan(argv: list[str]) -> int:
    """`sd-train plan --config X [overrides]`: print the plan; exit 1 with the reason if refused."""
    parser = argparse.ArgumentParser(prog="sd-train plan", description=main_plan.__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    ns = parser.parse_args(argv)
    try:
        cfg = load_config(ns.config, ns.overrides)
        print_plan(cfg).check()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 1
    print("EMA plan OK")
    return 0
