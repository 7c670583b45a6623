"""`python train.py` / `sd-train train`: parse, load and validate the config, then train.

This module imports only the config code (no torch, no diffusers), so a bad config is refused in
a fraction of a second, before any process group starts or any heavy import is paid for.
"""

from __future__ import annotations

import argparse
import logging
import sys

from sd_train.config import ConfigError, env_world_size, load_config


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train.py", description="Train a Stable Diffusion UNet. Overrides: section.key=value ...")
    p.add_argument("--config", required=True, help="YAML file, e.g. configs/demo.yaml")
    p.add_argument("--plan", action="store_true", help="validate the config, print the EMA plan, and exit")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=1e-4 output_dir=runs/x")
    return p.parse_intermixed_args(argv)  # `--plan` may come after overrides, or between them


def validated_config(argv: list[str]):
    """(config, namespace); raises ConfigError naming the field."""
    ns = parse_args(argv)
    cfg = load_config(ns.config, ns.overrides)
    cfg.validate(env_world_size())
    return cfg, ns


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg, ns = validated_config(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if ns.plan:
        from sd_train.ema_plan import plan_from_config

        print(plan_from_config(cfg.ema, cfg.max_steps).describe())
        print("config OK")
        return 0
    from sd_train.trainer import run

    return run(cfg)
