"""Interleaved rounds of kernels that each run in their own process, quiet or beside a hog.

:class:`KernelProcess` starts ``bench/kernel_peers.py`` (one kernel per process, JSON lines
over its stdin/stdout), :class:`Hog` is a one-thread ``while True: pass`` subprocess that is
stopped (SIGSTOP) between the rounds it should not disturb, and :func:`interleave` times every
kernel once per round, in an order that rotates from round to round, so each round's rates
were taken under the same load and their ratios hold on a shared machine whose speed drifts.

Example::

    with KernelSet({"ort": KernelSpec("ort-op"), "gemm": KernelSpec("gemm-ort")}) as kernels:
        rounds = interleave(kernels.ready, rounds=3, seconds=1.0)
    rounds.rates("ort")                 # timesteps/s per round
    median_ratio(rounds.rates("ort"), [g / FLOPS for g in rounds.rates("gemm")])
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kernel_peers import KernelSpec

__all__ = ["Hog", "KernelProcess", "KernelSet", "Rounds", "interleave", "median_ratio"]

BENCH = Path(__file__).resolve().parent
SCRIPT = BENCH / "kernel_peers.py"


def child_env(threads: int, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a kernel process: this one's, streamrnn importable, OpenBLAS on
    ``threads`` threads, and no inherited ``OMP_WAIT_POLICY`` (torch gets its own default
    unless ``overrides`` sets one; the torch executor sets PASSIVE itself)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH.parent),
                                                      env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["OPENBLAS_NUM_THREADS"] = str(threads)
    env.update(overrides or {})
    return env


class KernelProcess:
    """One ``kernel_peers.py`` process: :meth:`send` a request, :meth:`receive` its answer."""

    def __init__(self, env: Mapping[str, str] | None = None, python: str = sys.executable):
        fd, name = tempfile.mkstemp(prefix="streamrnn-kernel-", suffix=".log")
        self.log_path = Path(name)
        with os.fdopen(fd, "wb") as log:  # a file, not a pipe: a full pipe would block it
            self.proc = subprocess.Popen([python, str(SCRIPT)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, text=True,
                                         env=dict(env or child_env(2)), cwd=BENCH.parent)

    def send(self, request: dict[str, Any]) -> None:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"kernel process exited ({self.proc.poll()}):\n{tail}")
        return json.loads(line)

    def time(self, seconds: float) -> dict[str, Any]:
        self.send({"op": "time", "seconds": seconds})
        answer = self.receive()
        if not answer["ok"]:
            raise RuntimeError(answer["error"])
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"op": "quit"})
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log_path.unlink(missing_ok=True)


@dataclass
class Kernel:
    """A built kernel in its process: ``info`` from the build (work per call, unit, ...)."""

    name: str
    process: KernelProcess
    info: dict[str, Any]

    @property
    def work(self) -> float:
        return float(self.info["work"])


class KernelSet:
    """Start one process per kernel and build them all (their imports overlap); the ones
    that fail to build land in :attr:`missing` (name -> error) instead of :attr:`ready`.

    Args:
        specs: name -> the kernel, or (kernel, extra environment) for that process.
        python: the interpreter of the processes (numpy and the kernel's library needed;
            streamrnn only for the executors).
    """

    def __init__(self, specs: Mapping[str, KernelSpec | tuple[KernelSpec, Mapping[str, str]]],
                 python: str = sys.executable):
        self.specs = {n: s if isinstance(s, tuple) else (s, {}) for n, s in specs.items()}
        self.python = python
        self.processes: dict[str, KernelProcess] = {}
        self.ready: dict[str, Kernel] = {}
        self.missing: dict[str, str] = {}

    def __enter__(self) -> KernelSet:
        for name, (spec, extra) in self.specs.items():
            self.processes[name] = KernelProcess(child_env(spec.threads, extra), self.python)
        self.build({n: s for n, (s, _) in self.specs.items()})
        return self

    def build(self, specs: Mapping[str, KernelSpec]) -> None:
        """(Re)build the named kernels in their processes (e.g. at another shape)."""
        for name, spec in specs.items():
            self.processes[name].send({"op": "build", **asdict(spec)})
        for name in specs:
            answer = self.processes[name].receive()
            self.ready.pop(name, None)
            self.missing.pop(name, None)
            if answer["ok"]:
                self.ready[name] = Kernel(name, self.processes[name], answer["info"])
            else:
                self.missing[name] = answer["error"]

    def __exit__(self, *exc: object) -> None:
        for process in self.processes.values():
            process.close()


class Hog:
    """A one-thread busy loop in a subprocess, stopped (SIGSTOP) until :meth:`resume`."""

    def __enter__(self) -> Hog:
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        self.pause()
        return self

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        time.sleep(0.05)  # let the scheduler place it

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


@dataclass
class Rounds:
    """Per-round timings of each kernel: ``quiet`` and (with a hog) ``hogged``."""

    work: dict[str, float]
    quiet: dict[str, list[dict]] = field(default_factory=dict)
    hogged: dict[str, list[dict]] = field(default_factory=dict)
    played: int = 0

    def play(self, kernels: Mapping[str, Kernel], seconds: float, hog: Hog | None = None
             ) -> None:
        """One round: time every kernel for ``seconds``, starting one further along the list
        than the last round did; with ``hog``, each quiet run is followed by one beside it."""
        names = list(kernels)
        first = self.played % len(names)
        for name in names[first:] + names[:first]:
            self.quiet.setdefault(name, []).append(kernels[name].process.time(seconds))
            if hog is not None:
                hog.resume()
                try:
                    self.hogged.setdefault(name, []).append(
                        kernels[name].process.time(seconds))
                finally:
                    hog.pause()
        self.played += 1

    def rates(self, name: str, hogged: bool = False) -> list[float]:
        """Work units per second of ``name`` in each round."""
        runs = (self.hogged if hogged else self.quiet)[name]
        return [r["calls"] * self.work[name] / r["seconds"] for r in runs]

    def median(self, name: str, hogged: bool = False) -> float:
        return statistics.median(self.rates(name, hogged))

    def best_rate(self, name: str) -> float:
        """Work per second of the fastest single call (the least disturbed)."""
        return self.work[name] / min(r["best_s"] for r in self.quiet[name])

    def cpu_share(self, name: str) -> float:
        """Median CPU seconds per wall second of the quiet runs (threads kept busy)."""
        return statistics.median(r["cpu_s"] / r["seconds"] for r in self.quiet[name])


def interleave(kernels: Mapping[str, Kernel], rounds: int, seconds: float,
               hog: Hog | None = None) -> Rounds:
    """:meth:`Rounds.play` ``rounds`` rounds of ``kernels``."""
    out = Rounds({n: k.work for n, k in kernels.items()})
    for _ in range(rounds):
        out.play(kernels, seconds, hog)
    return out


def median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """The median of the per-round ratios ``a[i] / b[i]``."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))
