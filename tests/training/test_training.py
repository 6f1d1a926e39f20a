"""Free-running training: the compiled feedback graph, truncated BPTT, schedules, exposure
bias, and exact resume after kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

import streamrnn
from streamrnn.errors import InvalidInputError, UnsupportedModelError
from streamrnn.protocol import ErrorCode
from streamrnn.training.config import TrainConfig, feed_probability
from streamrnn.training.trainer import FreeRunningTrainer
from tests.helpers import training_job

REPO = Path(__file__).resolve().parents[2]


def regression_model(cell=keras.layers.LSTM, features: int = 2, seed: int = 0, stacked=False):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((None, features)), cell(10, return_sequences=True)]
    if stacked:
        layers.append(keras.layers.GRU(7, return_sequences=True))
    layers.append(keras.layers.Dense(features))
    return keras.Sequential(layers)


def token_model(vocab: int = 5, seed: int = 0, softmax: bool = False):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((None,), dtype="int32"), keras.layers.Embedding(vocab, 8),
        keras.layers.GRU(16, return_sequences=True),
        keras.layers.Dense(vocab, activation="softmax" if softmax else None),
    ])


def engine(model, slots):
    return streamrnn.Engine.from_keras(model, slots=slots, jit_compile=False)


# ---- the graph is the model ------------------------------------------------------------


@pytest.mark.parametrize("stacked", [False, True])
def test_teacher_forced_graph_equals_the_offline_model(stacked):
    model = regression_model(stacked=stacked)
    trainer = FreeRunningTrainer(model, slots=3, config=TrainConfig(mode="teacher"))
    x = np.random.default_rng(0).standard_normal((3, 20, 2)).astype(np.float32)
    ours = trainer.rollout(x, warmup=20, p_own=0.0)
    assert np.abs(ours - np.asarray(model(x))).max() <= 1e-5


@pytest.mark.parametrize("cell", [keras.layers.LSTM, keras.layers.SimpleRNN])
def test_free_running_graph_equals_engine_generation(cell):
    """The trainer's closed loop (one tf.while_loop) feeds back exactly what generation does."""
    model = regression_model(cell, stacked=True)
    trainer = FreeRunningTrainer(model, slots=2, config=TrainConfig(mode="free"))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 30, 2)).astype(np.float32)
    warm = 7
    ours = trainer.rollout(x, warmup=warm, p_own=1.0)
    gen = engine(model, 2).generate_many({"a": x[0, :warm], "b": x[1, :warm]}, steps=30 - warm)
    # generation feeds back y[warm-1], ..., y[28]; the trainer's outputs at those steps
    assert np.abs(ours[0, warm - 1: 29] - gen["a"]).max() <= 1e-5
    assert np.abs(ours[1, warm - 1: 29] - gen["b"]).max() <= 1e-5


@pytest.mark.parametrize("softmax", [False, True])
def test_token_feedback_is_generations_greedy_rule(softmax):
    model = token_model(softmax=softmax, seed=3)
    trainer = FreeRunningTrainer(model, slots=2, config=TrainConfig(mode="free"))
    prompt = np.array([[1, 2, 3], [4, 0, 1]], np.int32)
    x = np.zeros((2, 25), np.int32)
    x[:, :3] = prompt
    ours = trainer.rollout(x, warmup=3, p_own=1.0)
    gen = engine(model, 2).generate_many({"a": prompt[0], "b": prompt[1]}, steps=22)
    assert np.array_equal(ours[0, 2:24].argmax(-1), gen["a"])
    assert np.array_equal(ours[1, 2:24].argmax(-1), gen["b"])


def test_streams_carry_state_across_chunks_like_one_offline_call():
    """Teacher forcing with a frozen optimizer: ragged, interleaved chunks of several
    streams give the outputs of one offline call on each whole stream (truncated BPTT
    carries the state, only the gradient stops at chunk boundaries)."""
    model = regression_model(stacked=True)
    trainer = FreeRunningTrainer(model, slots=4, config=TrainConfig(mode="teacher"),
                                 optimizer=keras.optimizers.SGD(learning_rate=0.0))
    rng = np.random.default_rng(2)
    seqs = {s: rng.standard_normal((n, 2)).astype(np.float32)
            for s, n in [("a", 41), ("b", 17), ("c", 33)]}
    got = {s: [] for s in seqs}
    pos = dict.fromkeys(seqs, 0)
    while any(pos[s] < len(seqs[s]) for s in seqs):
        batch = {}
        for s in seqs:
            if pos[s] < len(seqs[s]) and rng.random() < 0.8:
                n = int(rng.integers(1, 12))
                batch[s] = seqs[s][pos[s]: pos[s] + n]
                pos[s] += len(batch[s])
        if batch:
            for s, out in trainer.train_streams(batch).items():
                assert out.shape == (len(batch[s]), 2)
                got[s].append(out)
    for s, seq in seqs.items():
        out = np.concatenate(got[s])
        assert np.isnan(out[0]).all()  # nothing predicts a stream's first observation
        ref = np.asarray(model(seq[None, :-1]))[0]  # output t predicts observation t+1
        assert np.abs(out[1:] - ref).max() <= 1e-5
    assert trainer.timesteps == sum(len(s) - 1 for s in seqs.values())


def test_reset_and_close_only_touch_their_stream():
    model = regression_model()
    trainer = FreeRunningTrainer(model, slots=2, config=TrainConfig(mode="teacher"),
                                 optimizer=keras.optimizers.SGD(learning_rate=0.0))
    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal((20, 2)).astype(np.float32) for _ in range(2))
    trainer.train_streams({"a": a[:10], "b": b[:10]})
    trainer.reset("a")
    out = trainer.train_streams({"a": a[10:], "b": b[10:]})
    assert np.abs(out["b"] - np.asarray(model(b[None, :-1]))[0, 9:]).max() <= 1e-5
    assert np.abs(out["a"][1:] - np.asarray(model(a[None, 10:-1]))[0]).max() <= 1e-5
    trainer.close("a")
    assert trainer.streams == ["b"]


# ---- schedules -------------------------------------------------------------------------


def test_feed_probability_schedules():
    for schedule, k in [("linear", 100.0), ("exponential", 0.98), ("inverse_sigmoid", 20.0)]:
        cfg = TrainConfig(mode="scheduled", schedule=schedule, schedule_steps=100, schedule_k=k)
        ps = [feed_probability(cfg, s) for s in range(0, 2000, 10)]
        assert ps[0] < 0.1 and ps[-1] > 0.99, schedule
        assert all(b >= a for a, b in zip(ps, ps[1:], strict=False)), schedule
    assert feed_probability(TrainConfig(mode="free"), 0) == 1.0
    assert feed_probability(TrainConfig(mode="teacher"), 10**6) == 0.0
    cfg = TrainConfig(mode="scheduled", schedule="linear", schedule_steps=100)
    assert feed_probability(cfg, 50) == pytest.approx(0.5)


def _one_step(config: TrainConfig) -> list[np.ndarray]:
    model = regression_model(seed=5)
    trainer = FreeRunningTrainer(model, slots=2, config=config)
    x = np.random.default_rng(5).standard_normal((2, 16, 2)).astype(np.float32)
    trainer.train_batch(x[:, :-1], x[:, 1:])
    return model.get_weights()


def test_scheduled_sampling_interpolates_between_teacher_and_free():
    teacher = _one_step(TrainConfig(mode="teacher", warmup=3))
    free = _one_step(TrainConfig(mode="free", warmup=3))
    start = _one_step(TrainConfig(mode="scheduled", schedule="linear", warmup=3))  # p = 0
    done = _one_step(TrainConfig(mode="scheduled", schedule="exponential", schedule_k=1e-9,
                                 warmup=3))  # p = 1 - k**0 = 0 at step 0 as well
    assert all(np.array_equal(a, b) for a, b in zip(teacher, start, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(teacher, done, strict=True))
    assert not all(np.allclose(a, b) for a, b in zip(teacher, free, strict=True))


def test_scheduled_coins_follow_the_probability():
    trainer = FreeRunningTrainer(regression_model(), slots=8, config=TrainConfig())
    import tensorflow as tf

    own = trainer.graph.draws(tf.constant([8, 500]), tf.constant(0.3), tf.constant(7, tf.int64), 4)
    own = own.numpy()
    assert not own[:, :4].any()  # never during the warm-up
    assert abs(own[:, 4:].mean() - 0.3) < 0.03


# ---- exposure bias ---------------------------------------------------------------------


def _signal(rng, n, steps, noise=0.2):
    """Noisy quasi-periodic signals: random period 18..22, phase, amplitude, a harmonic."""
    t = np.arange(steps)[None]
    period = rng.uniform(18, 22, (n, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    amp = rng.uniform(0.6, 1.2, (n, 1))
    clean = amp * np.sin(2 * np.pi * t / period + phase) + 0.3 * amp * np.sin(
        4 * np.pi * t / period + 2 * phase)
    noisy = clean + noise * rng.standard_normal(clean.shape)
    return clean.astype(np.float32)[..., None], noisy.astype(np.float32)[..., None]


def _train_and_generate(mode: str, steps: int = 300) -> tuple[float, float]:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((None, 1)), keras.layers.GRU(32, return_sequences=True),
                              keras.layers.Dense(1)])
    trainer = FreeRunningTrainer(model, slots=16, config=TrainConfig(
        mode=mode, warmup=16, learning_rate=5e-3, seed=0))
    rng = np.random.default_rng(0)
    for _ in range(steps):  # same data, same number of optimizer steps for both modes
        _, noisy = _signal(rng, 16, 65)
        trainer.train_batch(noisy[:, :-1], noisy[:, 1:])
    # closed loop, measured independently of the trainer: the serving engine generates
    clean, noisy = _signal(np.random.default_rng(1234), 32, 32 + 100)
    gen = engine(model, 32).generate_many({f"s{i}": noisy[i, :32] for i in range(32)},
                                          steps=100)
    pred = np.stack([gen[f"s{i}"] for i in range(32)])  # (32, 100, 1): y after 32.. steps
    closed = float(np.mean((pred - clean[:, 32:]) ** 2))
    one_step = trainer.rollout(noisy[:, :-1], warmup=10**6, p_own=0.0)
    open_loop = float(np.mean((one_step[:, 31:] - clean[:, 32:]) ** 2))
    return closed, open_loop


def test_free_running_beats_teacher_forcing_in_closed_loop(capsys):
    """Exposure bias: teacher forcing wins one-step prediction, free-running wins the
    100-step closed loop (same model, data, seed and number of optimizer steps)."""
    free_closed, free_open = _train_and_generate("free")
    tf_closed, tf_open = _train_and_generate("teacher")
    baseline = float(np.mean(_signal(np.random.default_rng(1234), 32, 132)[0][:, 32:] ** 2))
    with capsys.disabled():
        print(f"\n100-step closed-loop MSE: free-running {free_closed:.4f}, teacher-forced "
              f"{tf_closed:.4f} (predict-zero baseline {baseline:.4f}); one-step MSE: "
              f"free {free_open:.4f}, teacher {tf_open:.4f}")
    assert free_closed < 0.85 * tf_closed
    assert free_closed < baseline


def test_token_model_learns_a_cycle_with_scheduled_sampling(STEPS=80):
    model = token_model(vocab=6, seed=1)
    trainer = FreeRunningTrainer(model, slots=4, config=TrainConfig(
        mode="scheduled", schedule="linear", schedule_steps=STEPS // 2, warmup=2,
        learning_rate=2e-2, sample="temperature", seed=3))
    cycle = np.array([0, 3, 1, 4, 2, 5], np.int32)
    for step in range(STEPS):
        chunks = {f"s{k}": cycle[(k + 25 * step + np.arange(25)) % 6] for k in range(4)}
        trainer.train_streams(chunks)
    gen = engine(model, 1).generate("g", np.array([3, 1], np.int32), steps=12)
    expected = cycle[(3 + np.arange(12)) % 6]  # after 3, 1 come 4, 2, 5, 0, 3, 1, ...
    assert np.array_equal(gen, expected), (gen, expected)


# ---- resume after kill -9 --------------------------------------------------------------


def _flat(trainer):
    return ([np.asarray(w) for w in trainer.model.get_weights()],
            [np.asarray(v.numpy()) for v in trainer.optimizer.variables],
            [v.numpy() for v in trainer.state_vars])


def test_kill_9_and_restart_resumes_exactly(tmp_path):
    ckpt = tmp_path / "trainer.npz"
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    log_path = tmp_path / "job.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.training_job", str(ckpt),
                                 "100000", "--every", "3"], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "checkpoint 12" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    resumed = training_job.make_trainer()
    assert resumed.load_checkpoint(ckpt)
    saved_at = resumed.step
    assert saved_at >= 12 and saved_at % 3 == 0
    target = saved_at + 7
    training_job.train(resumed, target)

    fresh = training_job.make_trainer()
    training_job.train(fresh, target)
    assert resumed.step == fresh.step == target
    assert resumed.optimizer.iterations.numpy() == fresh.optimizer.iterations.numpy() == target
    assert resumed.streams == fresh.streams
    for got, want in zip(_flat(resumed), _flat(fresh), strict=True):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_checkpoint_round_trip_in_process(tmp_path):
    first = training_job.make_trainer()
    training_job.train(first, 4)
    first.save_checkpoint(tmp_path / "c.npz")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    second = training_job.make_trainer(seed=9)  # different init: everything is overwritten
    second.load_checkpoint(tmp_path / "c.npz")
    for got, want in zip(_flat(second), _flat(first), strict=True):
        for a, b in zip(got, want, strict=True):
            assert np.array_equal(a, b)
    assert second._pending.keys() == first._pending.keys()


# ---- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"mode": "sideways"}, {"warmup": 0}, {"schedule": "cosine"}, {"max_chunk": 48},
    {"schedule": "exponential", "schedule_k": 2.0}, {"temperature": 0.0},
    {"sample": "top_k"},
])
def test_bad_config_is_refused(kwargs):
    with pytest.raises(InvalidInputError) as err:
        FreeRunningTrainer(regression_model(), slots=2, config=TrainConfig(**kwargs))
    assert err.value.code == ErrorCode.BAD_VALUE


def test_bad_chunks_change_nothing():
    trainer = FreeRunningTrainer(regression_model(), slots=2, config=TrainConfig())
    good = np.zeros((5, 2), np.float32)
    cases = [(np.zeros((5, 3), np.float32), ErrorCode.BAD_SHAPE),
             (np.zeros((5, 2), np.int32), ErrorCode.BAD_DTYPE),
             (np.full((5, 2), np.nan, np.float32), ErrorCode.NON_FINITE),
             (np.zeros((0, 2), np.float32), ErrorCode.EMPTY_CHUNK)]
    for bad, code in cases:
        with pytest.raises(InvalidInputError) as err:
            trainer.train_streams({"a": good, "b": bad})
        assert err.value.code == code
    assert trainer.step == 0 and trainer.streams == [] and not trainer._pending
    with pytest.raises(streamrnn.EngineFullError):
        trainer.train_streams({"a": good, "b": good, "c": good})


def test_models_that_cannot_feed_back_are_refused():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((None, 3)), keras.layers.LSTM(4, return_sequences=True),
                              keras.layers.Dense(2)])
    with pytest.raises(UnsupportedModelError, match="cannot be fed back"):
        FreeRunningTrainer(model, slots=2)
    with pytest.raises(InvalidInputError) as err:
        FreeRunningTrainer(regression_model(), slots=2, config=TrainConfig(sample="temperature"))
    assert err.value.code == ErrorCode.BAD_VALUE


def test_update_is_the_truncated_bptt_gradient():
    """Chunk 2's SGD update equals the gradient of chunk 2's loss computed by Keras itself
    from chunk 1's final state taken as a constant (the gradient stops at the boundary)."""
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((None, 2)), keras.layers.GRU(6, return_sequences=True),
                              keras.layers.Dense(2)])
    lr = 0.1
    trainer = FreeRunningTrainer(model, slots=1, config=TrainConfig(mode="teacher"),
                                 optimizer=keras.optimizers.SGD(learning_rate=lr))
    seq = np.random.default_rng(0).standard_normal((1, 21, 2)).astype(np.float32)
    w0 = model.get_weights()
    trainer.train_batch(seq[:, :10], seq[:, 1:11])
    # the carried state is the pre-update model's state after chunk 1
    x = keras.Input((None, 2))
    h0 = keras.Input((6,))
    hs, h_last = keras.layers.GRU(6, return_sequences=True, return_state=True)(
        x, initial_state=[h0])
    explicit = keras.Model([x, h0], [keras.layers.Dense(2)(hs), h_last])
    explicit.set_weights(w0)
    _, state = explicit([seq[:, :10], np.zeros((1, 6), np.float32)])
    assert np.abs(trainer.state_vars[0].numpy() - np.asarray(state)).max() <= 1e-6
    # the update on chunk 2
    w1 = model.get_weights()
    explicit.set_weights(w1)
    with tf.GradientTape() as tape:
        y, _ = explicit([tf.constant(seq[:, 10:20]), tf.constant(np.asarray(state))])
        loss = tf.reduce_mean(tf.square(y - seq[:, 11:21]))
    grads = tape.gradient(loss, explicit.trainable_variables)
    trainer.train_batch(seq[:, 10:20], seq[:, 11:21])
    assert abs(trainer.last_loss - float(loss)) <= 1e-6
    for got, w, g in zip(model.get_weights(), w1, grads, strict=True):
        np.testing.assert_allclose(got, w - lr * np.asarray(g), rtol=0, atol=1e-6)
