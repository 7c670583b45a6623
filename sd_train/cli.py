"""`sd-train <command>`: the project's commands. Each lives in its own module; this only dispatches.

Commands are imported lazily so that `sd-train --help` does not pay for torch and diffusers.
"""

from __future__ import annotations

import importlib
import os
import sys

# command -> (module, function taking argv, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("sd_train.entry", "main", "train (same as python train.py)"),
    "prepare-emoji": (
        "sd_train.tools.prepare",
        "main_prepare_emoji",
        "write the embedded Twemoji data set as webdataset shards",
    ),
    "prepare": (
        "sd_train.tools.prepare",
        "main_prepare_folder",
        "turn a folder of images + caption .txt files into shards",
    ),
    "build-tiny": (
        "sd_train.tools.tiny_sd",
        "main_build_tiny",
        "build the tiny offline SD model folder (tokenizer, text encoder, VAE, UNet)",
    ),
    "export": ("sd_train.export", "main_export", "turn a checkpoint folder into a diffusers pipeline folder"),
    "plan": ("sd_train.entry", "main_plan", "print the EMA window plan of a config and check it"),
    "sweep": ("sd_train.tools.sweep", "main_sweep", "expand a sweep file into runs; run them locally or under SLURM"),
    "precompute": (
        "sd_train.tools.precompute",
        "main_precompute",
        "encode shards once into latent + text-embedding shards",
    ),
    "posthoc": (
        "sd_train.tools.posthoc",
        "main_posthoc",
        "reconstruct EMAs of any length from a run's post-hoc EMA snapshots (--eval scores them)",
    ),
    "config-doc": (
        "sd_train.tools.config_doc",
        "main_config_doc",
        "write the config reference docs/config.md from the schema's field docstrings",
    ),
    "quality": (
        "sd_train.tools.quality",
        "main_quality",
        "one constant-LR run with post-hoc EMA, then held-out loss vs EMA length (raw, late EMA, a grid)",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: sd-train <command> [args]\n\ncommands:")
        for name, (_, _, doc) in COMMANDS.items():
            print(f"  {name:<14} {doc}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"sd-train: unknown command {name!r}; run `sd-train --help` for the list", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    offline_hub()
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


def offline_hub() -> None:
    """Every model sd-train reads is a local folder: never let a path that does not exist (a
    relative `model.pretrained_path` read from elsewhere) turn into a hub download. huggingface_hub
    reads HF_HUB_OFFLINE once, when it is first imported (diffusers imports it), so it is set here,
    before any command module is imported. An explicit HF_HUB_OFFLINE=0 is kept."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


if __name__ == "__main__":
    sys.exit(main())
