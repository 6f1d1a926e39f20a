"""The `streamrnn` command: publish against a real worker, the demo, --help."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.helpers.modelzoo import offline
from tests.helpers.shared_worker import SPEC, shared_worker

REPO = Path(__file__).resolve().parents[2]


def streamrnn(*args: str, timeout: float = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "streamrnn.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_help_lists_subcommands():
    result = streamrnn("--help")
    assert result.returncode == 0
    for name in ("worker", "publish", "demo", "trainer", "bench"):
        assert name in result.stdout
    worker_help = streamrnn("worker", "--help").stdout
    for option in ("--checkpoint-dir", "--metrics-port", "--weights-from", "--max-streams"):
        assert option in worker_help


def test_publish_writes_outputs_equal_to_offline(tmp_path):
    worker = shared_worker()
    x = np.random.default_rng(0).standard_normal((90, SPEC.features)).astype(np.float32)
    np.save(tmp_path / "data.npy", x)
    for _ in range(2):  # publishing again resets the stream first
        result = streamrnn("publish", str(tmp_path / "data.npy"), "--stream", "cli-pub",
                           "--chunk", "16", "--endpoint", worker.endpoint,
                           "--out", str(tmp_path / "out.npy"))
        assert result.returncode == 0, result.stderr
        assert "steps/s" in result.stdout
        out = np.load(tmp_path / "out.npy")
        np.testing.assert_allclose(out, offline(worker.model, x), atol=1e-5)


def test_demo_small_runs_and_reports_throughput(tmp_path):
    # from a folder other than the repository root: the worker it starts must still be found
    result = streamrnn("demo", "--streams", "8", "--steps", "64", "--slots", "8", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "timesteps/s" in result.stdout and "p99" in result.stdout
    assert "OK" in result.stdout


def test_process_children_run_from_the_folder_holding_the_package():
    from streamrnn.cli import process

    assert (process._SOURCE_ROOT / "streamrnn" / "cli" / "process.py").exists()


class _Service:
    """Stops after ``stop()`` or after ``joins`` joins."""

    def __init__(self, joins: int = 1_000_000):
        self.joins, self.stopped = joins, False

    def stop(self) -> None:
        self.stopped = True

    def join(self, timeout: float | None = None) -> bool:
        self.joins -= 1
        return self.stopped or self.joins <= 0


def test_lifecycle_wait_ticks_until_the_service_stopped():
    from streamrnn.cli.lifecycle import wait

    service, ticks = _Service(joins=4), []
    wait(service, lambda: ticks.append(1), every_s=0.0)
    assert len(ticks) == 3 and service.joins == 0


def test_lifecycle_signals_stop_the_service_and_log(caplog):
    import logging

    from streamrnn.cli.lifecycle import log_ready, stop_on_signals

    log = logging.getLogger("streamrnn.test-lifecycle")
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with caplog.at_level(logging.INFO, logger=log.name):
            for signum in (signal.SIGTERM, signal.SIGINT):
                service = _Service()
                stop_on_signals(service, log, "stopping")
                os.kill(os.getpid(), signum)
                assert service.stopped
            log_ready(log, "thing ready on ", "tcp://127.0.0.1:1", "(slots=2)")
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    assert [r.getMessage() for r in caplog.records] == [
        "received SIGTERM: stopping", "received SIGINT: stopping",
        "thing ready on tcp://127.0.0.1:1 (slots=2)"]
