"""The fused fast path computes what the Keras layers compute, on the same variables."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from streamrnn import Engine
from streamrnn.executors.fused import FusedRNN, fusable
from streamrnn.executors.models import build_serving_model
from tests.helpers.modelzoo import ModelSpec, build_model, offline, random_input

SLOTS = 5
TOL = 1e-5

CASES = [
    ("lstm", {}),
    ("lstm", {"use_bias": False, "activation": "relu", "recurrent_activation": "hard_sigmoid"}),
    ("gru", {"reset_after": True}),
    ("gru", {"reset_after": False}),
    ("gru", {"reset_after": True, "use_bias": False}),
    ("simple", {}),
    ("simple", {"use_bias": False, "activation": "relu"}),
]
LAYERS = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU, "simple": keras.layers.SimpleRNN}


def _stacked(cell: str, kwargs: dict, layers: int = 2, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    chain: list = [keras.Input((None, 4))]
    chain += [LAYERS[cell](6, return_sequences=True, **kwargs) for _ in range(layers)]
    chain.append(keras.layers.Dense(3))
    return keras.Sequential(chain)


def _pair(model: keras.Model):
    keras_path = build_serving_model(model, SLOTS, fused=False)
    fused_path = build_serving_model(model, SLOTS, fused=True)
    assert not keras_path.fused_layers
    assert len(fused_path.fused_layers) == len(fused_path.rnn_layers)
    return keras_path, fused_path


# Every cell variant as a plain graph; the three cell types also under XLA (the runner's
# default on CPU), where the fused path takes its while-loop form.
GRID = [(c, k, False) for c, k in CASES] + [(*CASES[i], True) for i in (0, 3, 5)]


@pytest.mark.parametrize(
    ("cell", "kwargs", "jit"), GRID, ids=[f"{c}-{k}-{'xla' if j else 'graph'}" for c, k, j in GRID]
)
def test_fused_matches_keras_layers_across_chunks_and_masks(cell, kwargs, jit):
    keras_path, fused_path = _pair(_stacked(cell, kwargs))
    step_k = tf.function(keras_path.forward, jit_compile=jit)
    step_f = tf.function(fused_path.forward, jit_compile=jit)
    rng = np.random.default_rng(1)
    # Chunk boundaries: state must carry across calls; 40 > MAX_UNROLL exercises the loop.
    for steps in (1, 3, 40, 3):
        x = rng.standard_normal((SLOTS, steps, 4)).astype(np.float32)
        mask = rng.random((SLOTS, steps)) < 0.7
        mask[0] = False  # an idle slot: fully masked row carries its state
        mask[1] = True
        yk = step_k(x, mask).numpy()
        yf = step_f(x, mask).numpy()
        assert np.abs(yk - yf)[mask].max() <= TOL
        for vk, vf in zip(
            keras_path.state_variables(), fused_path.state_variables(), strict=True
        ):
            assert np.abs(vk.numpy() - vf.numpy()).max() <= TOL


def test_masked_steps_leave_state_unchanged():
    _, fused_path = _pair(_stacked("lstm", {}))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((SLOTS, 4, 4)).astype(np.float32)
    fused_path.forward(x, np.ones((SLOTS, 4), bool))
    before = [v.numpy().copy() for v in fused_path.state_variables()]
    mask = np.ones((SLOTS, 4), bool)
    mask[2] = False
    fused_path.forward(x, mask)
    after = [v.numpy() for v in fused_path.state_variables()]
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(a[2], b[2])
        assert np.abs(a[3] - b[3]).max() > 0  # the live rows did move


def test_fused_reads_weights_at_call_time():
    model = _stacked("gru", {})
    keras_path, fused_path = _pair(model)
    step = tf.function(fused_path.forward)
    x = np.random.default_rng(3).standard_normal((SLOTS, 2, 4)).astype(np.float32)
    mask = np.ones((SLOTS, 2), bool)
    step(x, mask)  # traced with the old weights
    other = _stacked("gru", {}, seed=7)
    fused_path.set_weights_from(other)
    keras_path.set_weights_from(other)
    for path in (fused_path, keras_path):
        for v in path.state_variables():
            v.assign(tf.zeros_like(v))
    np.testing.assert_allclose(
        step(x, mask).numpy(), keras_path.forward(x, mask).numpy(), atol=TOL, rtol=0
    )


@pytest.mark.parametrize("cell", ["lstm", "gru", "simple"])
def test_engine_fused_streams_like_offline(cell):
    spec = ModelSpec(cell, layers=2, units=6, features=4)
    model = build_model(spec, seed=4)
    engine = Engine.from_keras(model, slots=3, max_bucket=8, fused=True, executor="keras")
    assert engine.serving.fused_layers
    assert "fused" in engine.kernel
    rng = np.random.default_rng(5)
    seqs = {s: random_input(spec, 23, rng) for s in ("a", "b")}
    got = {s: [] for s in seqs}
    cuts = {"a": [0, 1, 9, 10, 23], "b": [0, 5, 6, 17, 23]}  # includes splits > max_bucket
    for k in range(4):
        step = {s: seqs[s][cuts[s][k] : cuts[s][k + 1]] for s in seqs}
        for s, y in engine.push_many(step).items():
            got[s].append(y)
    for s, seq in seqs.items():
        diff = np.abs(np.concatenate(got[s]) - offline(model, seq)).max()
        assert diff <= TOL, (s, diff)


def test_token_model_and_generic_cell_are_fused():
    spec = ModelSpec("lstm", layers=1, units=5, tokens=True, features=11, generic_cell=True)
    model = build_model(spec, seed=6)
    engine = Engine.from_keras(model, slots=2, max_bucket=4, fused=True, executor="keras")
    assert list(engine.serving.fused_layers) == [1]  # after the Embedding
    seq = random_input(spec, 9, np.random.default_rng(7))
    out = np.concatenate([engine.push("s", seq[:4]), engine.push("s", seq[4:])])
    assert np.abs(out - offline(model, seq)).max() <= TOL


def test_unfusable_layers_fall_back_to_keras():
    @keras.saving.register_keras_serializable(package="test_fused")
    class MyCell(keras.layers.SimpleRNNCell):
        pass

    keras.utils.set_random_seed(8)
    model = keras.Sequential(
        [
            keras.Input((None, 4)),
            keras.layers.RNN(MyCell(5), return_sequences=True),
            keras.layers.LSTM(5, return_sequences=True),
        ]
    )
    serving = build_serving_model(model, 2, fused=True)
    assert "MyCell" in fusable(serving.layers[0])
    assert list(serving.fused_layers) == [1]
    with pytest.raises(ValueError, match="cannot run fused"):
        FusedRNN(serving.layers[0])
    # Non-stateful layers are refused too (the serving clones are all stateful).
    assert fusable(keras.layers.LSTM(3)) is not None
