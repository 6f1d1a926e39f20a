"""The `streamrnn` command: publish against a real worker, the demo, --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.modelzoo import offline
from tests.shared_worker import SPEC, shared_worker

REPO = Path(__file__).resolve().parent.parent


def streamrnn(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamrnn.cli", *args], cwd=REPO,
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


def test_demo_small_runs_and_reports_throughput():
    result = streamrnn("demo", "--streams", "8", "--steps", "64", "--slots", "8")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "timesteps/s" in result.stdout and "p99" in result.stdout
    assert "OK" in result.stdout
