"""`sd-train <command>`: the project's commands. Each lives in its own module; this only dispatches.

Commands are imported lazily so that `sd-train --help` does not pay for torch and diffusers. A
user's mistake in any command (a config or argument error) is printed as one line naming what to
fix, with exit code 2; a traceback means a bug.
"""

from __future__ import annotations

import importlib
import os
import sys

from sd_train import __version__, console
from sd_train.errors import ConfigError, UsageError

# command -> (module, function taking argv, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("sd_train.entry", "main_train", "train (the same as python train.py)"),
    "plan": (
        "sd_train.entry",
        "main_plan",
        "validate a config at any world size and print its plan (the same as train.py --plan)",
    ),
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
    "export": (
        "sd_train.export",
        "main_export",
        "turn a run's newest checkpoint (or a chosen step) into a diffusers pipeline folder",
    ),
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
    "quality-check": (
        "sd_train.tools.quality_check",
        "main_quality_check",
        "validate the sample-quality instrument: random UNet (chance), VAE round trip (near 1), a sample grid",
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

USAGE = """usage: sd-train [--verbose] <command> [args]     (sd-train <command> --help for its arguments)

  --verbose      show sd-train's debug lines and the third-party warnings it filters
  --version      print the version and exit

commands:"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = bool(argv) and argv[0] == "--verbose"
    if verbose:
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        for name, (_, _, doc) in COMMANDS.items():
            print(f"  {name:<14} {doc}")
        return 0
    if argv[0] == "--version":
        print(f"sd-train {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"sd-train: unknown command {name!r}; run `sd-train --help` for the list", file=sys.stderr)
        return 2
    # Before the command's module is imported: some third-party lines are printed at import time.
    console.setup(verbose=verbose or "--verbose" in rest)
    module, func, _ = COMMANDS[name]
    offline_hub()
    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except (ConfigError, UsageError) as e:
        kind = "config error" if isinstance(e, ConfigError) else "error"
        print(f"sd-train {name}: {kind}: {e}", file=sys.stderr)
        return 2


def offline_hub() -> None:
    """Every model sd-train reads is a local folder: never let a path that does not exist (a
    relative `model.pretrained_path` read from elsewhere) turn into a hub download. huggingface_hub
    reads HF_HUB_OFFLINE once, when it is first imported (diffusers imports it), so it is set here,
    before any command module is imported. An explicit HF_HUB_OFFLINE=0 is kept."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


if __name__ == "__main__":
    sys.exit(main())
