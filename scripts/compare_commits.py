#!/usr/bin/env python3
"""Prove that two commits of sd-train give bit-identical results.

    .venv/bin/python scripts/compare_commits.py BASE_REV NEW_REV [--work DIR] [--only fsdp2,zero2,zero3,assets] [--keep]
                                                [--vae-steps N]

Why: a refactor that should not change numerics (modules moving into packages, renames) must give
bit-identical outputs under a fixed seed (STYLE.md, rule 8). Losses that "look the same" are not
proof; this script compares every bit a run writes, for two revisions, and anyone can rerun it.

What it compares (each line printed as PASS/FAIL with a count; exit status 0 only if all pass):
  assets  `sd-train prepare-emoji` and `sd-train build-tiny` run by each revision, as `make data
          tiny-sd` does: the sha256 of every file of data/emoji and models/tiny-sd. Two json
          reports of the build are not byte-stable and pass only if equal without the build's
          `seconds` and with paths normalised (vae_report.json, sd_train_tiny.json's data_dir);
          the output names them.
  fsdp2   for each, a 2-rank CPU run of configs/test.yaml (torchrun for fsdp2, `accelerate launch`
  zero2   with launch/accelerate/zero{2,3}.yaml for DeepSpeed), with data.log_keys=true and
  zero3   checkpoint.keep_last_k=0, then:
          - the same checkpoint step folders, holding the same files;
          - every checkpoint tensor torch.equal: DCP folders through dcp_to_torch_save, DeepSpeed's
            zero/ files, ema_rank_R.pt and rank_R.pt through torch.load (RNG states included);
            non-tensor leaves with ==; trainer_state.json json-equal;
          - metrics.jsonl line by line, without `time`, the `speed/` and `memory/` keys and a save's
            times and bytes (which hold the run folder's path);
          - keys/rank{R}.txt (every consumed sample key) byte-equal;
          - every export/*.safetensors byte-equal (sha256), the other exported files equal;
          - topology.json, ema_plan.json, data_summary.json, config.yaml and samples/.
Paths that name a revision's worktree or run folder are replaced by placeholders (<WORKTREE>,
<OUT>, <DATA>, <MODEL>, <WORK>) before text and json are compared.

How: each revision is checked out with `git worktree add --detach` under --work (default: a temp
folder; both are removed at the end unless --keep) and runs its own code: this interpreter with
PYTHONPATH=<worktree> and cwd=<worktree>, so the worktree's sd_train wins over the editable
install. To keep a difference in the assets from cascading into every run, BOTH revisions train on
the BASE revision's assets. Ranks run with OMP_NUM_THREADS=1, as the test suite does; the asset
builds with one thread per core, as the Makefile does.

--vae-steps N is passed to `build-tiny` of both revisions (default: the revision's own default, 600
steps). The VAE pretraining dominates the asset phase: roughly 2.5 min per revision on 2 idle
cores, 10 to 12 min when the cores are shared with other jobs; with --vae-steps 0 a build takes
about 1.5 min. The comparison stays exact either way, since both revisions build the same way, and
the output says which was used. The script does not import sd_train: it drives two different
checkouts of it.

Known: before sd_train learnt its BPE merges itself, models/tiny-sd's tokenizer was not always
byte-stable, even for identical code. The BPE trainer of `tokenizers` (0.23) breaks ties between
equal-count merges by token ids it assigns in hash-map order, which changes from process to process
(huggingface/tokenizers#1794); about one build in five listed the same merges in another order,
and tokenizer/merges.txt, vocab.json and tokenizer.json differed. The script reports that as a FAIL
and says so on the merges.txt line. Now ties go to the lexicographically smallest pair, so builds
are byte-stable, but a revision from before that change lists other merges than one after it (also
a FAIL). The training runs are not affected (both revisions train on the base's assets).

Expected cost on 2 CPU cores: the asset builds above, then about 30 s per 2-rank run (6 runs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

try:
    import numpy as np
except ImportError:  # torch runs without numpy; then no state holds ndarrays either
    np = None

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN_MODES = ("fsdp2", "zero2", "zero3")
PHASES = ("assets",) + RUN_MODES
STEP_RE = re.compile(r"^step_\d{8}$")
# metrics.jsonl keys that measure the machine, not the numerics.
VOLATILE_PREFIXES = ("speed/", "memory/")
# A save's times, and its bytes per rank: rank 0's files hold the run's own output_dir (the config
# in trainer_state.json, DCP's .metadata), whose path differs in length between the two runs.
VOLATILE_KEYS = {"time", "checkpoint/blocked_s", "checkpoint/save_s", "checkpoint/bytes_per_rank"}
# --allow-added-keys: keys that only the NEW revision writes (a config field, a metric, a topology
# entry that a feature added) are listed as notes instead of failing; every key both write must
# still be equal. For "this feature changed no number", not for a pure refactor.
ALLOW_ADDED = False
# Keys of the asset builds' json reports that time the build (tiny_sd.py's vae_report.json).
BUILD_TIMING_KEYS = {"seconds", "time"}
# The processes of a run: the test suite's environment (tests/support/launch.py).
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SD_TRAIN_FAULT")
RUN_TIMEOUT_S = 1200


@dataclass
class Checkout:
    """One revision checked out in its own worktree."""

    label: str  # "base" or "new"
    rev: str
    sha: str
    wt: Path

    @property
    def data(self) -> Path:
        return self.wt / "data" / "emoji"

    @property
    def model(self) -> Path:
        return self.wt / "models" / "tiny-sd"


@dataclass
class Check:
    """One compared thing: how many items were compared and which differ."""

    group: str
    name: str
    count: int = 0
    diffs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # equal, but only after a documented exception

    @property
    def ok(self) -> bool:
        return not self.diffs

    def line(self) -> str:
        status = "PASS" if self.ok else "FAIL"
        what = f"{self.count} compared" if self.ok else f"{len(self.diffs)} differ of {self.count}"
        text = f"  {status}  {self.group:<6} {self.name:<34} {what}"
        for n in self.notes:
            text += f"\n          note: {n}"
        for d in self.diffs[:5]:
            text += f"\n          {d}"
        if len(self.diffs) > 5:
            text += f"\n          ... and {len(self.diffs) - 5} more"
        return text


# ---- processes ----------------------------------------------------------------------------------


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def remove_worktree(path: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(path)], check=False, cwd=REPO, capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(co: Checkout, threads: int) -> dict[str, str]:
    """This revision's code first on the path; the launcher variables of an outer job removed."""
    e = dict(os.environ)
    for k in LAUNCHER_VARS:
        e.pop(k, None)
    e.update(
        PYTHONPATH=str(co.wt),
        OMP_NUM_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        WANDB_MODE="disabled",
    )
    return e


class RunFailed(RuntimeError):
    pass


def launch(cmd: list[str], co: Checkout, threads: int, log: Path) -> None:
    """Run `cmd` in the revision's worktree; its output goes to `log`, the tail into the error."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(
            cmd,
            check=False,
            cwd=co.wt,
            env=env_for(co, threads),
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=RUN_TIMEOUT_S,
        )
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RunFailed(f"{' '.join(cmd)} exited {proc.returncode} (log {log})\n{tail}")


def build_assets(co: Checkout, work: Path, vae_steps: int | None) -> None:
    """`make data tiny-sd` of this revision, through its own `python -m sd_train.cli`."""
    cli = [sys.executable, "-m", "sd_train.cli"]
    cores = os.cpu_count() or 2
    launch([*cli, "prepare-emoji", "--out", str(co.data)], co, cores, work / "logs" / f"{co.label}-prepare-emoji.log")
    extra = [] if vae_steps is None else ["--vae-steps", str(vae_steps)]
    launch(
        [*cli, "build-tiny", "--data", str(co.data), "--out", str(co.model), *extra],
        co,
        cores,
        work / "logs" / f"{co.label}-build-tiny.log",
    )


def train_cmd(mode: str, out: Path, assets: Checkout) -> list[str]:
    args = [
        "train.py",
        "--config",
        "configs/test.yaml",
        f"output_dir={out}",
        "data.log_keys=true",
        "checkpoint.keep_last_k=0",
        f"model.pretrained_path={assets.model}",
        f"data.train_shards={assets.data}/train-{{000000..000007}}.tar",
        f"data.val_shards={assets.data}/val-000000.tar",
    ]
    if mode == "fsdp2":
        return [str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}", *args]
    return [
        str(BIN / "accelerate"),
        "launch",
        "--config_file",
        f"launch/accelerate/{mode}.yaml",
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        *args,
    ]


# ---- comparing ----------------------------------------------------------------------------------


class Paths:
    """Replaces the paths that name one revision's worktree or run with placeholders."""

    def __init__(self, pairs: list[tuple[Path, str]]):
        # Longest first: a run folder lies inside the work folder.
        self.pairs = sorted(((str(p), name) for p, name in pairs), key=lambda x: -len(x[0]))

    def text(self, s: str) -> str:
        for old, new in self.pairs:
            s = s.replace(old, new)
        return s

    def json_file(self, path: Path) -> Any:
        return json.loads(self.text(path.read_text()))

    def obj(self, o: Any) -> Any:
        if isinstance(o, str):
            return self.text(o)
        if isinstance(o, dict):
            return {self.obj(k): self.obj(v) for k, v in o.items()}
        if isinstance(o, list):
            return [self.obj(v) for v in o]
        if type(o) is tuple:
            return tuple(self.obj(v) for v in o)
        return o


def tensors_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and values; NaN equal to NaN at the same place (bit-identical runs keep them)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if torch.equal(a, b):
        return True
    if a.is_floating_point() or a.is_complex():
        na, nb = a.isnan(), b.isnan()
        return torch.equal(na, nb) and torch.equal(a[~na], b[~nb])
    return False


def scalars_equal(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):  # an == that does not give one bool
        return repr(a) == repr(b)


class Tree:
    """Walks two nested states side by side: dicts, lists, tuples, tensors, ndarrays, objects."""

    def __init__(self, check: Check):
        self.check = check

    def diff(self, path: str, why: str) -> None:
        self.check.diffs.append(f"{path}: {why}")

    def walk(self, a: Any, b: Any, path: str) -> None:
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            self.check.count += 1
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
                self.diff(path, f"{type(a).__name__} vs {type(b).__name__}")
            elif not tensors_equal(a, b):
                self.diff(path, _tensor_why(a, b))
        elif np is not None and (isinstance(a, np.ndarray) or isinstance(b, np.ndarray)):
            self.check.count += 1
            same = isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
            if not (same and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")):
                self.diff(path, "ndarray differs")
        elif isinstance(a, dict) and isinstance(b, dict):
            ka, kb = set(a), set(b)
            for k in sorted(ka - kb, key=str):
                self.diff(f"{path}.{k}", "only in base")
            for k in sorted(kb - ka, key=str):
                if ALLOW_ADDED:
                    self.check.notes.append(f"{path}.{k}: added in new")
                else:
                    self.diff(f"{path}.{k}", "only in new")
            for k in sorted(ka & kb, key=str):
                self.walk(a[k], b[k], f"{path}.{k}" if path else str(k))
        elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            if type(a) is not type(b) or len(a) != len(b):
                self.check.count += 1
                self.diff(path, f"{type(a).__name__}[{len(a)}] vs {type(b).__name__}[{len(b)}]")
                return
            for i, (x, y) in enumerate(zip(a, b)):
                self.walk(x, y, f"{path}[{i}]")
        elif hasattr(a, "__dict__") and not isinstance(a, type) and not callable(a):
            if type(a) is not type(b):
                self.check.count += 1
                self.diff(path, f"{type(a).__name__} vs {type(b).__name__}")
            else:
                self.walk(vars(a), vars(b), f"{path}<{type(a).__name__}>")
        else:
            self.check.count += 1
            if not scalars_equal(a, b):
                self.diff(path, f"{_short(a)} vs {_short(b)}")


def _tensor_why(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    if a.is_floating_point():
        differ = (a != b) & ~(a.isnan() & b.isnan())
        d = (a.double() - b.double()).abs()[differ]
        return f"{int(differ.sum())} of {a.numel()} elements differ, max |diff| {d.max().item():.3g}"
    return f"{int((a != b).sum())} of {a.numel()} elements differ"


def _short(x: Any) -> str:
    s = repr(x)
    return s if len(s) <= 80 else s[:77] + "..."


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def files_under(root: Path) -> dict[str, Path]:
    """Every plain file under root, by path relative to it."""
    if not root.is_dir():
        return {}
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def same_names(check: Check, a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Records names only in one side as differences; returns the common names."""
    for n in sorted(set(a) - set(b)):
        check.diffs.append(f"{n}: only in base")
    for n in sorted(set(b) - set(a)):
        check.diffs.append(f"{n}: only in new")
    return sorted(set(a) & set(b))


def without_timing(o: Any) -> Any:
    """A json value without the keys that time the build (`seconds`, `time`)."""
    if isinstance(o, dict):
        return {k: without_timing(v) for k, v in o.items() if k not in BUILD_TIMING_KEYS}
    if isinstance(o, list):
        return [without_timing(v) for v in o]
    return o


def compare_digests(group: str, name: str, a: Path, b: Path, pa: Paths, pb: Paths) -> Check:
    """sha256 of every file. A json report whose bytes differ passes only if it is equal once the
    worktree paths are normalised and the build's own timing (`seconds`) is dropped; it is named."""
    check = Check(group, name)
    fa, fb = files_under(a), files_under(b)
    if not fa:
        check.diffs.append(f"{a} is empty or missing")
    for rel in same_names(check, fa, fb):
        check.count += 1
        if sha256(fa[rel]) == sha256(fb[rel]):
            continue
        if rel.endswith(".json") and without_timing(pa.json_file(fa[rel])) == without_timing(pb.json_file(fb[rel])):
            check.notes.append(f"{rel}: bytes differ, equal without {sorted(BUILD_TIMING_KEYS)} and worktree paths")
        elif rel.endswith("merges.txt") and sorted(fa[rel].read_text().splitlines()) == sorted(
            fb[rel].read_text().splitlines()
        ):
            check.diffs.append(
                f"{rel}: sha256 differs: the same merges in another order (BPE tie-break, see the docstring)"
            )
        else:
            check.diffs.append(f"{rel}: sha256 differs")
    return check


def compare_text(check: Check, rel: str, a: Path, b: Path, pa: Paths, pb: Paths) -> None:
    """json-equal for .json files, else equal text after path normalisation (bytes if not text)."""
    check.count += 1
    try:
        ta, tb = pa.text(a.read_text()), pb.text(b.read_text())
    except UnicodeDecodeError:
        if sha256(a) != sha256(b):
            check.diffs.append(f"{rel}: bytes differ")
        return
    if rel.endswith(".json") or (ALLOW_ADDED and rel.endswith(".yaml")):
        ja, jb = (json.loads(ta), json.loads(tb)) if rel.endswith(".json") else (yaml.safe_load(ta), yaml.safe_load(tb))
        if ja != jb:
            sub = Check(check.group, rel)
            Tree(sub).walk(ja, jb, rel)
            check.diffs.extend(sub.diffs or ([] if sub.notes else [f"{rel}: differs"]))
            check.notes.extend(sub.notes)
    elif ta != tb:
        line = next((i for i, (x, y) in enumerate(zip(ta.splitlines(), tb.splitlines()), 1) if x != y), None)
        check.diffs.append(f"{rel}: text differs" + (f" from line {line}" if line else " in length"))


def torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


# Files of a checkpoint whose bytes include the run's own paths (see compare_checkpoints), and the
# name of a rank's checksum manifest (sd_train.checksums.MANIFEST_PREFIX, not imported: see above).
PATH_BEARING = (".metadata", "trainer_state.json")
MANIFEST_PREFIX = "checksums_rank_"


def compare_checkpoints(group: str, a: Path, b: Path, pa: Paths, pb: Paths, tmp: Path) -> list[Check]:
    """Same step folders with the same files; every tensor and every leaf of every state equal."""
    steps = Check(group, "checkpoint step folders")
    files = Check(group, "checkpoint file lists")
    dcp = Check(group, "checkpoint tensors (DCP)")
    zero = Check(group, "zero/ files (DeepSpeed)")
    ema = Check(group, "ema_rank_R.pt")
    rank = Check(group, "rank_R.pt (RNG, data position)")
    trainer = Check(group, "trainer_state.json")
    other = Check(group, "other checkpoint files")
    sa = (
        {p.name: p for p in (a / "checkpoints").iterdir() if STEP_RE.match(p.name)}
        if (a / "checkpoints").is_dir()
        else {}
    )
    sb = (
        {p.name: p for p in (b / "checkpoints").iterdir() if STEP_RE.match(p.name)}
        if (b / "checkpoints").is_dir()
        else {}
    )
    common = same_names(steps, sa, sb)
    steps.count = len(common)
    if not sa:
        steps.diffs.append("no checkpoint step folder in base")
    for step in common:
        fa, fb = files_under(sa[step]), files_under(sb[step])
        files.count += 1
        for d in [
            *(f"{step}/{n}: only in base" for n in sorted(set(fa) - set(fb))),
            *(f"{step}/{n}: only in new" for n in sorted(set(fb) - set(fa))),
        ]:
            files.diffs.append(d)
        if ".metadata" in fa and ".metadata" in fb:
            loaded = []
            for label, folder in (("base", sa[step]), ("new", sb[step])):
                pt = tmp / f"{group}-{label}-{step}.pt"
                dcp_to_torch_save(str(folder), str(pt))
                loaded.append(torch_load(pt))
                pt.unlink()
            Tree(dcp).walk(pa.obj(loaded[0]), pb.obj(loaded[1]), step)
        for rel in sorted(set(fa) & set(fb)):
            where = f"{step}/{rel}"
            if rel == ".metadata" or rel.endswith(".distcp"):
                continue  # read through dcp_to_torch_save above
            if rel.endswith(".pt"):
                name = rel.rsplit("/", 1)[-1]
                check = (
                    zero
                    if rel.startswith("zero/")
                    else ema
                    if name.startswith("ema_rank_")
                    else rank
                    if name.startswith("rank_")
                    else other
                )
                Tree(check).walk(pa.obj(torch_load(fa[rel])), pb.obj(torch_load(fb[rel])), where)
            elif rel.startswith(MANIFEST_PREFIX):
                # A rank's checksums: the hashes of files that hold the run's own paths (DCP's
                # .metadata names its checkpoint_id; trainer_state.json its config) differ with the
                # worktree's path, and those files are compared above with the paths replaced.
                ja, jb = (json.loads(f.read_text())["files"] for f in (fa[rel], fb[rel]))
                Tree(other).walk(
                    {k: v for k, v in ja.items() if k not in PATH_BEARING},
                    {k: v for k, v in jb.items() if k not in PATH_BEARING},
                    where,
                )
            else:
                check = trainer if rel == "trainer_state.json" else zero if rel.startswith("zero/") else other
                compare_text(check, where, fa[rel], fb[rel], pa, pb)
    return [c for c in (steps, files, dcp, zero, ema, rank, trainer, other) if c.count or c.diffs]


def without_added(base: Any, new: Any) -> Any:
    """`new` without the dict keys (at any depth) that `base` does not have."""
    if isinstance(base, dict) and isinstance(new, dict):
        return {k: without_added(base[k], v) for k, v in new.items() if k in base}
    return new


def stable_metrics(line: str) -> dict:
    row = json.loads(line)
    return {k: v for k, v in row.items() if k not in VOLATILE_KEYS and not k.startswith(VOLATILE_PREFIXES)}


def compare_metrics(group: str, a: Path, b: Path, pa: Paths, pb: Paths) -> Check:
    check = Check(group, "metrics.jsonl (no time/speed/memory)")
    if not a.is_file() or not b.is_file():
        check.diffs.append(f"metrics.jsonl missing in {'base' if not a.is_file() else 'new'}")
        return check
    la, lb = pa.text(a.read_text()).splitlines(), pb.text(b.read_text()).splitlines()
    check.count = min(len(la), len(lb))
    if len(la) != len(lb):
        check.diffs.append(f"{len(la)} lines vs {len(lb)}")
    for i, (x, y) in enumerate(zip(la, lb), 1):
        ra, rb = stable_metrics(x), stable_metrics(y)
        if ALLOW_ADDED:
            pruned = without_added(ra, rb)
            if pruned != rb:
                check.notes.append(f"line {i}: keys added in new, not compared")
            rb = pruned
        if ra != rb:
            keys = sorted(k for k in set(ra) | set(rb) if not scalars_equal(ra.get(k), rb.get(k)))
            first = keys[0] if keys else None
            check.diffs.append(
                f"line {i} (step {ra.get('step')}): {keys}; e.g. {first}: {ra.get(first)!r} vs {rb.get(first)!r}"
            )
    return check


def compare_folder_bytes(group: str, name: str, a: Path, b: Path) -> Check:
    """Every file under a and b byte-equal, and the same files."""
    check = Check(group, name)
    fa, fb = files_under(a), files_under(b)
    if not fa and not fb:
        check.diffs.append(f"{a.name}/ missing in both")
    for rel in same_names(check, fa, fb):
        check.count += 1
        if sha256(fa[rel]) != sha256(fb[rel]):
            check.diffs.append(f"{rel}: bytes differ")
    return check


def compare_export(group: str, a: Path, b: Path, pa: Paths, pb: Paths) -> list[Check]:
    weights = Check(group, "export *.safetensors (sha256)")
    rest = Check(group, "export other files")
    fa, fb = files_under(a), files_under(b)
    if not fa:
        weights.diffs.append("no export/ in base")
    for rel in same_names(weights, fa, fb):
        if rel.endswith(".safetensors"):
            weights.count += 1
            if sha256(fa[rel]) != sha256(fb[rel]):
                ta, tb = load_file(fa[rel]), load_file(fb[rel])
                sub = Check(group, rel)
                Tree(sub).walk(ta, tb, rel)
                weights.diffs.append(
                    f"{rel}: sha256 differs; {len(sub.diffs)} of {sub.count} tensors differ"
                    + (f", e.g. {sub.diffs[0]}" if sub.diffs else " (metadata or layout)")
                )
        else:
            compare_text(rest, rel, fa[rel], fb[rel], pa, pb)
    return [weights, rest]


def compare_run(group: str, a: Path, b: Path, pa: Paths, pb: Paths, tmp: Path) -> list[Check]:
    checks = compare_checkpoints(group, a, b, pa, pb, tmp)
    checks.append(compare_metrics(group, a / "metrics.jsonl", b / "metrics.jsonl", pa, pb))
    checks.append(compare_folder_bytes(group, "keys/rank{R}.txt (byte-equal)", a / "keys", b / "keys"))
    checks.extend(compare_export(group, a / "export", b / "export", pa, pb))
    run_files = Check(group, "run json/yaml files")
    for name in ("topology.json", "ema_plan.json", "data_summary.json", "config.yaml"):
        if not (a / name).is_file() or not (b / name).is_file():
            run_files.diffs.append(f"{name}: missing in {'base' if not (a / name).is_file() else 'new'}")
        else:
            compare_text(run_files, name, a / name, b / name, pa, pb)
    checks.append(run_files)
    if (a / "samples").is_dir() or (b / "samples").is_dir():
        checks.append(compare_folder_bytes(group, "samples/ (byte-equal)", a / "samples", b / "samples"))
    # Anything a run writes that none of the above looked at still has to exist in both.
    listing = Check(group, "run folder file list")
    listing.count = len(same_names(listing, files_under(a), files_under(b)))
    checks.append(listing)
    return checks


# ---- the phases ---------------------------------------------------------------------------------


def run_assets(cos: list[Checkout], work: Path, vae_steps: int | None, timings: dict[str, float]) -> None:
    for co in cos:
        t0 = time.perf_counter()
        steps = "its default VAE steps (--vae-steps N to change)" if vae_steps is None else f"--vae-steps {vae_steps}"
        print(f"[assets] {co.label}: prepare-emoji + build-tiny with {steps} in {co.wt}", flush=True)
        build_assets(co, work, vae_steps)
        timings[f"assets {co.label}"] = time.perf_counter() - t0
        print(f"[assets] {co.label}: done in {timings[f'assets {co.label}']:.0f}s", flush=True)


def run_mode(mode: str, cos: list[Checkout], assets: Checkout, work: Path, timings: dict[str, float]) -> list[Check]:
    outs, paths = [], []
    for co in cos:
        out = work / "runs" / co.label / mode
        shutil.rmtree(out, ignore_errors=True)  # a folder with checkpoints would be resumed
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        print(f"[{mode}] {co.label}: 2-rank run of configs/test.yaml -> {out}", flush=True)
        try:
            launch(train_cmd(mode, out, assets), co, 1, work / "logs" / f"{co.label}-{mode}.log")
        except (RunFailed, subprocess.TimeoutExpired) as e:
            print(f"[{mode}] {co.label}: FAILED\n{e}", flush=True)
            return [Check(mode, f"{co.label} run", 1, [str(e).splitlines()[0]])]
        timings[f"{mode} {co.label}"] = time.perf_counter() - t0
        print(f"[{mode}] {co.label}: done in {timings[f'{mode} {co.label}']:.0f}s", flush=True)
        outs.append(out)
        paths.append(
            Paths(
                [
                    (assets.data, "<DATA>"),
                    (assets.model, "<MODEL>"),
                    (out, "<OUT>"),
                    (co.wt, "<WORKTREE>"),
                    (work, "<WORK>"),
                ]
            )
        )
    t0 = time.perf_counter()
    tmp = work / "tmp"
    tmp.mkdir(exist_ok=True)
    checks = compare_run(mode, outs[0], outs[1], paths[0], paths[1], tmp)
    timings[f"{mode} compare"] = time.perf_counter() - t0
    return checks


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", metavar="BASE_REV", help="the reference revision (e.g. main)")
    p.add_argument("new", metavar="NEW_REV", help="the revision that must give the same bits (e.g. HEAD)")
    p.add_argument("--work", default=None, help="folder for the worktrees, runs and logs (default: a temp folder)")
    p.add_argument("--only", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--keep", action="store_true", help="keep the worktrees and runs under --work")
    p.add_argument("--vae-steps", type=int, default=None, help="pass --vae-steps N to build-tiny of both revisions")
    p.add_argument(
        "--allow-added-keys",
        action="store_true",
        help="keys only NEW writes (config fields, metrics, topology) are notes, not failures; shared keys must match",
    )
    ns = p.parse_args(argv)
    ns.only = [x.strip() for x in ns.only.split(",") if x.strip()]
    bad = [x for x in ns.only if x not in PHASES]
    if bad or not ns.only:
        p.error(f"--only takes a comma-separated subset of {','.join(PHASES)}, got {bad or 'nothing'}")
    return ns


def summary(checks: list[Check], timings: dict[str, float]) -> str:
    lines = ["", "summary", f"  {'group':<8}{'checks':>7}{'passed':>8}{'failed':>8}"]
    for group in dict.fromkeys(c.group for c in checks):
        mine = [c for c in checks if c.group == group]
        ok = sum(c.ok for c in mine)
        lines.append(f"  {group:<8}{len(mine):>7}{ok:>8}{len(mine) - ok:>8}   {'PASS' if ok == len(mine) else 'FAIL'}")
    lines.append("wall time per phase")
    lines.extend(f"  {name:<16}{secs:>7.0f}s" for name, secs in timings.items())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    global ALLOW_ADDED
    ALLOW_ADDED = ns.allow_added_keys
    # A TERM (a killed job) still removes the worktrees: it unwinds through the `finally` below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.perf_counter()
    work = Path(ns.work or tempfile.mkdtemp(prefix="compare_commits_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cos = []
    for label, rev in (("base", ns.base), ("new", ns.new)):
        sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
        cos.append(Checkout(label, rev, sha, work / f"wt-{label}"))
    print(
        f"base {ns.base} = {cos[0].sha}\nnew  {ns.new} = {cos[1].sha}\nwork {work}\npython {sys.executable}", flush=True
    )
    timings: dict[str, float] = {}
    checks: list[Check] = []
    try:
        t0 = time.perf_counter()
        for co in cos:
            if co.wt.exists():
                remove_worktree(co.wt)
                shutil.rmtree(co.wt, ignore_errors=True)
            git("worktree", "add", "--detach", str(co.wt), co.sha)
        timings["worktrees"] = time.perf_counter() - t0
        modes = [m for m in RUN_MODES if m in ns.only]
        # The runs need the base's assets; the new revision builds its own only to compare them.
        run_assets(cos if "assets" in ns.only else cos[:1], work, ns.vae_steps, timings)
        if "assets" in ns.only:
            pa, pb = (Paths([(co.wt, "<WORKTREE>"), (work, "<WORK>")]) for co in cos)
            checks.append(compare_digests("assets", "data/emoji sha256", cos[0].data, cos[1].data, pa, pb))
            checks.append(compare_digests("assets", "models/tiny-sd sha256", cos[0].model, cos[1].model, pa, pb))
            print("\n".join(c.line() for c in checks), flush=True)
        if modes:
            print(
                f"training runs of both revisions use the BASE revision's assets: {cos[0].data} and {cos[0].model}"
                + ("" if ns.vae_steps is None else f" (built with --vae-steps {ns.vae_steps})"),
                flush=True,
            )
        for mode in modes:
            mine = run_mode(mode, cos, cos[0], work, timings)
            print("\n".join(c.line() for c in mine), flush=True)
            checks.extend(mine)
    except (RunFailed, subprocess.TimeoutExpired) as e:
        print(f"FAILED: {e}", flush=True)
        checks.append(Check("setup", "assets build", 1, [str(e).splitlines()[0]]))
    finally:
        if ns.keep:
            print(f"kept the worktrees, runs and logs under {work}")
        else:
            for co in cos:
                remove_worktree(co.wt)
            if ns.work is None:
                shutil.rmtree(work, ignore_errors=True)
            else:
                for sub in ("runs", "logs", "tmp"):
                    shutil.rmtree(work / sub, ignore_errors=True)
    timings["total"] = time.perf_counter() - t_start
    print(summary(checks, timings))
    ok = bool(checks) and all(c.ok for c in checks)
    print(f"{'ALL PASS' if ok else 'FAIL'}: {ns.base} ({cos[0].sha[:9]}) vs {ns.new} ({cos[1].sha[:9]})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
