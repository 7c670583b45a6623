"""Warm interpreters for the tests' ranks: a server that has imported torch, diffusers and
transformers once forks a rank per request, so a rank skips the ~4.5 s of CPU those imports cost
(docs/testing.md, test time). Started by tests/support/launch.py for the
ranks that tests/support/spawn_ranks.py starts; every other process of the suite (torchrun,
`accelerate launch`, srun-style and one-process runs) starts a fresh interpreter as users do.

    python tests/support/zygote.py SOCKET        # the server (tests/support/launch.py starts two)

The child of a fork is the interpreter `python SCRIPT ARGS` would be: the launcher's stdin,
stdout and stderr, environment, working directory, argv, sys.path[0], default SIGTERM and SIGINT
handling, the launcher's process group (a Ctrl-C to the group reaches the rank and its loader
workers, as with a fresh child), and random seeds of its own (torch's, numpy's and Python's, each
drawn from the OS as a fresh interpreter draws them). tests/unit/test_zygote.py compares the two.
What differs:
- the heavy modules are imported before the script runs, after the third-party quieting that
  sd-train's entry points do first (`preload`). A script that does not call sd_train.console.setup
  (the tests' own dist scripts), or runs with --verbose, still gets that quieting: no third-party
  progress bars (TQDM_DISABLE=1 in its environment), no torchvision notice. The import-time
  environment is checked: a request whose environment differs outside RUNTIME_ONLY gets a fresh
  interpreter instead. What those imports print goes to the servers' log, not the rank's stderr: a
  test of a rank's import-time output starts fresh ranks (SD_TRAIN_TEST_NO_ZYGOTES=1).
- the rank's parent process is the server, not the launcher. The launcher still sees the rank as a
  child: `ZygoteProcess` has the parts of `subprocess.Popen` it uses (pid, poll, wait,
  send_signal, kill, returncode); the exit status comes back over the request's socket.
- a traceback has two more frames (this file and runpy) above the script's.
- the objects the preload made are frozen out of the cyclic garbage collector (`freeze_heap`).
A launcher in a session of its own (the Ctrl-C tests start theirs with start_new_session) is
refused: a process can only join a process group of its own session, so only a fresh child would
get the terminal's SIGINT. So is any request while the server runs a second thread (a fork would
copy its locks held), which the preload does not start, and any on a machine with an NVIDIA GPU.

A forked child shares its server's string hash seed. Ranks of one launch fork from different
servers (rank r from server r % 2), so two ranks still hash differently, as two fresh
interpreters do: a collective that depends on a set's order would still differ between them.

Standard library only (spawn_ranks.py imports this file, and the server must import nothing
before it has chosen what to preload)."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import time
from typing import Optional

# What the server imports once. Module names only: a missing optional package is skipped.
PRELOAD = (
    "torch",
    "torch.distributed.fsdp",
    "torch.distributed.tensor",
    "torch.distributed.checkpoint",
    "torch.distributed.checkpoint.state_dict",
    "torch._dynamo",
    "transformers",
    "transformers.models.clip.modeling_clip",
    "diffusers",
    "diffusers.models.unets.unet_2d_condition",
    "diffusers.models.autoencoders.autoencoder_kl",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
    "webdataset",
    "safetensors.torch",
    "PIL.Image",
    "numpy",
    "yaml",
)
# Variables only read after start-up (by torch.distributed, the trainer's fault injector, wandb's
# init, pytest; PYTORCH_NVML_BASED_CUDA_CHECK by torch.cuda.is_available() at each call, and set by
# deepspeed's import, which the tests' fixtures make in-process): a request may set them differently
# from the server's own environment. Any other difference could change what an import saw, so such a
# request gets a fresh interpreter.
RUNTIME_ONLY = frozenset(
    {
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SD_TRAIN_FAULT",
        "WANDB_MODE",
        "PYTEST_CURRENT_TEST",
        "SD_TRAIN_TEST_ZYGOTES",
        "PYTORCH_NVML_BASED_CUDA_CHECK",
    }
)
ENV_VAR = "SD_TRAIN_TEST_ZYGOTES"  # the servers' socket paths, ":"-separated, for spawn_ranks.py
NO_ZYGOTES = "SD_TRAIN_TEST_NO_ZYGOTES"  # set (to anything): fresh interpreters (a session, or one launch)
_MAX_MSG = 1 << 20
# Present on a machine with an NVIDIA driver. There, an import that asks torch.cuda.is_available()
# initializes the driver in the server, and a forked child could not use CUDA: every rank is fresh.
NVIDIA_DEVICE = "/dev/nvidiactl"
FAILED = ".failed"  # next to the socket path: the server's preload failed


# ---- the client side (spawn_ranks.py) -------------------------------------------------------------


def _send(sock: socket.socket, message: dict, fds: tuple[int, ...] = ()) -> None:
    data = json.dumps(message).encode() + b"\n"
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


class ZygoteProcess:
    """A rank forked by a server, with the parts of `subprocess.Popen` that spawn_ranks.py uses."""

    def __init__(self, sock: socket.socket, pid: int):
        self._sock, self.pid, self.returncode = sock, pid, None

    @classmethod
    def start(
        cls, address: str, argv: list[str], env: dict, timeout: float = 120.0, stdio: tuple[int, int, int] = (0, 1, 2)
    ) -> Optional[ZygoteProcess]:
        """Ask the server at `address` to run `python *argv` with `env` in this process's working
        directory, process group and `stdio` (stdin, stdout, stderr: this process's own unless
        given). None when there is no server (not started yet within `timeout`, failed, or gone)
        or it refuses (see _refusal): start a fresh interpreter yourself."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(address)
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline or not os.path.exists(os.path.dirname(address)):
                    return None
                if os.path.exists(address + FAILED):
                    return None
                time.sleep(0.1)
        request = {"argv": argv, "env": env, "cwd": os.getcwd(), "pgid": os.getpgrp(), "sid": os.getsid(0)}
        _send(sock, request, stdio)
        reply = cls._read_line(sock)
        if reply is None or "pid" not in reply:
            if reply is not None:
                print(f"zygote: {reply.get('refused')}; starting a fresh interpreter", file=sys.stderr, flush=True)
            sock.close()
            return None
        return cls(sock, reply["pid"])

    @staticmethod
    def _read_line(sock: socket.socket) -> Optional[dict]:
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                return None
            data += chunk
        return json.loads(data)

    def poll(self) -> Optional[int]:
        if self.returncode is None and select.select([self._sock], [], [], 0)[0]:
            self._finish()
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            self._finish()
        return self.returncode

    def _finish(self) -> None:
        reply = self._read_line(self._sock)
        self._sock.close()
        # No status: the server died with the rank still running; count it as killed.
        self.returncode = reply["returncode"] if reply else -signal.SIGKILL

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


# ---- the server ---------------------------------------------------------------------------------


def _returncode(status: int) -> int:
    """As subprocess.Popen reports it: the exit code, or minus the signal that killed it."""
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


_START_ENV: dict[str, str] = dict(os.environ)  # before the preload, which sets some (TORCHINDUCTOR_CACHE_DIR)


def _refusal(request: dict) -> Optional[str]:
    """Why this request gets a fresh interpreter instead of a fork, or None."""
    if os.path.exists(NVIDIA_DEVICE):
        return "an NVIDIA GPU machine: the preload may have initialized the CUDA driver, which no fork can use"
    if request["sid"] != os.getsid(0):
        return "the launcher is in another session, whose process group a fork cannot join"
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        return f"the server runs {threads} threads"
    return env_refusal(request["env"])


def env_refusal(env: dict) -> Optional[str]:
    """Why a rank with environment `env` would not import as this server did, or None."""
    # What the preload's imports set themselves (TORCHINDUCTOR_CACHE_DIR, ...): a launcher that
    # imported the same libraries has them too, and a fresh interpreter given them would import
    # seeing the values it would set. Any other difference could change what an import saw.
    own = {k: v for k, v in _START_ENV.items() if k not in RUNTIME_ONLY}
    preload_set = {k: v for k, v in os.environ.items() if k not in _START_ENV}
    theirs = {k: v for k, v in env.items() if k not in RUNTIME_ONLY}
    differ = sorted(
        k
        for k in own.keys() | theirs.keys()
        if own.get(k) != theirs.get(k) and not (k in preload_set and theirs.get(k) == preload_set[k])
    )
    return f"environment differs from the server's in {differ}" if differ else None


def _receive(conn: socket.socket) -> tuple[Optional[dict], list[int]]:
    data, fds = b"", []
    while not data.endswith(b"\n") and len(data) < _MAX_MSG:
        chunk, new_fds, _, _ = socket.recv_fds(conn, 65536, 8)
        fds += new_fds
        if not chunk:
            return None, fds
        data += chunk
    return json.loads(data), fds


def _log(row: dict) -> None:
    """With SD_TRAIN_TEST_ZYGOTE_LOG set, append `row` to that file as a JSON line: each finished
    rank's CPU seconds (user + system, its own reaped children included; a rank's CPU no longer
    reaches the launcher's RUSAGE_CHILDREN) and each refusal."""
    path = os.environ.get("SD_TRAIN_TEST_ZYGOTE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def serve(address: str) -> dict:
    """Accept requests until this process's parent exits (it then exits too). Returns only in a
    forked child: the request that child is to run."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address + ".tmp")
    os.rename(address + ".tmp", address)  # clients that connect find a listening socket
    listener.listen(16)
    parent = os.getppid()
    running: dict[int, socket.socket] = {}  # pid -> the connection its status goes to
    while os.getppid() == parent:
        if select.select([listener], [], [], 0.05)[0]:
            conn, _ = listener.accept()
            request, fds = _receive(conn)
            refused = "bad request" if request is None or len(fds) != 3 else _refusal(request)
            if refused:
                _log({"refused": refused, "argv": request and request["argv"]})
                print(f"refused: {refused}", flush=True)  # the servers' log
                _send(conn, {"refused": refused})
                conn.close()
                for fd in fds:
                    os.close(fd)
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                os.setpgid(0, request["pgid"])
                listener.close()
                for other in running.values():
                    other.close()
                conn.close()
                request["fds"] = fds
                return request
            for fd in fds:
                os.close(fd)
            # Also here, as a shell does for its jobs: the group is joined before the launcher
            # learns the pid, whichever of the two runs first.
            try:
                os.setpgid(pid, request["pgid"])
            except OSError:  # the child has joined already, or has exited
                pass
            _send(conn, {"pid": pid})
            running[pid] = conn
        while running:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
            if pid == 0:
                break
            _log({"pid": pid, "cpu": usage.ru_utime + usage.ru_stime})
            conn = running.pop(pid, None)
            if conn is not None:
                try:
                    _send(conn, {"returncode": _returncode(status)})
                except OSError:  # the launcher is gone
                    pass
                conn.close()
    sys.exit(0)


def become(request: dict) -> None:
    """Turn this forked child into `python *argv`: its stdio, environment, working directory,
    argv, script directory first on sys.path, and default signal handling."""
    for target, fd in enumerate(request["fds"]):
        os.dup2(fd, target)
        os.close(fd)
    # The request's environment, plus what the preload's imports set in it, as they would have
    # in a fresh interpreter.
    added = {k: v for k, v in os.environ.items() if k not in _START_ENV and k not in request["env"]}
    os.environ.clear()
    os.environ.update({**request["env"], **added})
    os.chdir(request["cwd"])
    script = request["argv"][0]
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # A fresh interpreter seeds torch's default CPU generator and numpy's global one from the OS
    # (torch at start-up, numpy at import); every fork of one server would share the server's.
    # (Python's `random` reseeds itself in a forked child.)
    if "torch" in sys.modules:
        sys.modules["torch"].default_generator.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()


def freeze_heap() -> None:
    """Collect the imports' garbage, then move every object left into the collector's permanent
    generation (`gc.freeze`, as CPython's documentation advises before a server forks): each full
    collection of a forked rank then skips them (0.19 s of CPU apiece on this box, and rank 0 of the
    suite's reference run makes about 15). What the rank itself allocates is collected as in a fresh
    interpreter. The one difference a fresh interpreter shows: `gc.get_freeze_count()` is 0 there."""
    import gc

    gc.collect()
    gc.freeze()


def preload() -> None:
    """Import PRELOAD as a fresh `python train.py` does: after sd-train's entry point has quieted
    the known third-party noise (sd_train.console: TQDM_DISABLE=1, which tqdm reads at import, and
    the notices printed at import dropped). sd_train's own modules are then forgotten: each rank
    imports them itself (console reads the rank from the rank's environment at import)."""
    import importlib

    from sd_train import console

    console.quiet_third_party()
    for name in [m for m in sys.modules if m == "sd_train" or m.startswith("sd_train.")]:
        del sys.modules[name]
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    try:
        preload()
    except BaseException:
        open(sys.argv[1] + FAILED, "w").close()  # the clients stop waiting for this server
        raise
    # The ~390k objects the imports made live as long as the process: out of the cyclic collector's
    # reach, a full collection in a rank no longer walks them (0.19 s each; see freeze_heap).
    freeze_heap()
    child = serve(sys.argv[1])
    become(child)
    del child
    import runpy

    runpy.run_path(sys.argv[0], run_name="__main__")
