"""The `streamrnn` command: publish against a real worker, the demo, --help."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np

from streamrnn.cli.process import WorkerProcess
from streamrnn.client import Client
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
    for option in ("--checkpoint-dir", "--metrics-port", "--weights-from", "--max-streams",
                   "--executor", "--threads", "--precision"):
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


def test_worker_names_its_executor_in_the_ready_line_stats_and_ping():
    worker = shared_worker()  # started without --executor: auto, ONNX Runtime on this CPU
    assert "executor=onnxruntime, kernel=" in worker.process.log()
    with Client(worker.endpoint) as client:
        assert "onnxruntime" in client.ping()["worker"]["kernel"]
        engine = client.stats()["engine"]
    assert (engine["executor"], engine["executor_fallback"]) == ("onnxruntime", None)


def test_worker_executor_fallback_is_visible_and_a_named_one_is_refused(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((None, 3)), keras.layers.Masking(0.0),
                              keras.layers.GRU(4, return_sequences=True)])
    path = tmp_path / "masking.keras"
    model.save(path)
    with WorkerProcess.start(path, 2, "--no-xla", "--no-warmup") as worker:
        assert "executor=keras (auto fell back: onnxruntime: masking" in worker.log()
        with Client(worker.endpoint) as client:
            engine = client.stats()["engine"]
    assert engine["executor"] == "keras"
    assert engine["executor_fallback"].startswith("onnxruntime: masking")
    result = streamrnn("worker", "--model", str(path), "--slots", "2", "--executor",
                       "onnxruntime", "--bind", "tcp://127.0.0.1:0")
    assert result.returncode != 0
    assert "executor='onnxruntime' cannot run model" in result.stderr + result.stdout
    assert "masking" in result.stderr + result.stdout


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
