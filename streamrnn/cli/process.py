"""Start a worker or router as a subprocess and wait until it is ready (demo, tests, bench).

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

__all__ = ["RouterProcess", "WorkerProcess"]

# The folder holding the streamrnn package (the repository root in a checkout): children run
# there with it first on PYTHONPATH, so they import the same streamrnn as this process.
_SOURCE_ROOT = Path(__file__).resolve().parents[2]


class _ManagedProcess:
    """A ``python -m streamrnn.cli.<role>`` subprocess logging to a file, stopped with SIGTERM."""

    def __init__(self, proc: subprocess.Popen, log_path: Path):
        self.proc = proc
        self.log_path = log_path

    @staticmethod
    def _launch(role: str, args: list[str], ready: re.Pattern[str], ready_timeout: float,
                log_path: str | os.PathLike | None
                ) -> tuple[subprocess.Popen, re.Match[str], Path]:
        """Start ``streamrnn.cli.<role>`` and wait until its log matches ``ready``."""
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"streamrnn-{role}-", suffix=".log")
            os.close(fd)
            log_path = name
        log_path = Path(log_path)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_SOURCE_ROOT),
                                                          env.get("PYTHONPATH")]))
        with open(log_path, "wb") as log_file:
            # the log goes to a file, not a pipe: a full pipe would block the process
            proc = subprocess.Popen([sys.executable, "-m", f"streamrnn.cli.{role}", *args],
                                    stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                    cwd=_SOURCE_ROOT)
        deadline = time.monotonic() + ready_timeout
        while True:
            match = ready.search(log_path.read_text(errors="replace"))
            if match:
                return proc, match, log_path
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"{role} did not become ready (exit {proc.returncode}):\n"
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

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class WorkerProcess(_ManagedProcess):
    """A running ``python -m streamrnn.cli.worker`` with its endpoint and log file."""

    def __init__(self, proc: subprocess.Popen, endpoint: str, log_path: Path):
        super().__init__(proc, log_path)
        self.endpoint = endpoint

    @classmethod
    def start(cls, model: str | os.PathLike, slots: int = 16, *extra_args: str,
              bind: str = "tcp://127.0.0.1:0", ready_timeout: float = 180.0,
              log_path: str | os.PathLike | None = None) -> WorkerProcess:
        """Launch a worker on ``bind`` (port 0: a free port) and wait for its ready line."""
        from streamrnn.cli.worker import READY_MARKER

        proc, match, log_path = cls._launch(
            "worker", ["--model", str(model), "--slots", str(slots), "--bind", bind,
                       *extra_args],
            re.compile(re.escape(READY_MARKER) + r"(\S+)"), ready_timeout, log_path)
        return cls(proc, match.group(1), log_path)


class RouterProcess(_ManagedProcess):
    """A running ``python -m streamrnn.cli.router`` with its client endpoint.

    Example::

        with RouterProcess.start("--store", redis_url) as router:
            WorkerProcess.start("m.keras", 8, "--store", redis_url, "--name", "w1")
            client = Client(router.endpoint)
    """

    def __init__(self, proc: subprocess.Popen, endpoint: str, log_path: Path):
        super().__init__(proc, log_path)
        self.endpoint = endpoint

    @classmethod
    def start(cls, *extra_args: str, bind: str = "tcp://127.0.0.1:0",
              ready_timeout: float = 60.0,
              log_path: str | os.PathLike | None = None) -> RouterProcess:
        """Launch a router (``extra_args`` must include ``--store``) and wait for its ready
        line."""
        from streamrnn.cli.router import READY_MARKER

        proc, match, log_path = cls._launch(
            "router", ["--bind", bind, *extra_args],
            re.compile(re.escape(READY_MARKER) + r"(\S+)"), ready_timeout, log_path)
        return cls(proc, match.group(1), log_path)
