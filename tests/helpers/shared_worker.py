"""One real worker process shared by every test module that needs one (started on first use).

The worker serves a small 2-layer LSTM (5 features -> 3 outputs) on a free loopback port
with a tiny request queue (8), so that concurrent tests also exercise BUSY and the client's
resends. It is stopped with SIGTERM when the test session's interpreter exits.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras

from streamrnn.cli.process import WorkerProcess
from tests.helpers.modelzoo import ModelSpec, build_model

SPEC = ModelSpec(cell="lstm", layers=2, units=16, features=5, out=3)
SLOTS = 16


@dataclass
class SharedWorker:
    process: WorkerProcess
    model: keras.Model  # the original model, for offline references
    model_path: Path

    @property
    def endpoint(self) -> str:
        return self.process.endpoint


_shared: SharedWorker | None = None


def shared_worker() -> SharedWorker:
    global _shared
    if _shared is None or _shared.process.proc.poll() is not None:
        tmp = Path(tempfile.mkdtemp(prefix="streamrnn-test-"))
        model = build_model(SPEC)
        path = tmp / "lstm2.keras"
        model.save(path)
        process = WorkerProcess.start(path, SLOTS, "--max-queue", "8", "--no-xla",
                                      log_path=tmp / "worker.log")
        _shared = SharedWorker(process, model, path)

        def cleanup() -> None:
            process.stop()
            shutil.rmtree(tmp, ignore_errors=True)

        atexit.register(cleanup)
    return _shared
