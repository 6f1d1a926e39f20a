"""The ONNX Runtime executor's contract: streaming equals one offline Keras call.

For each small seeded model, several streams are fed random chunks (1..40 steps) in random
groups, with a reset in the middle and a snapshot restored into another slot; every
stream's concatenated outputs must equal the original model applied once to its whole
sequence since its last reset (max abs difference <= 1e-5).
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import pytest
import tensorflow as tf

from streamrnn.errors import UnsupportedModelError
from streamrnn.executors.onnx_graph import OnnxUnsupported, build_onnx_graph
from streamrnn.executors.ort import HostStateBank, OrtExecutor

L = keras.layers
TOL = 1e-5


def _seq(*layers: L.Layer, tokens: bool = False) -> keras.Model:
    inp = keras.Input((None,), dtype="int32") if tokens else keras.Input((None, 5))
    return keras.Sequential([inp, *layers])


def _functional() -> keras.Model:
    inp = keras.Input((None, 5))
    h = L.SimpleRNN(10, activation="linear", return_sequences=True)(inp)
    h = L.Dense(4)(h)
    return keras.Model(inp, L.Softmax()(h))


MODELS: dict[str, Callable[[], keras.Model]] = {
    "lstm": lambda: _seq(L.LSTM(16, return_sequences=True), L.Dense(3)),
    "gru_reset_after": lambda: _seq(
        L.GRU(16, return_sequences=True), L.TimeDistributed(L.Dense(4, activation="tanh"))),
    "gru_reset_before": lambda: _seq(
        L.GRU(12, reset_after=False, return_sequences=True), L.Dense(3, activation="softmax")),
    "simple_layernorm": lambda: _seq(
        L.SimpleRNN(16, return_sequences=True), L.LayerNormalization(),
        L.Dense(3, activation="relu")),
    "stacked_dropout_batchnorm": lambda: _seq(
        L.LSTM(16, return_sequences=True), L.Dropout(0.3), L.GRU(8, return_sequences=True),
        L.BatchNormalization(), L.Dense(3)),
    "rnn_lstm_cell": lambda: _seq(
        L.RNN(L.LSTMCell(16), return_sequences=True), L.Dense(2, activation="sigmoid")),
    "stacked_cells": lambda: _seq(
        L.RNN(L.StackedRNNCells([L.LSTMCell(8), L.GRUCell(12)]), return_sequences=True),
        L.Dense(3, activation="gelu")),
    "cell_list": lambda: _seq(
        L.RNN([L.SimpleRNNCell(8, use_bias=False), L.GRUCell(8, reset_after=False)],
              return_sequences=True),
        L.Dense(3, activation="silu")),
    "tokens": lambda: _seq(
        L.Embedding(20, 6), L.LSTM(16, return_sequences=True),
        L.Dense(20, activation="log_softmax"), tokens=True),
    "final_return_sequences_false": lambda: _seq(
        L.LSTM(16, use_bias=False, return_sequences=True), L.GRU(8),
        L.Dense(3, activation="elu")),
    "activations": lambda: _seq(
        L.LSTM(12, recurrent_activation="hard_sigmoid", activation="softsign",
               return_sequences=True),
        L.Activation("selu"), L.Dense(6, activation="mish"), L.ReLU(max_value=1.0),
        L.LeakyReLU(), L.Dense(3, use_bias=False, activation="hard_silu"),
        L.LayerNormalization(center=False), L.BatchNormalization(scale=False)),
    "functional_linear": _functional,
}


def build(name: str, seed: int = 0) -> keras.Model:
    """The model ``name`` with every weight random (biases and norm statistics too)."""
    keras.utils.set_random_seed(seed)
    model = MODELS[name]()
    randomize(model, np.random.default_rng(seed))
    return model


def randomize(model: keras.Model, rng: np.random.Generator) -> None:
    weights = []
    for w, v in zip(model.get_weights(), model.weights, strict=True):
        if w.ndim >= 2:  # kernels: spectral radius below 1, so linear recurrences stay tame
            weights.append(rng.uniform(-1, 1, w.shape) / np.sqrt(w.shape[0]))
        elif "variance" in v.path:
            weights.append(rng.uniform(0.5, 1.5, w.shape))
        else:
            weights.append(rng.uniform(-0.5, 0.5, w.shape))
    model.set_weights([w.astype(np.float32) for w in weights])


def offline_model(model: keras.Model) -> keras.Model:
    """A twin of ``model`` (same weights) that computes the same outputs offline, fast:

    - a final RNN with return_sequences=False returns every step (the output at step t is
      the model's output for the sequence ending at t);
    - TimeDistributed(layer) is unwrapped to ``layer`` (the same on a time axis): Keras
      3.15's TimeDistributed returns one step when traced with a dynamic time axis, and
      the reference is traced once per model (Keras' eager recurrent loop is slow).

    :func:`test_twins_equal_their_model` checks both against the model itself.
    """
    last = [layer for layer in model.layers if isinstance(layer, L.RNN)][-1]
    if last.return_sequences and not any(isinstance(la, L.TimeDistributed)
                                         for la in model.layers):
        return model

    def clone(layer: L.Layer) -> L.Layer:
        if isinstance(layer, L.TimeDistributed):
            layer = layer.layer
        config = layer.get_config()
        if layer is last:
            config["return_sequences"] = True
        return type(layer).from_config(config)

    twin = keras.models.clone_model(model, clone_function=clone)
    twin.set_weights(model.get_weights())
    return twin


_COMPILED: dict[int, tuple[keras.Model, Callable]] = {}


def offline(model: keras.Model, seq: np.ndarray) -> np.ndarray:
    """``model`` applied once to the whole sequence, traced once per model."""
    if id(model) not in _COMPILED:
        spec = tf.TensorSpec((1, None, *model.inputs[0].shape[2:]), model.inputs[0].dtype)
        fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])
        _COMPILED[id(model)] = (model, fn)  # holds the model so its id stays unique
    return np.asarray(_COMPILED[id(model)][1](seq[None]))[0]


def random_seq(ex: OrtExecutor, steps: int, rng: np.random.Generator) -> np.ndarray:
    if ex.input_kind == "tokens":
        return rng.integers(0, ex.input_dim, size=steps).astype(np.int32)
    return rng.standard_normal((steps, ex.input_dim)).astype(np.float32)


class Stream:
    """One stream's plan and what it got back since its reference start."""

    def __init__(self, slot: int, seq: np.ndarray, prefix: np.ndarray):
        self.slot, self.seq, self.prefix = slot, seq, prefix
        self.pos = self.origin = 0
        self.outs: list[np.ndarray] = []

    def check(self, reference: keras.Model) -> None:
        """Outputs since the last reset == one offline call on the whole sequence."""
        if not self.outs:  # nothing streamed since the reset
            assert self.pos == self.origin
            return
        full = np.concatenate([self.prefix, self.seq[self.origin:self.pos]])
        expected = offline(reference, full)[len(self.prefix):]
        got = np.concatenate(self.outs)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= TOL

    def restart(self) -> None:
        self.origin, self.outs, self.prefix = self.pos, [], self.prefix[:0]


def run_round(ex: OrtExecutor, streams: list[Stream], rng: np.random.Generator) -> None:
    live = [s for s in streams if s.pos < len(s.seq)]
    group = rng.choice(len(live), size=rng.integers(1, len(live) + 1), replace=False)
    chunks = {}
    for i in group:
        s = live[i]
        n = int(rng.integers(1, min(40, len(s.seq) - s.pos) + 1))
        chunks[s.slot] = s.seq[s.pos:s.pos + n]
        s.pos += n
    bucket = 1 << (max(len(c) for c in chunks.values()) - 1).bit_length()
    out = ex.run(chunks, bucket)
    for i in group:
        s = live[i]
        assert out[s.slot].shape == (len(chunks[s.slot]), ex.output_dim)
        s.outs.append(out[s.slot])


def stream_and_check(ex: OrtExecutor, reference: keras.Model, seed: int) -> list[Stream]:
    """Streams in slots 0..2 (slot 3 gets a restored snapshot, the last slot stays idle)."""
    rng = np.random.default_rng(seed)
    streams = [Stream(slot, random_seq(ex, int(rng.integers(60, 100)), rng),
                      random_seq(ex, 0, rng)) for slot in range(3)]
    for round_ in range(1000):
        if all(s.pos == len(s.seq) for s in streams):
            break
        if round_ == 3:  # reset stream 0: check what it got, then start over
            streams[0].check(reference)
            ex.state.reset([streams[0].slot])
            streams[0].restart()
        if round_ == 5:  # stream 1's state continues in slot 3 with its own inputs
            src = streams[1]
            restored = Stream(3, random_seq(ex, 50, rng), np.concatenate(
                [src.prefix, src.seq[src.origin:src.pos]]))
            ex.state.restore(3, ex.state.snapshot(src.slot))
            streams.append(restored)
        run_round(ex, streams, rng)
    for s in streams:
        s.check(reference)
    return streams


@pytest.mark.parametrize("name", sorted(MODELS))
def test_streaming_equals_offline(name: str) -> None:
    model = build(name)
    ex = OrtExecutor(model, slots=5, threads=1)
    stream_and_check(ex, offline_model(model), seed=len(name))
    idle = ex.state.read([4])
    assert all(not r.any() for r in idle)  # never stepped, never written


@pytest.mark.parametrize("name", ["final_return_sequences_false", "gru_reset_after"])
def test_twins_equal_their_model(name: str) -> None:
    model = build(name)
    seq = np.random.default_rng(1).standard_normal((7, 5)).astype(np.float32)
    every_step = offline(offline_model(model), seq)
    for t in (1, 4, 7):  # the model itself, eagerly, on each prefix
        y = np.asarray(model(seq[None, :t], training=False))[0]
        expected = y if y.ndim == 1 else y[-1]
        assert np.abs(expected - every_step[t - 1]).max() <= TOL


def test_weights_swap_equals_offline_with_new_weights() -> None:
    model = build("stacked_dropout_batchnorm", seed=1)
    ex = OrtExecutor(model, slots=5, threads=1)
    stream_and_check(ex, model, seed=1)
    new = build("stacked_dropout_batchnorm", seed=2)
    ex.set_weights(new.get_weights())
    ex.state.reset(range(5))
    stream_and_check(ex, new, seed=2)
    ex.set_weights(ex.convert_weights(model.get_weights()))  # feeds: a pointer swap
    ex.state.reset(range(5))
    stream_and_check(ex, model, seed=3)


def test_per_step_weights_leave_the_current_ones() -> None:
    model, other = build("lstm", seed=1), build("lstm", seed=2)
    ex = OrtExecutor(model, slots=2, threads=1)
    x = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)
    pinned = ex.run({0: x}, 8, weights=ex.convert_weights(other.get_weights()))[0]
    current = ex.run({1: x}, 8)[1]
    assert np.abs(pinned - offline(other, x)).max() <= TOL
    assert np.abs(current - offline(model, x)).max() <= TOL


def test_idle_rows_are_untouched() -> None:
    model = build("stacked_cells")
    ex = OrtExecutor(model, slots=6, threads=1)
    rng = np.random.default_rng(0)
    before = [rng.standard_normal(a.shape).astype(np.float32) for a in ex.state.arrays]
    ex.state.write(range(6), before)
    ex.run({1: random_seq(ex, 3, rng), 4: random_seq(ex, 9, rng), 5: random_seq(ex, 0, rng)}, 16)
    after = ex.state.read(range(6))
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(a[[0, 2, 3, 5]], b[[0, 2, 3, 5]])
        assert not np.array_equal(a[[1, 4]], b[[1, 4]])


def test_state_layout_matches_keras_and_snapshots_cross_executors() -> None:
    from streamrnn.engine.state import StateBank
    from streamrnn.executors.keras_runner import ModelRunner
    from streamrnn.executors.models import build_serving_model

    model = build("stacked_cells")
    serving = build_serving_model(model, slots=2)
    bank = StateBank(serving.state_variables())
    ex = OrtExecutor(model, slots=2, threads=1)
    assert [r.shape for r in bank.initial_rows] == [r.shape for r in ex.state.initial_rows]
    rng = np.random.default_rng(0)
    seq = random_seq(ex, 30, rng)
    first = ModelRunner(serving, max_bucket=16, jit_compile=False).run({1: seq[:12]}, 16)[1]
    ex.state.restore(0, bank.snapshot(1))
    rest = ex.run({0: seq[12:]}, 32)[0]
    got = np.concatenate([first, rest])
    assert np.abs(got - offline(model, seq)).max() <= TOL


class MinimalCell(L.Layer):
    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.units = self.state_size = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units))

    def call(self, inputs, states):
        h = keras.ops.tanh(inputs @ self.kernel + states[0])
        return h, [h]


class MyLSTMCell(L.LSTMCell):
    pass


@pytest.mark.parametrize(("layers", "words"), [
    ([L.RNN(MinimalCell(4), return_sequences=True)], "custom cell MinimalCell"),
    ([L.RNN(MyLSTMCell(4), return_sequences=True)], "custom cell MyLSTMCell"),
    ([L.Masking(), L.LSTM(4, return_sequences=True)], "masking"),
    ([L.LSTM(4, return_sequences=True), L.Dense(2, activation="sparsemax")], "'sparsemax'"),
    ([L.LSTM(4, return_sequences=True, activation="selu")], "ONNX LSTM op"),
    ([L.GRU(4, return_sequences=True, dtype="float64")], "float32 only"),
    ([L.LSTM(4, return_sequences=True), L.ReLU(threshold=0.5)], "no ONNX equivalent"),
])
def test_unsupported_parts_say_why(layers: list[L.Layer], words: str) -> None:
    with pytest.raises(OnnxUnsupported) as info:
        build_onnx_graph(_seq(*layers))
    assert words in info.value.reason
    assert layers[-1].name in info.value.reason or layers[0].name in info.value.reason


def test_token_masking_says_why() -> None:
    model = _seq(L.Embedding(9, 4, mask_zero=True), L.GRU(4, return_sequences=True),
                 tokens=True)
    with pytest.raises(OnnxUnsupported, match="masking"):
        OrtExecutor(model, slots=2)


def test_models_that_cannot_stream_are_refused_like_keras() -> None:
    with pytest.raises(UnsupportedModelError, match="Bidirectional"):
        build_onnx_graph(_seq(L.Bidirectional(L.LSTM(4, return_sequences=True))))
    with pytest.raises(UnsupportedModelError, match="no recurrent layer"):
        build_onnx_graph(_seq(L.Dense(3)))


def test_executor_facts_and_warmup() -> None:
    ex = OrtExecutor(build("stacked_dropout_batchnorm"), slots=3, max_bucket=8)
    assert (ex.name, ex.device, ex.buckets) == ("onnxruntime", "CPU", [1, 2, 4, 8])
    assert ex.kernel.startswith("GRU+LSTM onnxruntime on CPU (")
    ex.warmup()
    assert all(not a.any() for a in ex.state.arrays)
    with pytest.raises(ValueError, match="bucket"):
        ex.run({0: np.zeros((9, 5), np.float32)}, 8)
    with pytest.raises(ValueError, match="weight arrays"):
        ex.set_weights([np.zeros(1)])


def test_host_state_bank_rows() -> None:
    bank = HostStateBank([np.zeros((4, 3), np.float32), np.zeros((4, 2), np.float32)])
    bank.write([1, 2], [np.ones((2, 3)), np.full((2, 2), 2.0)])
    snap = bank.snapshot(2)
    bank.reset([2])
    assert not bank.read([2])[0].any()
    bank.restore(3, snap)
    np.testing.assert_array_equal(bank.read([3])[1], [[2.0, 2.0]])
    assert bank.nbytes_per_slot == 20
    with pytest.raises(IndexError):
        bank.reset([4])
    with pytest.raises(ValueError, match="shape"):
        bank.write([0], [np.ones((2, 3)), np.ones((1, 2))])


def test_pad_chunks_right_pads_busy_slots_only() -> None:
    from streamrnn.executors.padding import pad_chunks

    batch = pad_chunks({4: np.ones((2, 3)), 1: np.zeros((0, 3)), 0: np.ones((5, 3))}, 8,
                       (3,), np.float32)
    assert (batch.slots, batch.lengths.tolist(), batch.x.shape, batch.idle) == (
        [4, 0], [2, 5], (2, 5, 3), [1])
    assert not batch.x[0, 2:].any() and batch.steps == 7
    out = batch.outputs(np.arange(20, dtype=np.float32).reshape(2, 5, 2), 2)
    assert {s: o.shape for s, o in out.items()} == {1: (0, 2), 4: (2, 2), 0: (5, 2)}
    with pytest.raises(ValueError, match="bucket"):
        pad_chunks({0: np.ones((9, 3))}, 8, (3,), np.float32)
