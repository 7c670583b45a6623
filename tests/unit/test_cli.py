"""The command line a newcomer meets: every `sd-train` command's two most common mistakes end in one
line naming the fix and exit 2, never a traceback; the help texts say what each flag does; and
`sd-train plan` and `train.py --plan` are one path that previews any world size.

The commands run in this process through `sd_train.cli.main`, the function behind the `sd-train`
script (one subprocess checks the script itself)."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sd_train import __version__, cli
from sd_train.config import MODEL_SUBFOLDERS

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "tests" / "assets"


@pytest.fixture(autouse=True)
def _keep_this_process_as_it_is(monkeypatch):
    """`cli.main` quiets third-party libraries process-wide (environment, warning filters) before it
    imports a command; the test process keeps its own settings."""
    monkeypatch.setattr(cli.console, "setup", lambda verbose=False: None)


def sd_train(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `sd-train ARGV`; an exception other than argparse's own exit
    (a traceback for the user) fails the test."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse: usage errors (2) and --help (0)
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    """Folders for the mistakes: nothing, an empty folder, a run without a complete checkpoint (an
    unfinished save and a step folder without DCP's .metadata), a model folder's layout, and a
    quality run that exists already."""
    root = tmp_path_factory.mktemp("mistakes")
    (root / "empty").mkdir()
    ckpts = root / "run" / "checkpoints"
    (ckpts / ".step_00000004.partial").mkdir(parents=True)
    (ckpts / "step_00000008").mkdir()
    (ckpts / "step_00000008" / "trainer_state.json").write_text("{}")
    model = root / "model"
    for sub in MODEL_SUBFOLDERS:
        (model / sub).mkdir(parents=True)
    (model / "vae" / "config.json").write_text('{"block_out_channels": [32, 64]}')
    (root / "quality" / "run").mkdir(parents=True)
    return {
        "nowhere": str(root / "nowhere"),
        "empty": str(root / "empty"),
        "run": str(root / "run"),
        "step": str(ckpts / "step_00000008"),
        "model": str(model),
        "out": str(root / "out"),
        "quality": str(root / "quality"),
        "shards": f"{ASSETS}/tiny-{{000000..000005}}.tar",
        "val": f"{ASSETS}/tiny-000000.tar",
    }


def valid(places: dict[str, str]) -> list[str]:
    """Overrides that make configs/test.yaml pass validation and preflight on this machine."""
    return [
        f"model.pretrained_path={places['model']}",
        f"data.train_shards={places['shards']}",
        f"data.val_shards={places['val']}",
    ]


# (command, arguments with {place} fields, what the one line must say)
MISTAKES = [
    ("train", ["--config", "configs/nope.yaml"], "--config configs/nope.yaml: no such file"),
    ("train", ["--config", "configs/test.yaml", "optim.lrr=1"], "unknown config key optim.lrr. Did you mean optim.lr?"),
    ("plan", ["--config", "configs/nope.yaml"], "--config configs/nope.yaml: no such file"),
    ("plan", ["--config", "configs/test.yaml", "max_steps=ten"], "max_steps must be an integer, got 'ten'"),
    ("prepare-emoji", ["--out", "{out}", "--subset", "apple,rocketship"], "no emoji named ['apple', 'rocketship']"),
    ("prepare-emoji", ["--out", "{out}", "--resolution", "0"], "--resolution: '0': give a positive whole number"),
    ("prepare", ["--src", "{nowhere}", "--out", "{out}"], "--src {nowhere}: no such folder"),
    ("prepare", ["--src", "{empty}", "--out", "{out}"], "no image with a same-stem .txt caption file"),
    ("build-tiny", ["--data", "{nowhere}", "--out", "{out}"], "--data {nowhere}: no train shards there"),
    ("build-tiny", ["--data", "{empty}", "--out", "{out}", "--resolution", "31"], "must be a positive even number"),
    ("export", ["--checkpoint", "{run}", "--out", "{out}"], "no complete checkpoint in {run}/checkpoints"),
    ("export", ["--checkpoint", "{step}", "--out", "{out}"], "--checkpoint {step} is not a complete checkpoint"),
    ("sweep", ["{nowhere}.yaml", "--dry-run"], "sweep file {nowhere}.yaml: no such file"),
    ("sweep", ["configs/sweeps/lr_ema.yaml"], "one of the arguments --dry-run --local --slurm --wandb is required"),
    (
        "precompute",
        ["--model", "{nowhere}", "--src", "{shards}", "--out", "{out}", "--resolution", "32"],
        "cannot read block_out_channels",
    ),
    (
        "precompute",
        ["--model", "{model}", "--src", "{nowhere}/x-{{000000..000001}}.tar", "--out", "{out}", "--resolution", "32"],
        "no shards in",
    ),
    ("posthoc", ["--run", "{nowhere}"], "--run {nowhere}: {nowhere} is not a folder"),
    ("posthoc", ["--run", "{run}"], "holds no complete snapshot"),
    ("quality", ["--config", "configs/nope.yaml", "--out", "{out}"], "--config configs/nope.yaml: no such file"),
    ("quality", ["--config", "configs/test.yaml", "--out", "{quality}", "VALID"], "already exists"),
]


@pytest.mark.parametrize("command,args,says", MISTAKES, ids=[f"{m[0]}-{i % 2}" for i, m in enumerate(MISTAKES)])
def test_each_commands_common_mistakes_exit_2_with_one_line(command, args, says, places, capsys):
    argv = [a.format(**places) for a in args]
    if argv[-1] == "VALID":
        argv = argv[:-1] + valid(places)
    rc, out, err = sd_train([command, *argv], capsys)
    assert rc == 2, (out, err)
    assert says.format(**places) in err, err
    assert "Traceback" not in out + err
    assert len([ln for ln in err.splitlines() if "error" in ln]) == 1, err


def test_the_script_itself_prints_one_line(places):
    """The installed `sd-train` script, a real process: a mistake is one line on stderr, exit 2."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "sd-train"), "train", "--config", "configs/test.yaml", *valid(places),
         "optim.lrr=1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr.splitlines() == ["config error: unknown config key optim.lrr. Did you mean optim.lr?"]


# ---- help ---------------------------------------------------------------------------------------


def help_of(argv: list[str], capsys) -> str:
    rc, out, err = sd_train([*argv, "--help"], capsys)
    assert rc == 0, err
    return " ".join(out.split())  # argparse wraps lines where the terminal width says


def test_help_texts(capsys):
    assert help_of(["train"], capsys).startswith("usage: sd-train train ")
    assert "'demo' (the 16 of `make demo`)" in help_of(["prepare-emoji"], capsys)
    assert "--weights {ema,raw} which UNet: ema (default" in help_of(["export"], capsys)
    assert "a run's output_dir or its checkpoints/ (the newest complete step is taken)" in help_of(["export"], capsys)
    assert "--config CONFIG the run's YAML config file" in help_of(["plan"], capsys)
    assert "(default 0.05: more than 5% of its weighting" in help_of(["posthoc"], capsys)
    sweep = help_of(["sweep"], capsys)
    assert "parameters: # required; sd-train keys" in sweep and "base_config: configs/test.yaml" in sweep
    assert "sd_train/tools/sweep.py" not in sweep, "the format is in the help, not behind a source file"
    for argv in (["--version"], ["train", "--version"], ["plan", "--version"]):
        rc, out, _ = sd_train(argv, capsys)
        assert rc == 0 and out.strip() == f"sd-train {__version__}", argv


# ---- the plan -----------------------------------------------------------------------------------


def plan(argv: list[str], capsys, via: str) -> tuple[int, str, str]:
    """`sd-train plan ARGV` or `train.py --plan ARGV` (entry.main, what train.py calls)."""
    if via == "sd-train plan":
        return sd_train(["plan", *argv], capsys)
    from sd_train.entry import main

    rc = main(["--plan", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_plan_and_train_plan_are_one_path(places, capsys, tmp_path):
    """Both validate at the previewed world size, print the same plan (batch arithmetic with the
    accumulation, output locations, the EMA and post-hoc plans) and exit 0, or 2 with one line."""
    args = [
        "--config",
        "configs/test.yaml",
        *valid(places),
        f"output_dir={tmp_path / 'r'}",
        "--world-size",
        "4",
        "micro_batch_size=1",
        "ema.posthoc.sigma_rels=[0.05,0.1]",
        "ema.posthoc.snapshot_every=2",
    ]
    a, b = plan(args, capsys, "sd-train plan"), plan(args, capsys, "train.py --plan")
    assert a == b and a[0] == 0, a
    out = a[1]
    assert "sd-train plan: configs/test.yaml at world size 4 (from --world-size)" in out
    assert "global 8 = 4 ranks x micro-batch 1 x 2 accumulation steps" in out
    assert f"output_dir            {tmp_path / 'r'}/ (new: starts at step 0)" in out
    assert "checkpoints/          every 4 steps and the last, keeping the newest 2" in out
    assert "posthoc/              3 post-hoc EMA snapshots" in out  # steps 8, 10, 12
    assert "EMA plan:" in out and "Post-hoc EMA plan:" in out and out.rstrip().endswith("config OK")
    # The world size is checked for real: 8 ranks x micro-batch 4 cannot make a global batch of 8.
    bad = [*args[:-5], "--world-size", "8"]
    for via in ("sd-train plan", "train.py --plan"):
        rc, out, err = plan(bad, capsys, via)
        assert rc == 2 and "global_batch_size=8 is not divisible by world_size (8) x micro_batch_size (4)" in err
        assert "config error" in err and len(err.strip().splitlines()) == 1


def test_plan_names_the_missing_shards_of_a_partial_range(places, capsys):
    """train-{000000..000009}.tar with 8 shards there passed as "config OK" without a word: the plan
    names the missing ones (they are skipped and counted as bad input at run time)."""
    argv = ["--config", "configs/test.yaml", *valid(places), f"data.train_shards={ASSETS}/tiny-{{000000..000007}}.tar"]
    rc, out, err = plan(argv, capsys, "sd-train plan")
    assert rc == 0, err
    assert (
        "WARNING: data.train_shards: 2 of the 8 shards 'PATH/tiny-{000000..000007}.tar' names are missing: "
        "tiny-000006.tar, tiny-000007.tar".replace("PATH", str(ASSETS))
    ) in out, out


def test_gpu_memory_plans_a_gpu_run_and_refuses_what_does_not_fit(tiny_assets, capsys, tmp_path):
    """`--gpu-memory-gib` plans the device of another machine: the plan prints with its limit; a
    device too small for the model states is refused (exit 2) after the plan has printed."""
    args = ["--config", "configs/test.yaml", *tiny_assets["overrides"], f"output_dir={tmp_path / 'r'}"]
    rc, out, err = plan(
        [*args, "--world-size", "8", "--gpu-memory-gib", "80", "micro_batch_size=1"], capsys, "sd-train plan"
    )
    assert rc == 0, err
    assert "Memory plan, GiB per rank (world 8, shard group 8; GPU run)" in out and "of 80.00 GiB" in out
    assert "memory verdict: fits" in out and out.rstrip().endswith("config OK")
    rc, out, err = plan([*args, "--gpu-memory-gib", "0.5"], capsys, "train.py --plan")
    assert rc == 2 and "memory verdict: does not fit" in out and "config OK" not in out
    assert "exceeds the GPU's memory, 0.50 GiB" in err and "Largest items" in err and "CUDA context" in err


def test_a_start_refuses_plan_only_flags(places, capsys):
    rc, _, err = sd_train(["train", "--config", "configs/test.yaml", *valid(places), "--world-size", "8"], capsys)
    assert rc == 2 and "preview a plan: add --plan" in err


def test_partial_range_warning_is_the_main_processes_only(places, capsys, monkeypatch):
    """Under a launcher every rank runs the checks; rank 1 says nothing (the rank-aware logger)."""
    from sd_train import console

    monkeypatch.setattr(console._FILTER, "rank", 1)
    argv = ["--config", "configs/test.yaml", *valid(places), f"data.train_shards={ASSETS}/tiny-{{000000..000007}}.tar"]
    rc, out, err = plan(argv, capsys, "sd-train plan")
    assert rc == 0 and out == "" and err == ""
    logging.getLogger("sd_train.trainer").info("any rank", extra=console.ANY_RANK)
    assert capsys.readouterr().out == "[rank 1] any rank\n"


def test_the_plan_counts_post_hoc_bytes_from_the_safetensors_header(tmp_path):
    """The post-hoc plan's parameter count comes from the UNet file's header, torch-free; it equals
    the element count of every tensor in the file."""
    import torch
    from safetensors.torch import save_file

    from sd_train.run_plan import unet_param_count

    tensors = {"a.weight": torch.zeros(3, 5), "b.bias": torch.zeros(7), "c": torch.zeros(2, 2, 2)}
    (tmp_path / "unet").mkdir()
    save_file(tensors, str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    save_file({"x": torch.zeros(99)}, str(tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    assert unet_param_count(str(tmp_path)) == 15 + 7 + 8
    shutil.rmtree(tmp_path / "unet")
    assert unet_param_count(str(tmp_path)) is None


# ---- the post-hoc table -------------------------------------------------------------------------


def test_the_posthoc_table_names_the_best_overall_and_explains_a_short_length():
    """When the raw weights score lowest, the table says so (it used to name the best EMA "best");
    a classic decay whose horizon is longer than the window is flagged, with why its length is short."""
    from sd_train.ema.posthoc_math import classic_weights, power_weights, sigma_rel_to_gamma
    from sd_train.tools.posthoc import Target, loss_notes

    n = 15  # a 15-step window, as in a short run
    targets = [
        Target("sigma_rel", 0.05, power_weights(sigma_rel_to_gamma(0.05), n)),
        Target("decay", 0.9, classic_weights(0.9, n)),  # horizon 10 steps: fits the window
        Target("decay", 0.99, classic_weights(0.99, n)),  # horizon 100 steps: cut by the window
    ]
    losses = {"raw": 0.6777, "late_ema": 0.7283, "sigma_rel_0.05": 0.6875, "decay_0.9": 0.70, "decay_0.99": 1.0179}
    text = "\n".join(loss_notes(losses, targets, 5, 20))
    assert "best overall: raw at 0.677700, lower than every EMA" in text
    assert "best EMA: sigma_rel_0.05 at 0.687500 (+0.009800 vs raw)" in text
    assert "steps 5..20, as a share of the window" in text
    assert "* decay_0.99: its horizon 1/(1-decay) = 100 steps is longer than the 15-step window" in text
    assert "decay_0.9:" not in text, "a decay that fits the window needs no note"
    assert targets[2].length < 0.29, "the cut decay's length is near a uniform window's (0.289), not 100/15"
    losses["sigma_rel_0.05"] = 0.6
    assert "best overall: sigma_rel_0.05 at 0.600000 (-0.077700 vs raw, raw 0.677700)" in "\n".join(
        loss_notes(losses, targets, 5, 20)
    )


def test_export_takes_the_newest_complete_step_of_a_run(tmp_path):
    """`--checkpoint RUN_DIR` and `--checkpoint RUN_DIR/checkpoints` mean the newest complete step
    (an unfinished save and a folder without .metadata do not count); a step folder means itself."""
    from sd_train.export import resolve_checkpoint

    root = tmp_path / "run" / "checkpoints"
    for step, complete in ((4, True), (8, True), (12, False)):
        folder = root / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text("{}")
        if complete:
            (folder / ".metadata").write_text("")
    (root / ".step_00000016.partial").mkdir()
    for given in (tmp_path / "run", root):
        folder, which = resolve_checkpoint(given)
        assert folder == root / "step_00000008"
        assert which == f"the newest complete checkpoint of {root}: step_00000008 (of step_00000004, step_00000008)"
    assert resolve_checkpoint(root / "step_00000004") == (
        root / "step_00000004",
        f"step folder {root / 'step_00000004'}",
    )
