"""A rank forked from a warm server (tests/support/zygote.py, how the multi-process tests start
their ranks) behaves as a fresh `python SCRIPT` would: the same environment, argv, sys.path,
process group, signal dispositions, open files and random state, the same exit statuses for an
exit code, an exception, SIGTERM, SIGINT and SIGKILL, the same output, and a Ctrl-C to the
launcher's process group reaches it. Each case runs tests/support/zygote_probe.py both ways.

Two servers import torch, diffusers and transformers once for the module (~10 s of CPU) and the
fresh probes import them again (~10 s): single-process session, beside the multi-process one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import zygote
from tests.support.launch import REPO, env, stop_zygote_servers, zygote_servers

PROBE = str(REPO / "tests" / "support" / "zygote_probe.py")
SPAWN = str(REPO / "tests" / "support" / "spawn_ranks.py")


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> str:
    """Two servers, as a test session starts them; the value of zygote.ENV_VAR that uses them."""
    procs, addresses = zygote_servers(tmp_path_factory.mktemp("zygotes"), 2)
    yield addresses
    stop_zygote_servers(procs)


def launch(servers: str, out: Path, mode: str, fresh: bool, **popen) -> subprocess.Popen:
    """spawn_ranks.py with 2 probe ranks, forked from the servers or (fresh) new interpreters,
    the launcher in a process group of its own unless `popen` says otherwise."""
    out.mkdir(parents=True, exist_ok=True)
    extra = {zygote.ENV_VAR: servers, zygote.NO_ZYGOTES: "1" if fresh else ""}
    popen.setdefault("process_group", 0)
    cmd = [sys.executable, SPAWN, "2", PROBE, str(out), mode]
    return subprocess.Popen(cmd, cwd=REPO, env=env(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def reports(servers: str, out: Path, fresh: bool) -> tuple[int, list[dict]]:
    proc = launch(servers, out, "report", fresh)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    return proc.pid, [json.loads((out / f"report.rank{r}.json").read_text()) for r in (0, 1)]


SAME = (
    "argv", "path", "cwd", "name", "main_file", "sid", "signals", "blocked", "fds", "threads", "umask", "nice",
    "stdout_isatty", "stdout_encoding", "flags", "gc_enabled", "gc_thresholds",
)  # fmt: skip


def test_a_forked_rank_sees_what_a_fresh_one_sees(servers, tmp_path):
    fresh_pid, fresh = reports(servers, tmp_path / "fresh", fresh=True)
    forked_pids, forked = [], []
    for i in range(2):  # two launches: rank 0 comes from the same server both times
        pid, reps = reports(servers, tmp_path / f"forked{i}", fresh=False)
        forked_pids.append(pid)
        forked.append(reps)
    for launcher, reps in zip(forked_pids, forked):
        assert all(rep["ppid"] != launcher for rep in reps), "not forked from a server: the comparison proves nothing"
        assert all(rep["pgid"] == launcher for rep in reps), "not in the launcher's process group"
    assert all(rep["ppid"] == fresh_pid and rep["pgid"] == fresh_pid for rep in fresh)
    drop = {"MASTER_PORT", zygote.NO_ZYGOTES}
    for r in (0, 1):
        a, b = fresh[r], forked[0][r]
        assert {k: a[k] for k in SAME} == {k: b[k] for k in SAME}
        assert {k: v for k, v in a["env"].items() if k not in drop} == {
            k: v for k, v in b["env"].items() if k not in drop
        }
        assert a["env"]["RANK"] == b["env"]["RANK"] == str(r)
    # Random state seeded per process, as in fresh interpreters: torch's, numpy's and Python's
    # differ between the ranks of a launch and between launches; so does the string hash seed
    # between two ranks.
    assert len({rep["torch_seed"] for rep in fresh}) == 2, "torch seeds each process: else compare them as equal"
    for key in ("torch_seed", "torch_rand", "numpy_rand", "random"):
        draws = [json.dumps(reps[r][key]) for reps in forked for r in (0, 1)]
        assert len(set(draws)) == 4, (key, draws)
    assert forked[0][0]["hash"] != forked[0][1]["hash"]
    # The one planned difference: the preload's objects frozen out of the collector's reach.
    assert all(rep["gc_frozen"] == 0 for rep in fresh)
    assert all(rep["gc_frozen"] > 100_000 for reps in forked for rep in reps)


def run_one(start, out: Path, mode: str, signum=None) -> tuple[int, str, str]:
    """One probe rank started by `start(argv, env, stdio)`; returns its exit status (as Popen
    reports it), stdout and stderr. With `signum`, sent once the rank is ready."""
    out.mkdir(parents=True, exist_ok=True)
    with open(os.devnull) as si, open(out / "stdout", "w+") as so, open(out / "stderr", "w+") as se:
        proc = start([PROBE, str(out), mode], {**env(), "RANK": "0"}, (si.fileno(), so.fileno(), se.fileno()))
        if signum is not None:
            deadline = time.monotonic() + 120
            while not (out / "ready.rank0").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            proc.send_signal(signum)
        code = proc.wait()
        so.seek(0)
        se.seek(0)
        return code, so.read(), se.read()


def fresh_start(argv, environ, stdio):
    return subprocess.Popen([sys.executable, *argv], env=environ, stdin=stdio[0], stdout=stdio[1], stderr=stdio[2])


@pytest.mark.parametrize(
    "mode, signum, code",
    [("exit:3", None, 3), ("raise", None, 1), ("wait", signal.SIGTERM, -15), ("wait", signal.SIGINT, -2),
     ("wait", signal.SIGKILL, -9)],
)  # fmt: skip
def test_exit_status_and_output_as_a_fresh_interpreter(servers, tmp_path, mode, signum, code):
    address = servers.split(":")[0]

    def forked_start(argv, environ, stdio):
        proc = zygote.ZygoteProcess.start(address, argv, environ, stdio=stdio)
        assert proc is not None, "the server refused"
        return proc

    fresh = run_one(fresh_start, tmp_path / "fresh", mode, signum)
    forked = run_one(forked_start, tmp_path / "forked", mode, signum)
    assert fresh[0] == forked[0] == code
    assert fresh[1] == forked[1]
    if mode == "raise":  # the forked traceback has two more frames (zygote.py and runpy) above
        assert fresh[2].splitlines()[-1] == forked[2].splitlines()[-1] == "RuntimeError: probe rank 0 raised"
    elif mode == "wait" and signum == signal.SIGINT:
        assert fresh[2].splitlines()[-1] == forked[2].splitlines()[-1] == "KeyboardInterrupt"
    else:
        assert fresh[2] == forked[2]


@pytest.mark.parametrize("how", ["forked", "fresh", "new session"])
def test_ctrl_c_to_the_launchers_group_reaches_each_rank(servers, tmp_path, how):
    """As a terminal's Ctrl-C: SIGINT to the launcher's process group reaches every rank, and the
    launcher forwards one more (tests/e2e/test_faults.py's kill chain presses it so). The launcher
    is stopped while the group's SIGINT is delivered, so the ranks' first one can only come from the
    group. A launcher in a session of its own is refused by the servers and starts fresh ranks."""
    popen = {"start_new_session": True, "process_group": None} if how == "new session" else {}
    proc = launch(servers, tmp_path, "count_sigint", fresh=how == "fresh", **popen)
    counts = [tmp_path / f"sigint.rank{r}" for r in (0, 1)]

    def wait_for(paths, text=None):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if all(p.exists() and (text is None or p.read_text() == text) for p in paths):
                return True
            time.sleep(0.02)
        return False

    assert wait_for([tmp_path / f"ready.rank{r}" for r in (0, 1)])
    os.kill(proc.pid, signal.SIGSTOP)
    os.killpg(proc.pid, signal.SIGINT)
    reached = wait_for(counts, "1")
    os.kill(proc.pid, signal.SIGCONT)  # the launcher now forwards its own copy
    _, stderr = proc.communicate(timeout=120)
    assert reached, f"the group's SIGINT did not reach every rank: {[p.exists() for p in counts]}"
    assert proc.returncode == 130, stderr.decode()[-3000:]
    assert [p.read_text() for p in counts] == ["2", "2"]
    assert ("another session" in stderr.decode()) == (how == "new session")


def test_a_request_is_refused_for_an_environment_its_imports_did_not_see(monkeypatch):
    """Any variable set, unset or changed against the server's start (an import may read it) sends
    the rank to a fresh interpreter, except the launcher variables and what the preload's imports
    set themselves with the same value (a launcher that imported torch in-process has those)."""
    start = {"PATH": "/bin", "OMP_NUM_THREADS": "1"}
    monkeypatch.setattr(zygote, "_START_ENV", start)
    monkeypatch.setattr(zygote.os, "environ", {**start, "TORCHINDUCTOR_CACHE_DIR": "/tmp/ti"})
    assert zygote.env_refusal(start) is None
    assert zygote.env_refusal({**start, "RANK": "1", "MASTER_PORT": "29500", "SD_TRAIN_FAULT": "x"}) is None
    assert zygote.env_refusal({**start, "TORCHINDUCTOR_CACHE_DIR": "/tmp/ti"}) is None
    assert "TORCHINDUCTOR_CACHE_DIR" in zygote.env_refusal({**start, "TORCHINDUCTOR_CACHE_DIR": "/elsewhere"})
    assert "OMP_NUM_THREADS" in zygote.env_refusal({**start, "OMP_NUM_THREADS": "2"})
    assert "PATH" in zygote.env_refusal({"OMP_NUM_THREADS": "1"})
    assert "CUDA_VISIBLE_DEVICES" in zygote.env_refusal({**start, "CUDA_VISIBLE_DEVICES": "0"})


def test_no_fork_on_a_gpu_machine_or_from_another_session(monkeypatch, tmp_path):
    """A server on a machine with an NVIDIA driver forks nothing (an import may have initialized
    the driver, which a forked child cannot use); nor for a launcher in another session."""
    request = {"sid": os.getsid(0), "env": dict(os.environ)}
    marker = tmp_path / "nvidiactl"
    marker.touch()
    monkeypatch.setattr(zygote, "NVIDIA_DEVICE", str(marker))
    assert "GPU" in zygote._refusal(request)
    monkeypatch.setattr(zygote, "NVIDIA_DEVICE", str(tmp_path / "absent"))
    assert "another session" in zygote._refusal({**request, "sid": request["sid"] + 1})
