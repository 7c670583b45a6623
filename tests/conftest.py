"""Shared fixtures. The session builds one small embedded data set and one tiny SD folder (with
an untrained VAE, to stay fast) through the same commands `make demo` uses."""

import os
import signal
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# The memory plan's step estimates are cached per configuration: the tests keep theirs apart.
os.environ.setdefault("SD_TRAIN_CACHE", tempfile.mkdtemp(prefix="sd-train-test-cache-"))

# `make test` starts the single-process session in the background (`&`), and a non-interactive shell
# starts background jobs with SIGINT ignored. Python then keeps the ignore, and so does every process a
# test starts: a run that respects an inherited ignore (as nohup'd jobs should) would never see the
# Ctrl-C the tests press. Put back what a terminal's foreground job has; children then start with the
# default action.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict:
    """8 train shards + 1 val shard of real Twemoji samples at 32 px, and a tiny SD folder."""
    from sd_train.tools.prepare import prepare_emoji
    from sd_train.tools.tiny_sd import build_tiny_sd

    root = tmp_path_factory.mktemp("assets")
    data = root / "emoji"
    prepare_emoji(str(data), resolution=32, num_train_shards=8, val_count=16, seed=0, limit=144)
    model = root / "tiny-sd"
    build_tiny_sd(str(data), str(model), resolution=32, vae_steps=0, seed=0)
    return {
        "data": data,
        "model": model,
        "overrides": [
            f"model.pretrained_path={model}",
            f"data.train_shards={data}/train-{{000000..000007}}.tar",
            f"data.val_shards={data}/val-000000.tar",
        ],
    }


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_assets, tmp_path_factory) -> dict:
    """A tiny SDXL folder around the tiny SD folder's VAE and tokenizer (sd_train.tools.tiny_sdxl),
    and the committed non-square shards (tests/assets) at 16 px, so random crops and flips give
    every sample its own micro-conditioning."""
    from sd_train.tools.tiny_sdxl import from_tiny_sd

    model = from_tiny_sd(str(tiny_assets["model"]), str(tmp_path_factory.mktemp("assets") / "tiny-sdxl"))
    shards = Path(__file__).parent / "assets" / "tiny-{000000..000005}.tar"
    return {
        "model": Path(model),
        "shards": shards,
        "overrides": [
            f"model.pretrained_path={model}",
            f"data.train_shards={shards}",
            f"data.val_shards={Path(__file__).parent / 'assets' / 'tiny-{000000..000001}.tar'}",
            "data.resolution=16",
        ],
    }


@pytest.fixture(scope="session")
def straight_run(tiny_assets, tmp_path_factory):
    """The uninterrupted 2-rank reference run that resume and fault tests compare against, started
    with torchrun as users start it (the other runs use tests/support/spawn_ranks.py, which skips its agent)."""
    from tests.support.launch import run, torchrun_cmd
    from tests.support.runs import TRAIN, train_cmd

    out = tmp_path_factory.mktemp("straight") / "a"
    run(torchrun_cmd(2, TRAIN, *train_cmd(1, out, tiny_assets)[2:]), timeout=300)
    return out


@pytest.fixture(scope="module")
def info():
    """A 1-rank gloo process group in this process (the unit tests of the checkpointer and the
    post-hoc profiles), torn down with the module; the launcher variables are restored after."""
    import torch.distributed as dist

    from sd_train.config import DistArgs
    from sd_train.parallel.process_group import free_port, init_distributed

    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    yield init_distributed(DistArgs(backend="gloo"))
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k)
        else:
            os.environ[k] = v


def pytest_itemcollected(item):
    """`make test` runs two pytest sessions side by side: `-m multiproc` (every test that starts
    several ranks, one at a time: 2 ranks already fill 2 cores) and `-m "not multiproc"` (the
    single-process tests, beside them). The users of the 2-rank reference run, and test_train's
    runs, count as multiproc too, so that run is built in one session only. Marked as each test is
    collected, before `-m` selects."""
    if "straight_run" in getattr(item, "fixturenames", ()) or item.path.name == "test_train.py":
        item.add_marker(pytest.mark.multiproc)
