"""Start a stream worker as a subprocess and wait until it is ready (demo, tests, bench).

Example::

    with WorkerProcess.start("m.keras", slots=16) as worker:
        client = Client(worker.endpoint)
        ...
    # leaving the block sends SIGTERM and waits for a clean exit
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workers.worker import READY_MARKER

_REPO_ROOT = Path(__file__).resolve().parent.parent
_ENDPOINT = re.compile(re.escape(READY_MARKER) + r"(\S+)")


class WorkerProcess:
    """A running ``python -m workers.worker`` with its endpoint and log file."""

    def __init__(self, proc: subprocess.Popen, endpoint: str, log_path: Path):
        self.proc = proc
        self.endpoint = endpoint
        self.log_path = log_path

    @classmethod
    def start(cls, model: str | os.PathLike, slots: int = 16, *extra_args: str,
              bind: str = "tcp://127.0.0.1:0", ready_timeout: float = 180.0,
              log_path: str | os.PathLike | None = None) -> WorkerProcess:
        """Launch a worker on ``bind`` (port 0: a free port) and wait for its ready line."""
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="streamrnn-worker-", suffix=".log")
            os.close(fd)
            log_path = name
        log_path = Path(log_path)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT),
                                                          env.get("PYTHONPATH")]))
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        cmd = [sys.executable, "-m", "workers.worker", "--model", str(model),
               "--slots", str(slots), "--bind", bind, *extra_args]
        with open(log_path, "wb") as log_file:
            # the log goes to a file, not a pipe: a full pipe would block the worker
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                    cwd=_REPO_ROOT)
        deadline = time.monotonic() + ready_timeout
        while True:
            match = _ENDPOINT.search(log_path.read_text(errors="replace"))
            if match:
                return cls(proc, match.group(1), log_path)
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"worker did not become ready (exit {proc.returncode}):\n"
                                   + log_path.read_text(errors="replace")[-4000:])
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for the exit status (kill after ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class RouterProcess:
    """A running ``python -m workers.router`` with its client and worker endpoints.

    Example::

        with RouterProcess.start() as router:
            WorkerProcess.start("m.keras", 8, "--register", router.workers_endpoint)
            client = Client(router.endpoint)
    """

    def __init__(self, proc: subprocess.Popen, endpoint: str, workers_endpoint: str,
                 log_path: Path):
        self.proc = proc
        self.endpoint = endpoint
        self.workers_endpoint = workers_endpoint
        self.log_path = log_path

    @classmethod
    def start(cls, *extra_args: str, bind: str = "tcp://127.0.0.1:0",
              workers_bind: str = "tcp://127.0.0.1:0", ready_timeout: float = 60.0,
              log_path: str | os.PathLike | None = None) -> RouterProcess:
        from workers.router import READY_MARKER as ROUTER_READY

        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="streamrnn-router-", suffix=".log")
            os.close(fd)
            log_path = name
        log_path = Path(log_path)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT),
                                                          env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "workers.router", "--bind", bind, "--workers-bind",
               workers_bind, *extra_args]
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                    cwd=_REPO_ROOT)
        ready = re.compile(re.escape(ROUTER_READY) + r"(\S+) workers=(\S+)")
        deadline = time.monotonic() + ready_timeout
        while True:
            match = ready.search(log_path.read_text(errors="replace"))
            if match:
                return cls(proc, match.group(1), match.group(2), log_path)
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"router did not become ready (exit {proc.returncode}):\n"
                                   + log_path.read_text(errors="replace")[-4000:])
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> RouterProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
