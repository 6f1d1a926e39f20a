"""Generation on the executor (ONNX Runtime): the numpy token picker equals the TF one, and
the per-token executor loop gives the tokens of the compiled Keras loop, leaves each stream
where one offline Keras call on ``concat(prompt, generated, chunk)`` says (max abs <= 1e-5),
runs a pinned version's weights and touches no other slot."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from streamrnn import Engine
from streamrnn.engine import token_ops, token_pick

V, TOL = 17, 1e-5
PROMPTS = {f"s{i}": np.array([1 + i, 3, (5 * i) % V], np.int32) for i in range(5)}
CHUNK = np.array([2, 9, 4], np.int32)


def _dense(out: int, activation: str | None = "softmax") -> keras.layers.Dense:
    # large output weights: confident, well separated outputs (no float near-ties)
    return keras.layers.Dense(out, activation=activation,
                              kernel_initializer=keras.initializers.RandomNormal(0, 1.5))


def token_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((None,), dtype="int32"), keras.layers.Embedding(V, 8),
                             keras.layers.LSTM(16, return_sequences=True), _dense(V)])


def onehot_model() -> keras.Model:
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((None, V)), keras.layers.GRU(16, return_sequences=True),
                             _dense(V)])


def regression_model() -> keras.Model:
    keras.utils.set_random_seed(2)
    return keras.Sequential([keras.Input((None, 3)), keras.layers.LSTM(12, return_sequences=True),
                             keras.layers.Dense(3)])


def engines(model: keras.Model, slots: int = 6) -> tuple[Engine, Engine]:
    """(ONNX Runtime engine, Keras engine) over the same model."""
    return (Engine.from_keras(model, slots=slots, executor="onnxruntime"),
            Engine.from_keras(model, slots=slots, executor="keras", jit_compile=False))


def assert_on_executor(engine: Engine, calls: int) -> None:
    """The executor loop ran ``calls`` steps and the compiled Keras loop never traced."""
    assert engine.token_loop.calls == calls
    assert engine._generator is None or engine._generator.trace_count == 0


def assert_push_is_offline(engine: Engine, model: keras.Model, stream: str, history: np.ndarray,
                           chunk: np.ndarray) -> None:
    """A push of ``chunk`` now returns one offline call on ``history + chunk``'s last steps."""
    got = engine.push(stream, chunk)
    full = np.asarray(model(np.concatenate([history, chunk])[None]))[0]
    np.testing.assert_allclose(got, full[-len(chunk):], atol=TOL)


# ---- the numpy picker ----------------------------------------------------------------


def test_hash_uniform_is_bit_identical_to_tf() -> None:
    rng = np.random.default_rng(0)
    key = rng.integers(0, 2**32, (400, 2), dtype=np.int64)
    counter = np.concatenate([rng.integers(0, 2**32, 200), rng.integers(2**32, 2**62, 200),
                              [0, 2**32 - 1, 2**32, 2**63 - 1]]).astype(np.int64)
    key = np.concatenate([key, [[0, 0], [2**32 - 1, 2**32 - 1], [1, 2], [7, 0]]])
    want = token_ops.hash_uniform(tf.constant(key), tf.constant(counter), V).numpy()
    got = token_pick.hash_uniform(key, counter, V)
    assert got.dtype == np.float32 and got.shape == (404, V)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("probs", [True, False])
@pytest.mark.parametrize("no_zero", [False, True])
def test_pick_tokens_equals_tf(probs: bool, no_zero: bool) -> None:
    """Random outputs (no near-ties at this size: not one disagreement seen) with greedy,
    temperature and top-k rows mixed, and all-greedy batches."""
    rng = np.random.default_rng(int(probs) + 2 * int(no_zero))
    n = 500
    y = rng.random((n, V)).astype(np.float32)
    y = (y / y.sum(1, keepdims=True)) if probs else (6 * y - 3)
    key = rng.integers(0, 2**32, (n, 2), dtype=np.int64)
    counter = rng.integers(0, 2**40, n).astype(np.int64)
    inv_t = rng.uniform(0.3, 3.0, n).astype(np.float32)
    top_k = rng.integers(0, V + 1, n).astype(np.int32)
    for greedy in (rng.random(n) < 0.3, np.ones(n, bool), np.zeros(n, bool)):
        args = (probs, greedy, inv_t, top_k, key, counter)
        want = token_ops.pick_tokens(tf.constant(y), probs, *map(tf.constant, args[1:]),
                                     no_zero=no_zero).numpy()
        got = token_pick.pick_tokens(y, *args, no_zero=no_zero)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want)
        if no_zero:
            assert (got != 0).all()


# ---- the executor loop vs the compiled Keras loop ------------------------------------


@pytest.fixture(scope="module")
def tokens() -> tuple[keras.Model, Engine, Engine]:
    model = token_model()
    return (model, *engines(model))


@pytest.mark.parametrize("kwargs", [
    {"steps": 30},
    {"steps": 30, "sample": "top_k", "top_k": 4, "temperature": 0.9, "seed": 7},
    {"steps": 25, "sample": "temperature", "seed": {"s0": 3, "s2": 11}},
])
def test_token_generation_equals_keras_loop(tokens, kwargs) -> None:
    model, ort, ref = tokens
    calls = ort.token_loop.calls
    got = ort.generate_many(PROMPTS, **kwargs)
    want = ref.generate_many(PROMPTS, **kwargs)
    assert_on_executor(ort, calls + kwargs["steps"])
    for s, prompt in PROMPTS.items():
        assert got[s].dtype == np.int32 and len(got[s]) == kwargs["steps"]
        np.testing.assert_array_equal(got[s], want[s], err_msg=s)
        assert_push_is_offline(ort, model, s, np.concatenate([prompt, got[s]]), CHUNK)
        ort.close(s)
        ref.close(s)


def test_end_token_stops_each_stream_after_feeding_it(tokens) -> None:
    model, ort, ref = tokens
    kwargs = {"steps": 40, "sample": "top_k", "top_k": 3, "seed": 5}
    free = ref.generate_many(PROMPTS, **kwargs)
    end = int(free["s1"][6])  # s1 stops at step 6 at the latest
    for s in PROMPTS:
        ref.close(s)
    got = ort.generate_many(PROMPTS, end_token=end, **kwargs)
    want = ref.generate_many(PROMPTS, end_token=end, **kwargs)
    assert len(got["s1"]) <= 7
    for s, prompt in PROMPTS.items():
        np.testing.assert_array_equal(got[s], want[s], err_msg=s)
        stop = np.flatnonzero(free[s] == end)
        assert len(got[s]) == (stop[0] + 1 if stop.size else 40)
        assert_push_is_offline(ort, model, s, np.concatenate([prompt, got[s]]), CHUNK)
        ort.close(s)
        ref.close(s)


def test_generation_leaves_other_slots_alone(tokens) -> None:
    model, ort, _ = tokens
    ort.push("idle", PROMPTS["s0"])
    before = ort.snapshot("idle")
    ort.generate_many({"g": PROMPTS["s1"]}, steps=12)
    for a, b in zip(ort.snapshot("idle"), before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert_push_is_offline(ort, model, "idle", PROMPTS["s0"], CHUNK)
    ort.close("idle")
    ort.close("g")


def test_onehot_generation_equals_keras_loop() -> None:
    model = onehot_model()
    ort, ref = engines(model, slots=4)
    eye = np.eye(V, dtype=np.float32)
    prompts = {s: p for s, p in list(PROMPTS.items())[:4]}  # ids: one-hot models take them
    kwargs = {"steps": 20, "sample": "top_k", "top_k": 5, "seed": 2}
    got = ort.generate_many(prompts, **kwargs)
    want = ref.generate_many(prompts, **kwargs)
    assert_on_executor(ort, 20)
    for s, prompt in prompts.items():
        np.testing.assert_array_equal(got[s], want[s], err_msg=s)
        assert_push_is_offline(ort, model, s, eye[np.concatenate([prompt, got[s]])], eye[CHUNK])


def test_prediction_generation_equals_keras_loop() -> None:
    model = regression_model()
    ort, ref = engines(model, slots=4)
    rng = np.random.default_rng(3)
    prompts = {f"r{i}": rng.standard_normal((4 + i, 3)).astype(np.float32) for i in range(4)}
    got = ort.generate_many(prompts, steps=20)
    want = ref.generate_many(prompts, steps=20)
    assert_on_executor(ort, 20)
    chunk = rng.standard_normal((3, 3)).astype(np.float32)
    for s, prompt in prompts.items():
        assert got[s].shape == (20, 3) and got[s].dtype == np.float32
        np.testing.assert_allclose(got[s], want[s], atol=TOL)
        assert_push_is_offline(ort, model, s, np.concatenate([prompt, got[s]]), chunk)


def test_pinned_version_generates_with_its_weights() -> None:
    """Latest = model 1's weights; a stream pinned to version 0 generates (every step, not
    only the prompt) with model 0's: tokens as a Keras engine on model 0, and its state as
    one offline call of model 0."""
    old, new = token_model(0), token_model(1)
    ort = Engine.from_keras(old, slots=3, executor="onnxruntime")
    ort.set_weights(new.get_weights(), version=1)
    ref = Engine.from_keras(old, slots=3, executor="keras", jit_compile=False)
    prompt = PROMPTS["s3"]
    with ort.pinned_weights(0, old.get_weights()):
        got = ort.generate("old", prompt, steps=25, sample="top_k", top_k=3, seed=4)
        assert_push_is_offline(ort, old, "old", np.concatenate([prompt, got]), CHUNK)
    np.testing.assert_array_equal(
        got, ref.generate("old", prompt, steps=25, sample="top_k", top_k=3, seed=4))
    latest = ort.generate("new", prompt, steps=25)
    assert_on_executor(ort, 50)
    assert_push_is_offline(ort, new, "new", np.concatenate([prompt, latest]), CHUNK)
