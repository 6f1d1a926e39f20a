"""The online trainer as a real process fed over a real ZeroMQ socket."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

import streamrnn
from streamrnn.client.client import Client
from streamrnn.engine.weights import (
    WeightsFollower,
    latest_version,
    list_versions,
    load_weights,
    publish_weights,
)
from streamrnn.errors import RemoteError
from streamrnn.serving.worker import StreamWorker, WorkerConfig
from streamrnn.training.config import TrainConfig
from streamrnn.training.online import OnlineTrainer
from streamrnn.training.trainer import FreeRunningTrainer
from tests.helpers.trainer_process import TrainerProcess, sine, small_model


def test_trainer_process_trains_checkpoints_publishes_and_resumes(tmp_path):
    model_path = tmp_path / "m.keras"
    small_model().save(model_path)
    ckpt, pub, png = tmp_path / "ck" / "t.npz", tmp_path / "pub", tmp_path / "loss.png"
    args = ["--model", str(model_path), "--bind", "tcp://127.0.0.1:0", "--slots", "4",
            "--warmup", "4", "--lr", "0.01", "--checkpoint", str(ckpt), "--checkpoint-every",
            "4", "--publish-dir", str(pub), "--publish-every", "10", "--loss-png", str(png),
            "--no-progress", "--batch-window-us", "20000"]
    log_path = tmp_path / "trainer.log"
    trainer = TrainerProcess(args, log_path)
    rounds = 24
    try:
        with Client(trainer.endpoint, timeout=60) as client:
            outs = {k: [] for k in range(3)}
            for r in range(rounds):
                got = client.push_many({f"s{k}": sine(k, 16 * r, 16) for k in range(3)})
                for k in range(3):
                    outs[k].append(got[f"s{k}"])
            stats = client.stats()
            with pytest.raises(RemoteError) as err:
                client.push("bad", np.zeros((4, 3), np.float32))
            assert "BAD_SHAPE" in str(err.value)
    finally:
        code = trainer.terminate()
    log = trainer.log()
    assert code == 0, log[-3000:]
    assert "stopped cleanly" in log
    for k in range(3):
        out = np.concatenate(outs[k])
        assert out.shape == (16 * rounds, 1)
        assert np.isnan(out[0]).all() and np.isfinite(out[1:]).all()
    assert "step" in str(stats)

    # every chunk round was at least one optimizer step; the counters agree on disk
    data = np.load(ckpt)
    meta = json.loads(bytes(data["meta"]).decode())
    steps = meta["step"]
    assert rounds <= steps <= 3 * rounds
    assert meta["version"] == latest_version(pub) >= steps // 10
    assert sorted(s for s, _, _ in meta["streams"]) == ["s0", "s1", "s2"]
    weights, info = load_weights(pub)
    assert info["step"] == steps
    assert all(np.array_equal(w, data[f"weight/{i}"]) for i, w in enumerate(weights))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the model learned something: its one-step error on a fresh sine is small
    model = small_model()
    model.set_weights(weights)
    x = sine(7, 0, 64)
    before = np.mean((np.asarray(small_model()(x[None, :-1]))[0] - x[1:]) ** 2)
    after = np.mean((np.asarray(model(x[None, :-1]))[0] - x[1:]) ** 2)
    assert after < 0.5 * before, (before, after)

    # restart (through the `streamrnn trainer` command): resumes at the checkpointed step
    trainer = TrainerProcess(args, log_path, module="streamrnn.cli trainer")
    try:
        assert f"resumed from {ckpt} at step {steps}" in trainer.log()
        with Client(trainer.endpoint, timeout=60) as client:
            client.push_many({f"s{k}": sine(k, 16 * rounds, 16) for k in range(3)})
    finally:
        assert trainer.terminate() == 0
    meta = json.loads(bytes(np.load(ckpt)["meta"]).decode())
    assert meta["step"] > steps
    assert list_versions(pub)[-1] == meta["version"]


def test_worker_follows_trainer_weights_in_process(tmp_path):
    """Trainer and a following worker engine in one process: the worker picks up each
    published version between its steps, its streams keep their state."""
    online = OnlineTrainer(
        FreeRunningTrainer(small_model(), slots=2, config=TrainConfig(warmup=4)),
        publish_dir=tmp_path, publish_every=3)
    serving = WeightsFollower(streamrnn.Engine.from_keras(small_model(), slots=2,
                                                          jit_compile=False),
                              tmp_path, poll_s=0.0)
    seen = []
    for r in range(7):
        online.push_many({"t": sine(0, 16 * r, 16)})
        serving.push("live", sine(1, 8 * r, 8))
        seen.append(serving.weights_version)
    assert seen == [0, 0, 1, 1, 1, 2, 2]
    assert all(np.array_equal(a, b) for a, b in zip(
        serving.serving.get_weights(), load_weights(tmp_path, 2)[0], strict=True))


def test_paired_targets_over_a_socket(tmp_path):
    """--paired: each chunk carries its targets; here the task is y_t = -x_t (so without the
    targets the trainer would learn something else)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((None, 1)), keras.layers.GRU(8, return_sequences=True),
                              keras.layers.Dense(1)])
    online = OnlineTrainer(
        FreeRunningTrainer(model, slots=2, config=TrainConfig(mode="teacher", learning_rate=0.02)),
        paired=True)
    worker = StreamWorker(online, WorkerConfig(bind="tcp://127.0.0.1:0"))
    endpoint = worker.start()
    rng = np.random.default_rng(0)
    try:
        with Client(endpoint, timeout=60) as client:
            for _ in range(60):
                x = rng.standard_normal((16, 1)).astype(np.float32)
                out = client.push("p", np.concatenate([x, -x], axis=1))
                assert out.shape == (16, 1) and np.isfinite(out).all()
            with pytest.raises(RemoteError, match="BAD_SHAPE"):
                client.push("p", x)  # no targets
    finally:
        worker.stop()
        worker.join(30)
    x = rng.standard_normal((1, 32, 1)).astype(np.float32)
    assert np.mean((np.asarray(model(x)) + x) ** 2) < 0.1
    assert online.trainer.step == 60


def test_worker_process_follows_published_weights(tmp_path):
    """`streamrnn worker --weights-from DIR`: a new version published mid-stream is used
    from the next step on, and the stream continues from its state."""
    from streamrnn.cli.process import WorkerProcess
    from tests.helpers.weights_helpers import D, model_with_seed, offline_with_swap

    model_path = tmp_path / "m.keras"
    model_with_seed(0).save(model_path)
    old, new = model_with_seed(0).get_weights(), model_with_seed(1).get_weights()
    pub = tmp_path / "pub"
    x = np.random.default_rng(0).standard_normal((30, D)).astype(np.float32)
    with WorkerProcess.start(model_path, 2, "--weights-from", str(pub), "--weights-poll-s",
                             "0", "--no-xla", "--no-warmup") as worker:
        with Client(worker.endpoint, timeout=60) as client:
            # version 0 = the model file's weights, in use now
            assert client.open("pinned", pin_version=0)["pin_version"] == 0
            with pytest.raises(RemoteError, match="BAD_VALUE"):
                client.open("other", pin_version=7)  # never published
            first = client.push("a", x[:12])
            pinned_first = client.push("pinned", x[:12])
            publish_weights(pub, new, 1)
            second = client.push("a", x[12:])
            pinned_second = client.push("pinned", x[12:])
            assert client.stats()["engine"]["weights_version"] == 1
    got = np.concatenate([first, second])
    assert np.abs(got - offline_with_swap(old, new, x, 12)).max() <= 1e-5
    # The pinned stream kept version 0 through the swap: old weights all the way.
    pinned = np.concatenate([pinned_first, pinned_second])
    assert np.abs(pinned - offline_with_swap(old, old, x, 12)).max() <= 1e-5
