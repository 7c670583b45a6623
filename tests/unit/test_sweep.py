"""`sd-train sweep`: expansion (grid, seeded random), validation before anything runs, and the
four outputs (dry-run lines, the local loop, the SLURM array files, the wandb sweep config)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import sd_train.tools.sweep as sweep_mod
from sd_train.config import load_config
from sd_train.tools.sweep import main_sweep
from tests.support.launch import REPO, fake_slurm_bin, slurm_env

BASE = str(REPO / "configs" / "test.yaml")


def _write(tmp_path: Path, **body) -> Path:
    doc = {
        "name": "s",
        "base_config": BASE,
        "method": "grid",
        "parameters": {"optim.lr": [1.0e-3, 3.0e-4], "ema.decay": [0.4, 0.5]},
    }
    doc.update(body)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _dry_run(capsys, path: Path, *args: str) -> list[list[str]]:
    assert main_sweep([str(path), "--dry-run", *args]) == 0, capsys.readouterr().err
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def _overrides(words: list[str]) -> list[str]:
    return words[words.index("--config") + 2 :]


def test_grid_dry_run_prints_every_combination(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    runs = _dry_run(capsys, _write(tmp_path, fixed={"max_steps": 12}), "--out", str(out), "--", "eval.every_steps=0")
    assert [r[0] for r in runs] == [
        "s-00-lr0.001-decay0.4",
        "s-01-lr0.001-decay0.5",
        "s-02-lr3e-4-decay0.4",
        "s-03-lr3e-4-decay0.5",
    ]
    combos = [("0.001", "0.4"), ("0.001", "0.5"), ("0.0003", "0.4"), ("0.0003", "0.5")]
    for words, (lr, decay) in zip(runs, combos):
        name = words[0]
        assert words[1:5] == [sys.executable, "train.py", "--config", BASE]
        assert _overrides(words) == [
            "max_steps=12",
            f"optim.lr={lr}",
            f"ema.decay={decay}",
            "eval.every_steps=0",
            f"output_dir={out / name}",
            f"run_name={name}",
            "metrics.wandb_group=s",
        ]
        cfg = load_config(BASE, _overrides(words))  # the overrides mean what the names say
        assert (cfg.optim.lr, cfg.ema.decay, cfg.run_name) == (float(lr), float(decay), name)


def test_random_is_deterministic_by_seed(tmp_path: Path, capsys) -> None:
    params = {"optim.lr": [1e-3, 5e-4, 2e-4], "optim.warmup_steps": [0, 2, 4], "objective.snr_gamma": [None, 5.0]}
    path = _write(tmp_path, method="random", num_runs=5, seed=7, parameters=params)
    first = _dry_run(capsys, path)
    assert len(first) == 5 and first == _dry_run(capsys, path)
    picked = [tuple(_overrides(w)[:3]) for w in first]
    assert len(set(picked)) == 5, "random runs are distinct combinations"
    other = _dry_run(capsys, _write(tmp_path, method="random", num_runs=5, seed=8, parameters=params))
    assert [tuple(_overrides(w)[:3]) for w in other] != picked
    assert {p[2] for p in picked} <= {"objective.snr_gamma=null", "objective.snr_gamma=5.0"}
    too_many = _write(tmp_path, method="random", num_runs=19, seed=0, parameters=params)
    assert main_sweep([str(too_many), "--dry-run"]) == 2
    assert "num_runs=19" in capsys.readouterr().err


@pytest.mark.parametrize(
    "body, named",
    [
        ({"parameters": {"optim.lrr": [1e-3]}}, "optim.lrr"),  # not a TrainConfig key
        ({"parameters": {"optim.lr": []}}, "optim.lr"),  # empty list
        ({"parameters": {"optim.lr": 1e-3}}, "optim.lr"),  # not a list
        ({"paramters": {}}, "paramters"),  # unknown top-level key
        ({"fixed": {"output_dir": "x"}}, "output_dir"),  # the sweep owns it
        ({"seed": 3}, "seed"),  # grid has no draw to seed
        ({"parameters": {"ema.decay": [0.5, 0.99]}}, "ema.decay"),  # EMA plan refused for 0.99
        ({"base_config": "configs/nope.yaml"}, "configs/nope.yaml"),
    ],
)
def test_bad_sweep_files_are_refused_naming_the_key(tmp_path: Path, capsys, body: dict, named: str) -> None:
    assert main_sweep([str(_write(tmp_path, **body)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sweep error:") and named in err, err


def test_extra_overrides_may_not_touch_swept_keys(tmp_path: Path, capsys) -> None:
    assert main_sweep([str(_write(tmp_path)), "--dry-run", "--", "optim.lr=1.0"]) == 2
    assert "optim.lr" in capsys.readouterr().err


def test_wandb_config_structure_and_agent_command(tmp_path: Path, capsys) -> None:
    params = {"optim.lr": [1e-3, 3e-4], "objective.snr_gamma": [None, 5.0]}
    path = _write(tmp_path, parameters=params, fixed={"max_steps": 12})
    out = tmp_path / "out"
    assert main_sweep([str(path), "--wandb", "--out", str(out), "--", "eval.every_steps=0"]) == 0, (
        capsys.readouterr().err
    )
    cfg = yaml.safe_load((out / "wandb_sweep.yaml").read_text())
    assert cfg["program"] == "train.py" and cfg["method"] == "grid" and cfg["name"] == "s"
    assert cfg["parameters"] == {
        "optim.lr": {"values": [1e-3, 3e-4]},
        "objective.snr_gamma": {"values": ["null", 5.0]},
        "max_steps": {"value": 12},
    }
    core = ["${env}", "python", "${program}", "--config", BASE, "${args_no_hyphens}"]
    cmd = cfg["command"]
    start = cmd.index("${env}")
    assert cmd[start : start + len(core)] == core

    # Render it as the agent does (wandb's own code), with `python -c` standing in for train.py.
    utils = pytest.importorskip("wandb.sdk.launch.sweeps.utils")
    sampled = {
        "args": {"optim.lr": {"value": 3e-4}, "objective.snr_gamma": {"value": "null"}, "max_steps": {"value": 12}}
    }
    macros = utils.create_sweep_command_args(sampled)
    macros.update(
        env=["/usr/bin/env"], program=["-c", "import sys; print(repr(sys.argv[1:]))"], python=[sys.executable]
    )
    argv = []
    for part in cmd:
        if part.startswith("${"):
            argv += macros[part[2:-1]]
        else:
            argv += macros["python"] if part == "python" else [part]
    got = eval(
        subprocess.run(
            argv, env={"WANDB_RUN_ID": "abc123", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True
        ).stdout
    )
    assert got[:2] == ["--config", BASE]
    assert got[-2:] == [f"output_dir={out}/abc123", "run_name=abc123"]
    trained = load_config(BASE, got[2:])
    assert (trained.optim.lr, trained.objective.snr_gamma, trained.max_steps) == (3e-4, None, 12)
    assert trained.metrics.wandb and trained.metrics.wandb_group == "s" and trained.eval.every_steps == 0


def test_slurm_array_files(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    path = _write(tmp_path)
    assert main_sweep([str(path), "--slurm", "--out", str(out)]) == 0
    assert "sbatch " in capsys.readouterr().out  # says how to submit
    script = (out / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-3\n" in script
    lines = (out / "runs.txt").read_text().splitlines()
    dry = _dry_run(capsys, path, "--out", str(out))
    assert [shlex.split(ln) for ln in lines] == [_overrides(w) for w in dry]

    # Array task 2 through the real sd_train.sbatch with a fake srun: node commands carry run 2.
    bin_dir = fake_slurm_bin(tmp_path / "fake")
    log = tmp_path / "fake" / "log"
    env = slurm_env(
        f"{bin_dir}:/usr/bin:/bin",
        SLURM_NNODES="1",
        SLURM_JOB_NODELIST="gpu-07",
        SLURM_ARRAY_TASK_ID="2",
        FAKE_LOG=str(log),
        FAKE_HOSTS="gpu-07",
        ACCELERATE=str(bin_dir / "accelerate"),
        SLURM_SUBMIT_DIR=str(REPO),
    )
    proc = subprocess.run(["bash", str(out / "sweep.sbatch")], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    node = shlex.split((log / "node0").read_text())
    assert node[node.index("train.py") :] == ["train.py", "--config", BASE, *_overrides(dry[2])]

    # --submit needs sbatch; without it the error says so and nothing is submitted.
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main_sweep([str(path), "--slurm", "--submit", "--out", str(tmp_path / "out2")]) == 2
    assert "sbatch not found on PATH" in capsys.readouterr().err


def test_local_runs_in_order_and_stops_at_the_first_failure(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    record = tmp_path / "ran.txt"
    # Stand-in for train.py: log the run, fail (exit 3) on the second one.
    code = (
        f"import sys; open({str(record)!r}, 'a').write(sys.argv[-2] + '\\n'); "
        "sys.exit(3 if '-01-' in sys.argv[-2] else 0)"
    )
    monkeypatch.setattr(sweep_mod, "train_command", lambda sweep, run: [sys.executable, "-c", code, *run.overrides])
    assert main_sweep([str(_write(tmp_path)), "--local", "--out", str(tmp_path / "out")]) == 3
    assert record.read_text().split() == ["run_name=s-00-lr0.001-decay0.4", "run_name=s-01-lr0.001-decay0.5"]
    assert "failed with exit code 3; 2 later runs not started" in capsys.readouterr().err


@pytest.mark.parametrize("name, runs", [("lr_ema.yaml", 4), ("random_example.yaml", 4)])
def test_committed_sweeps_expand(capsys, monkeypatch, name: str, runs: int) -> None:
    monkeypatch.chdir(REPO)
    assert len(_dry_run(capsys, Path("configs/sweeps") / name)) == runs


def test_ctrl_c_lets_the_running_training_save() -> None:
    """A terminal's Ctrl-C reaches both `sd-train sweep --local` and its training run. The sweep
    must go on waiting while the run saves and exits 130 (subprocess.run alone raised
    KeyboardInterrupt and SIGKILLed the run in the middle of its save). The child here presses
    Ctrl-C on the sweep process itself, then takes its time before exiting 130."""
    child = "import os, signal, time; os.kill(os.getppid(), signal.SIGINT); time.sleep(0.5); raise SystemExit(130)"
    assert sweep_mod._run_in_foreground([sys.executable, "-c", child]) == 130
