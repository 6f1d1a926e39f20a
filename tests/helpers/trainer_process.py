"""Shared by the trainer tests: a small model and its data, a trainer checkpoint to play
with, and a real trainer process (``python -m streamrnn.cli.trainer``) to start and stop.

Example::

    trainer = TrainerProcess(["--model", "m.keras", "--bind", "tcp://127.0.0.1:0"], log_path)
    with Client(trainer.endpoint) as client:
        client.push("s", sine(0, 0, 16))
    assert trainer.terminate() == 0
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np

from streamrnn.cli.trainer import READY_MARKER
from streamrnn.training.checkpoint import TrainerCheckpoint

__all__ = ["REPO", "TrainerProcess", "sample_checkpoint", "sine", "small_model"]

REPO = Path(__file__).resolve().parents[2]


def small_model(seed: int = 0) -> keras.Model:
    """A GRU(12) + Dense(1) next-step model of 1 feature (seeded)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((None, 1)), keras.layers.GRU(12, return_sequences=True),
                             keras.layers.Dense(1)])


def sine(stream: int, start: int, n: int) -> np.ndarray:
    """Steps ``start .. start + n`` of stream ``stream``'s sine, ``(n, 1)`` float32."""
    t = np.arange(start, start + n)
    return np.sin(0.37 * t + stream)[:, None].astype(np.float32)


class TrainerProcess:
    """A trainer process logging to ``log_path``; returns once its ready line is there."""

    def __init__(self, args: list[str], log_path: Path, module: str = "streamrnn.cli.trainer"):
        env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
        self.log_path = log_path
        with open(log_path, "ab") as log:
            command = [sys.executable, "-m", *module.split(), *args]
            self.proc = subprocess.Popen(command,
                                         cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        pattern = re.compile(re.escape(READY_MARKER) + r"(\S+)")
        while True:
            found = pattern.findall(self.log())
            if len(found) > self.log().count("stopped cleanly"):
                self.endpoint = found[-1]
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("trainer did not start:\n" + self.log()[-4000:])
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def sample_checkpoint() -> TrainerCheckpoint:
    """A checkpoint of two streams, three arrays and counters (no model behind it)."""
    rng = np.random.default_rng(0)
    return TrainerCheckpoint(
        weights=[rng.standard_normal((3, 4)).astype(np.float32), np.zeros(4, np.float32)],
        optimizer=[np.array(7, np.int64), rng.standard_normal((3, 4)).astype(np.float32)],
        states=[rng.standard_normal((4, 6)).astype(np.float32)],
        streams=[("b", 2, 30), ("a", 0, 12)],
        pending={"a": np.array([0.5, -1.0], np.float32)},
        step=7, version=2, timesteps=42, last_loss=0.25, config={"mode": "free"},
        optimizer_name="Adam",
    )
