"""The trainer's checkpoint from elsewhere (issue 16, item 5): a truncated, edited or forged
file is refused with CheckpointError (the trainer process exits 2, no traceback), and the
checkpoint keeps the sequence numbers of the trainer's front, so the same Client goes on
after a restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from streamrnn.client.client import Client
from streamrnn.errors import CheckpointError
from streamrnn.serving.worker import StreamWorker, WorkerConfig
from streamrnn.training.checkpoint import TrainerCheckpoint, atomic_savez, checksum
from streamrnn.training.config import TrainConfig
from streamrnn.training.online import OnlineTrainer
from streamrnn.training.trainer import FreeRunningTrainer
from tests.helpers.redis_server import free_port
from tests.helpers.trainer_process import sample_checkpoint as _checkpoint
from tests.helpers.trainer_process import sine, small_model

REPO = Path(__file__).resolve().parents[2]


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "t.npz"
    _checkpoint().save(path)
    return path


def test_a_truncated_checkpoint_is_a_checkpoint_error(tmp_path):
    path = _saved(tmp_path)
    blob = path.read_bytes()
    for size in (0, 10, len(blob) // 2, len(blob) - 1):
        path.write_bytes(blob[:size])
        with pytest.raises(CheckpointError, match="unreadable"):
            TrainerCheckpoint.load(path)


def test_an_edited_checkpoint_is_a_checkpoint_error(tmp_path):
    path = _saved(tmp_path)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    assert arrays["checksum"].shape == (32,)
    edited = dict(arrays)
    edited["weight/0"] = arrays["weight/0"] + 1  # a consistent .npz with other weights
    atomic_savez(path, edited)
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        TrainerCheckpoint.load(path)
    atomic_savez(path, {k: v for k, v in arrays.items() if k != "checksum"})
    with pytest.raises(CheckpointError, match="no checksum"):
        TrainerCheckpoint.load(path)
    atomic_savez(path, arrays)
    assert TrainerCheckpoint.load(path) is not None


@pytest.mark.parametrize("meta", [
    {"streams": [1, 2]}, {"streams": [["a", -1, 0]]}, {"streams": [["x" * 300, 0, 0]]},
    {"step": 2**64 - 1}, {"step": -5}, {"step": "7"}, {"version": True},
    {"extra": {"sequences": {"a": -5}}}, {"extra": {"sequences": {"a": 2**64 - 1}}},
    {"extra": {"sequences": {"x" * 100_000: 1}}}, {"extra": {"log": {"last_id": "x"}}},
    {"extra": [1]},
])
def test_forged_meta_fields_are_refused(tmp_path, meta):
    """Each field is checked as strictly as a wire message (by the same code on load and in
    from_arrays), even under a valid checksum: an unkeyed checksum is no signature."""
    arrays = _checkpoint().to_arrays()
    old = json.loads(bytes(arrays["meta"]).decode())
    arrays["meta"] = np.frombuffer(json.dumps({**old, **meta}).encode(), np.uint8)
    path = tmp_path / "forged.npz"
    atomic_savez(path, {**arrays, "checksum": np.frombuffer(checksum(arrays), np.uint8)})
    with pytest.raises(CheckpointError):
        TrainerCheckpoint.load(path)


def test_a_format_1_file_without_checksum_still_loads(tmp_path):
    arrays = _checkpoint().to_arrays()
    meta = json.loads(bytes(arrays["meta"]).decode())
    arrays["meta"] = np.frombuffer(json.dumps({**meta, "format": 1}).encode(), np.uint8)
    atomic_savez(tmp_path / "old.npz", arrays)
    assert TrainerCheckpoint.load(tmp_path / "old.npz").step == 7


def test_trainer_process_refuses_a_bad_checkpoint_with_exit_2(tmp_path):
    model = tmp_path / "m.keras"
    model.write_bytes(b"never read: the checkpoint is checked first")
    bad = _saved(tmp_path)
    bad.write_bytes(bad.read_bytes()[:100])
    not_zip = tmp_path / "text.npz"
    not_zip.write_text("hello")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for path in (bad, not_zip):
        done = subprocess.run(
            [sys.executable, "-m", "streamrnn.cli.trainer", "--model", str(model),
             "--checkpoint", str(path), "--bind", "tcp://127.0.0.1:0"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr[-2000:]
        assert "refusing to start" in done.stderr and "unreadable" in done.stderr
        assert "Traceback" not in done.stderr
    assert zipfile.is_zipfile(_saved(tmp_path))


def test_the_same_client_goes_on_after_a_trainer_restart(tmp_path):
    """The checkpoint keeps the front's sequence numbers: after a graceful restart a Client
    that kept running continues its stream (it got UNKNOWN_STREAM before)."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    ckpt = tmp_path / "t.npz"

    def serve() -> tuple[OnlineTrainer, StreamWorker, int]:
        online = OnlineTrainer(FreeRunningTrainer(small_model(), slots=2,
                                                  config=TrainConfig(warmup=4)),
                               checkpoint=ckpt, checkpoint_every=2)
        worker = StreamWorker(online, WorkerConfig(bind=endpoint, coalesce_steps=0))
        restored = online.attach_sequences(worker.sequences)
        worker.start()
        return online, worker, restored

    online, worker, restored = serve()
    assert restored == 0
    with Client(endpoint, timeout=30) as client:
        for r in range(3):  # the checkpoint inside the second push counts its seqs
            client.push_many({"a": sine(0, 16 * r, 16), "b": sine(1, 16 * r, 16)})
        meta = json.loads(bytes(np.load(ckpt)["meta"]).decode())
        assert meta["extra"]["sequences"] == {"a": 2, "b": 2}  # written at step 2
        worker.stop()
        assert worker.join(30)
        online.shutdown()
        online, worker, restored = serve()
        try:
            assert restored == 2 and online.trainer.step == 3
            out = client.push("a", sine(0, 48, 16))  # seq 3, same Client
            assert out.shape == (16, 1) and np.isfinite(out).all()
        finally:
            worker.stop()
            worker.join(30)
    online.shutdown()
    meta = json.loads(bytes(np.load(ckpt)["meta"]).decode())
    assert meta["extra"]["sequences"] == {"a": 4, "b": 3} and meta["step"] == 4
