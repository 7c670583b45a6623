"""`sd-train sweep FILE`: expand a sweep file into training runs, then print, run, or submit them.

Sweep file (YAML; paths are relative to the directory sd-train runs from, the repository root):

    name: lr-ema                     # required; [A-Za-z0-9._-], names the runs and the wandb group
    base_config: configs/test.yaml   # required; the config every run starts from
    method: grid                     # grid: every combination; random: `num_runs` of them
    parameters:                      # required; sd-train keys (as in key.sub=value) -> values
      optim.lr: [1.0e-3, 3.0e-4]
      ema.decay: [0.4, 0.5]
    fixed:                           # optional; the same override in every run
      max_steps: 12
    num_runs: 3                      # random only: how many distinct combinations to draw
    seed: 0                          # random only: seed of the draw (the training seed is a
                                     # config key: put `seed: N` under fixed or parameters)

Grid runs enumerate the combinations with the last parameter varying fastest. Random runs draw
`num_runs` distinct combinations from the same grid, in an order fixed by `seed`. Each run is named
`<name>-<index>-<key><value>...` from the last part of each swept key, e.g.
`lr-ema-00-lr0.001-decay0.4`, and gets the overrides
`<fixed> <parameters> <extra> output_dir=<out>/<run name> run_name=<run name>
metrics.wandb_group=<name>`, where <out> is `--out` (default runs/sweeps/<name>) and <extra> the
overrides given after `--` on the command line.

Before anything runs, every run's overrides are loaded with `load_config` (unknown keys and wrong
types are refused, naming the key) and its EMA plan is checked; the rest of the validation (data,
model folder, world size) happens when each run starts.

    sd-train sweep FILE --dry-run [-- key=value ...]  # one line per run: name, then the command
    sd-train sweep FILE --local   [-- key=value ...]  # run them one after another; stop at the
                                                      # first failure with its exit code
    sd-train sweep FILE --slurm [--submit] [--nodes N] [--gpus-per-node G] [--max-parallel K]
                                [--sbatch-arg=--partition=gpu ...]
                                # write <out>/runs.txt and the array script <out>/sweep.sbatch
    sd-train sweep FILE --wandb # write <out>/wandb_sweep.yaml for `wandb sweep` + `wandb agent`

Running a sweep again resumes each run from its newest checkpoint (`checkpoint.resume=auto` is the
default and every run has its own output_dir), so an interrupted `--local` sweep picks up where it
stopped. Exit codes: 0 done, 2 a sweep-file or config error, otherwise the failing run's code.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import itertools
import math
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from sd_train.config import ConfigError, load_config
from sd_train.ema.plan import plan_from_config

TOP_LEVEL_KEYS = ("name", "base_config", "method", "parameters", "fixed", "num_runs", "seed")
# Set per run by the sweep; a sweep file or `--` override that sets them would make runs collide.
IDENTITY_KEYS = ("output_dir", "run_name", "metrics.wandb_group")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ARRAY_SCRIPT = "sweep.sbatch"
RUNS_FILE = "runs.txt"
WANDB_FILE = "wandb_sweep.yaml"


class SweepError(ValueError):
    """A sweep file or sweep command line is wrong. The message names the key and the fix."""


@dataclass
class Sweep:
    """One parsed and structurally checked sweep file: what to vary, over which base config."""

    path: Path
    name: str
    base_config: str
    method: str
    parameters: dict[str, list[Any]]
    fixed: dict[str, Any] = field(default_factory=dict)
    num_runs: Optional[int] = None
    seed: int = 0

    @property
    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.parameters.values())


@dataclass(frozen=True)
class Run:
    """One training run of a sweep: its name and the complete override list it trains with."""

    index: int
    name: str
    params: dict[str, Any]
    overrides: tuple[str, ...]


# --------------------------------------------------------------------------------------------
# Loading and checking the sweep file
# --------------------------------------------------------------------------------------------


def render_value(value: Any) -> str:
    """A value as override text that `parse_overrides` (YAML) reads back as the same value: floats
    keep their dot (`1.0e-05`: YAML 1.1 reads `1e-05` as a string), strings that look like other
    types stay quoted."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    return text[: -len("\n...")] if text.endswith("\n...") else text


def _override_keys(overrides: list[str], what: str) -> list[str]:
    keys = []
    for item in overrides:
        if "=" not in item:
            raise SweepError(f"{what} {item!r} is not of the form section.key=value")
        keys.append(item.split("=", 1)[0].strip())
    return keys


def _check_mapping_keys(values: Any, where: str) -> dict[str, Any]:
    if not isinstance(values, dict) or not values:
        raise SweepError(f"{where} must be a non-empty mapping of sd-train keys, e.g. `optim.lr: [1.0e-4, 3.0e-4]`")
    for key in values:
        if not isinstance(key, str) or not key:
            raise SweepError(f"{where}: key {key!r} must be an sd-train key such as optim.lr")
        if key in IDENTITY_KEYS:
            raise SweepError(f"{where}.{key}: the sweep sets {', '.join(IDENTITY_KEYS)} for each run; remove it")
    return values


def _check_parameters(raw: Any, where: str) -> dict[str, list[Any]]:
    params = _check_mapping_keys(raw, where)
    for key, values in params.items():
        if not isinstance(values, list):
            raise SweepError(f"{where}.{key} must be a list of values, got {values!r}: write [{render_value(values)}]")
        if not values:
            raise SweepError(f"{where}.{key} is an empty list: give at least one value, or remove the key")
        rendered = [render_value(v) for v in values]
        dupes = sorted({r for r in rendered if rendered.count(r) > 1})
        if dupes:
            raise SweepError(f"{where}.{key} lists {', '.join(dupes)} more than once: remove the duplicates")
    return params


def load_sweep(path: str | Path) -> Sweep:
    """Read a sweep file and check its structure (not yet the sd-train keys: see `expand`)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path}: no such file. Examples are in configs/sweeps/")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: the top level must be a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(str(key), TOP_LEVEL_KEYS, n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise SweepError(f"{path}: unknown sweep key {key!r}. Known keys: {', '.join(TOP_LEVEL_KEYS)}.{hint}")
    for key in ("name", "base_config", "parameters"):
        if key not in raw:
            raise SweepError(f"{path}: missing required key {key!r}")
    name = raw["name"]
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise SweepError(f"{path}: name={name!r} must be letters, digits, '.', '_' or '-' (it names folders and runs)")
    base = raw["base_config"]
    if not isinstance(base, str) or not Path(base).is_file():
        raise SweepError(
            f"{path}: base_config={base!r}: no such file. Paths are relative to where sd-train runs "
            "(the repository root), e.g. configs/test.yaml"
        )
    method = raw.get("method", "grid")
    if method not in ("grid", "random"):
        raise SweepError(f"{path}: method={method!r} must be grid or random")
    params = _check_parameters(raw["parameters"], f"{path}: parameters")
    fixed = {} if raw.get("fixed") in (None, {}) else _check_mapping_keys(raw["fixed"], f"{path}: fixed")
    both = sorted(set(params) & set(fixed))
    if both:
        raise SweepError(f"{path}: {', '.join(both)} is both swept (parameters) and fixed: keep one")
    sweep = Sweep(path, name, base, method, params, dict(fixed))
    _check_method_keys(sweep, raw)
    return sweep


def _check_method_keys(sweep: Sweep, raw: dict) -> None:
    where = f"{sweep.path}"
    if sweep.method == "grid":
        for key in ("num_runs", "seed"):
            if key in raw:
                raise SweepError(
                    f"{where}: {key} is for method: random; a grid runs every combination. (For the "
                    "training seed, put `seed: N` under fixed.)"
                )
        return
    num_runs, seed = raw.get("num_runs"), raw.get("seed", 0)
    if isinstance(num_runs, bool) or not isinstance(num_runs, int) or num_runs < 1:
        raise SweepError(f"{where}: method: random needs num_runs, a positive integer (got {num_runs!r})")
    if num_runs > sweep.grid_size:
        raise SweepError(
            f"{where}: num_runs={num_runs} exceeds the {sweep.grid_size} distinct combinations of "
            "parameters: lower num_runs, add values, or use method: grid"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SweepError(f"{where}: seed={seed!r} must be an integer")
    sweep.num_runs, sweep.seed = num_runs, seed


# --------------------------------------------------------------------------------------------
# Expanding into runs
# --------------------------------------------------------------------------------------------


def _name_part(value: Any) -> str:
    """A short, filesystem-safe spelling of a value for run names: 1e-4 -> `1e-4`, 0.999 -> `0.999`."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            mantissa, exponent = f"{value:.6e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return f"{value:.6g}"
    if isinstance(value, list):
        return "_".join(_name_part(v) for v in value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(value)).strip("_")[:40] or "x"


def _label(short_key: str, value: Any) -> str:
    """`lr1e-4` for numbers; `prediction_type_epsilon` for words, which would run together."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"{short_key}{'' if number else '_'}{_name_part(value)}"


def _short_keys(keys: list[str]) -> dict[str, str]:
    """`optim.lr` -> `lr`, unless two swept keys end the same way; then the full key, `optim_lr`."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k.replace(".", "_")) for k, s in zip(keys, last)}


def _combinations(sweep: Sweep) -> list[tuple[Any, ...]]:
    values = list(sweep.parameters.values())
    if sweep.method == "grid":
        return list(itertools.product(*values))
    # Draw distinct grid indices without building the grid, then decode each (last key fastest).
    picks = random.Random(sweep.seed).sample(range(sweep.grid_size), sweep.num_runs or 0)
    combos = []
    for index in picks:
        combo = []
        for vals in reversed(values):
            index, i = divmod(index, len(vals))
            combo.append(vals[i])
        combos.append(tuple(reversed(combo)))
    return combos


def expand(sweep: Sweep, out_root: Path, extra: list[str] = ()) -> list[Run]:
    """All runs of the sweep, each validated with load_config + the EMA plan check. Raises
    SweepError naming the run and the key."""
    extra = list(extra)
    clash = sorted(set(_override_keys(extra, "override")) & (set(sweep.parameters) | set(IDENTITY_KEYS)))
    if clash:
        raise SweepError(
            f"override {', '.join(clash)} after `--` would overwrite what the sweep sets per run: "
            "change the sweep file instead"
        )
    fixed = [f"{k}={render_value(v)}" for k, v in sweep.fixed.items()]
    shorts = _short_keys(list(sweep.parameters))
    combos = _combinations(sweep)
    width = max(2, len(str(len(combos) - 1)))
    runs = []
    for index, combo in enumerate(combos):
        params = dict(zip(sweep.parameters, combo))
        label = "-".join(_label(shorts[k], v) for k, v in params.items())
        name = f"{sweep.name}-{index:0{width}d}-{label}"
        overrides = (
            fixed
            + [f"{k}={render_value(v)}" for k, v in params.items()]
            + extra
            + [f"output_dir={out_root / name}", f"run_name={name}", f"metrics.wandb_group={sweep.name}"]
        )
        _validate_run(sweep, name, overrides)
        runs.append(Run(index, name, params, tuple(overrides)))
    return runs


def _validate_run(sweep: Sweep, name: str, overrides: list[str]) -> None:
    try:
        cfg = load_config(sweep.base_config, overrides)
        plan_from_config(cfg.ema, cfg.max_steps).check()
    except ConfigError as e:
        raise SweepError(f"{sweep.path}: run {name}: {e}") from e


def train_command(sweep: Sweep, run: Run) -> list[str]:
    """What `--local` runs for one run (and what `--dry-run` prints)."""
    return [sys.executable, "train.py", "--config", sweep.base_config, *run.overrides]


# --------------------------------------------------------------------------------------------
# The four ways to use the runs
# --------------------------------------------------------------------------------------------


def print_runs(sweep: Sweep, runs: list[Run]) -> int:
    for run in runs:
        print(f"{run.name}  {shlex.join(train_command(sweep, run))}")
    print(f"{len(runs)} runs ({sweep.method}) from {sweep.path}", file=sys.stderr)
    return 0


def run_local(sweep: Sweep, runs: list[Run]) -> int:
    """One run after another in this shell; stop at the first failure and return its exit code."""
    _require_repo_root()
    for i, run in enumerate(runs):
        cmd = train_command(sweep, run)
        print(f"[sweep {sweep.name}] run {i + 1}/{len(runs)}: {run.name}\n  {shlex.join(cmd)}", flush=True)
        code = _run_in_foreground(cmd)
        if code == INTERRUPTED:
            print(
                f"[sweep {sweep.name}] run {run.name} was interrupted (Ctrl-C) and saved its checkpoint; rerun the "
                f"same sweep command to resume it, then the {len(runs) - i - 1} later runs",
                file=sys.stderr,
            )
            return code
        if code != 0:
            code = 128 - code if code < 0 else code  # killed by a signal: the shell's convention
            print(
                f"[sweep {sweep.name}] run {run.name} failed with exit code {code}; "
                f"{len(runs) - i - 1} later runs not started",
                file=sys.stderr,
            )
            return code
    print(f"[sweep {sweep.name}] all {len(runs)} runs finished", flush=True)
    return 0


INTERRUPTED = 130  # a run stopped by Ctrl-C after saving (sd_train.step_signals)


def _run_in_foreground(cmd: list[str]) -> int:
    """Run `cmd` and wait for it. Ctrl-C reaches the run from the terminal itself (it saves and
    exits 130); this process only goes on waiting. subprocess.run alone would answer Ctrl-C by
    killing the run in the middle of its save. A handler, not SIG_IGN: an ignored SIGINT would be
    inherited by the run, and it would ignore Ctrl-C too."""
    previous = signal.signal(signal.SIGINT, _keep_waiting)
    try:
        return subprocess.run(cmd).returncode
    finally:
        signal.signal(signal.SIGINT, previous)


def _keep_waiting(signum, frame) -> None:  # noqa: ARG001
    pass


def _require_repo_root() -> None:
    if not Path("train.py").is_file():
        raise SweepError(f"train.py not found in {Path.cwd()}: run `sd-train sweep` from the sd-train repository root")


def slurm_array_script(sweep: Sweep, n_runs: int, out_root: Path, ns: argparse.Namespace) -> str:
    """The array job: task i reads line i+1 of runs.txt and runs it through sd_train.sbatch."""
    repo = Path.cwd().resolve()
    out = out_root.resolve()
    array = f"0-{n_runs - 1}" + (f"%{ns.max_parallel}" if ns.max_parallel else "")
    header = [
        f"--job-name={sweep.name}",
        f"--array={array}",
        f"--nodes={ns.nodes}",
        "--ntasks-per-node=1",
        f"--gres=gpu:{ns.gpus_per_node}",
        "--exclusive",
        "--requeue",
        "--signal=B:TERM@120",
        "--open-mode=append",
        f"--output={out}/slurm-%A_%a.out",
        *ns.sbatch_arg,
    ]
    q = shlex.quote
    return "\n".join(
        [
            "#!/bin/bash",
            f"# Written by `sd-train sweep {sweep.path} --slurm`: sweep {sweep.name}, {n_runs} runs, one",
            "# array task each. Task i trains the run on line i+1 of runs.txt (its overrides, shell-quoted)",
            "# through launch/slurm/sd_train.sbatch, so signals, requeue and resume work as for one job.",
            *[f"#SBATCH {h}" for h in header],
            "",
            "set -euo pipefail",
            f"cd {q(str(repo))}",
            f"runs={q(str(out / RUNS_FILE))}",
            'line=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$runs")',
            "if [[ -z $line ]]; then",
            '    echo "sweep.sbatch: no line $((SLURM_ARRAY_TASK_ID + 1)) in $runs: rewrite it with '
            'sd-train sweep --slurm" >&2',
            "    exit 2",
            "fi",
            "# The lines were written with Python's shlex.quote, so eval gives back the exact arguments.",
            "overrides=()",
            'eval "overrides=($line)"',
            f'exec bash launch/slurm/sd_train.sbatch {q(sweep.base_config)} "${{overrides[@]}}"',
            "",
        ]
    )


def write_slurm(sweep: Sweep, runs: list[Run], out_root: Path, ns: argparse.Namespace) -> int:
    _require_repo_root()
    if not Path("launch/slurm/sd_train.sbatch").is_file():
        raise SweepError(f"launch/slurm/sd_train.sbatch not found in {Path.cwd()}: run from the repository root")
    if ns.submit and shutil.which("sbatch") is None:
        raise SweepError(
            "--submit: sbatch not found on PATH. Run this on a SLURM login node, or drop --submit and "
            "submit the script there"
        )
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / RUNS_FILE).write_text("".join(shlex.join(run.overrides) + "\n" for run in runs))
    script = out_root / ARRAY_SCRIPT
    script.write_text(slurm_array_script(sweep, len(runs), out_root, ns))
    script.chmod(0o755)
    print(f"wrote {out_root / RUNS_FILE} ({len(runs)} runs) and {script}")
    if not ns.submit:
        print(f"submit from this directory with: sbatch {script}")
        return 0
    return subprocess.run(["sbatch", str(script)]).returncode


def wandb_sweep_config(sweep: Sweep, out_root: Path, extra: list[str]) -> dict[str, Any]:
    """A wandb sweep config whose agent calls `python train.py --config BASE key=value ...`.

    wandb gives every agent run the same command, so the per-run output_dir cannot be a literal
    override: a shared output_dir would make each run resume the previous run's checkpoint
    (checkpoint.resume=auto). A `bash -c` prefix appends output_dir and run_name from
    WANDB_RUN_ID, which the agent sets for each run; `${args_no_hyphens}` renders the swept and
    fixed parameters as `key=value`, our override syntax. wandb draws random runs itself (with
    replacement, up to run_cap); the sweep file's seed does not apply there.
    """
    project = load_config(sweep.base_config).metrics.wandb_project
    per_run = f'exec "$@" output_dir={shlex.quote(str(out_root))}/"$WANDB_RUN_ID" run_name="$WANDB_RUN_ID"'
    parameters: dict[str, Any] = {k: {"values": [_wandb_value(x) for x in v]} for k, v in sweep.parameters.items()}
    parameters.update({k: {"value": _wandb_value(v)} for k, v in sweep.fixed.items()})
    config: dict[str, Any] = {
        "name": sweep.name,
        "project": project,
        "program": "train.py",
        "method": sweep.method,
        "parameters": parameters,
        "command": [
            "bash",
            "-c",
            per_run,
            "sd-train-sweep",
            "${env}",
            "python",
            "${program}",
            "--config",
            sweep.base_config,
            "${args_no_hyphens}",
            "metrics.wandb=true",
            f"metrics.wandb_group={sweep.name}",
            *extra,
        ],
    }
    if sweep.method == "random":
        config["run_cap"] = sweep.num_runs
    return config


def _wandb_value(value: Any) -> Any:
    """The agent writes `key={value}` with Python's str(): None becomes `None`, which our YAML
    overrides read as the string "None". Such values go to wandb as override text (`null`);
    numbers stay numbers (the config reads `1e-05` as a float), so wandb can plot them."""
    if isinstance(value, (int, float)) or yaml.safe_load(str(value)) == value:
        return value
    return render_value(value)


def write_wandb(sweep: Sweep, out_root: Path, extra: list[str]) -> int:
    config = wandb_sweep_config(sweep, out_root, extra)
    out_root.mkdir(parents=True, exist_ok=True)
    path = out_root / WANDB_FILE
    path.write_text(yaml.safe_dump(config, sort_keys=False, width=1 << 30))
    print(
        f"wrote {path}\nthen, from the repository root:\n  wandb sweep --project {config['project']} "
        f"{path}\n  wandb agent <sweep id it prints>"
    )
    return 0


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sd-train sweep",
        description="Expand a sweep file into runs. Overrides after `--` apply to every run.",
        # The module docstring from the file format on: the same text a reader of the source sees.
        epilog=__doc__[__doc__.index("Sweep file") :].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", help="sweep YAML, e.g. configs/sweeps/lr_ema.yaml")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dry-run", action="store_true", help="print one line per run: name and command")
    mode.add_argument("--local", action="store_true", help="run them one after another here")
    mode.add_argument("--slurm", action="store_true", help="write a SLURM array script under --out")
    mode.add_argument("--wandb", action="store_true", help="write a wandb sweep config under --out")
    p.add_argument("--out", help="root of the runs' output dirs and of written files (default runs/sweeps/<name>)")
    p.add_argument("--submit", action="store_true", help="with --slurm: also submit the script with sbatch")
    p.add_argument("--nodes", type=int, default=1, help="with --slurm: nodes per run (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="with --slurm: GPUs per node (default 8)")
    p.add_argument("--max-parallel", type=int, help="with --slurm: at most this many runs at once (--array=0-N%%K)")
    p.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        help="with --slurm: extra #SBATCH line, e.g. --sbatch-arg=--partition=gpu",
    )
    return p


def main_sweep(argv: list[str]) -> int:
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    ns = _parser().parse_args(argv)
    try:
        if ns.submit and not ns.slurm:
            raise SweepError("--submit goes with --slurm: sd-train sweep FILE --slurm --submit")
        if ns.nodes < 1 or ns.gpus_per_node < 1 or (ns.max_parallel is not None and ns.max_parallel < 1):
            raise SweepError("--nodes, --gpus-per-node and --max-parallel must be positive")
        sweep = load_sweep(ns.file)
        out_root = Path(ns.out) if ns.out else Path("runs/sweeps") / sweep.name
        if ns.wandb:
            # wandb may draw any combination, so validate the whole grid, not only our draw.
            expand(dataclasses.replace(sweep, method="grid", num_runs=None), out_root, extra)
            return write_wandb(sweep, out_root, extra)
        runs = expand(sweep, out_root, extra)
        if ns.dry_run:
            return print_runs(sweep, runs)
        if ns.local:
            return run_local(sweep, runs)
        return write_slurm(sweep, runs, out_root, ns)
    except SweepError as e:
        print(f"sweep error: {e}", file=sys.stderr)
        return 2
