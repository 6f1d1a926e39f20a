"""The executor contract harness: streaming equals one offline Keras call.

Shared by every executor's tests (tests/executors/test_executor_ort.py,
tests/executors/test_executor_torch.py).
An executor here is anything with ``run({slot: chunk}, bucket) -> {slot: (t, out)}``, a
``state`` (StateRows: reset/read/write/snapshot/restore, ``slots``, ``initial_rows``) and
``input_kind`` / ``input_dim`` / ``output_dim``.

:func:`stream_and_check` feeds several streams random chunks (1..40 steps) in random groups,
with a reset in the middle and a snapshot restored into another slot, and checks every
stream's concatenated outputs against the model applied once to its whole sequence since
its last reset (max abs difference <= 1e-5). :data:`MODELS` are small seeded models
covering the layers the executors map (:func:`build` randomizes every weight).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from streamrnn.errors import UnsupportedModelError

L = keras.layers
TOL = 1e-5


def seq_model(*layers: L.Layer, tokens: bool = False) -> keras.Model:
    """``Sequential([Input, *layers])`` over ``(T, 5)`` features or ``(T,)`` token ids."""
    inp = keras.Input((None,), dtype="int32") if tokens else keras.Input((None, 5))
    return keras.Sequential([inp, *layers])


def _functional() -> keras.Model:
    inp = keras.Input((None, 5))
    h = L.SimpleRNN(10, activation="linear", return_sequences=True)(inp)
    h = L.Dense(4)(h)
    return keras.Model(inp, L.Softmax()(h))


MODELS: dict[str, Callable[[], keras.Model]] = {
    "lstm": lambda: seq_model(L.LSTM(16, return_sequences=True), L.Dense(3)),
    "gru_reset_after": lambda: seq_model(
        L.GRU(16, return_sequences=True), L.TimeDistributed(L.Dense(4, activation="tanh"))),
    "gru_reset_before": lambda: seq_model(
        L.GRU(12, reset_after=False, return_sequences=True), L.Dense(3, activation="softmax")),
    "simple_layernorm": lambda: seq_model(
        L.SimpleRNN(16, return_sequences=True), L.LayerNormalization(),
        L.Dense(3, activation="relu")),
    "stacked_dropout_batchnorm": lambda: seq_model(
        L.LSTM(16, return_sequences=True), L.Dropout(0.3), L.GRU(8, return_sequences=True),
        L.BatchNormalization(), L.Dense(3)),
    "rnn_lstm_cell": lambda: seq_model(
        L.RNN(L.LSTMCell(16), return_sequences=True), L.Dense(2, activation="sigmoid")),
    "stacked_cells": lambda: seq_model(
        L.RNN(L.StackedRNNCells([L.LSTMCell(8), L.GRUCell(12)]), return_sequences=True),
        L.Dense(3, activation="gelu")),
    "cell_list": lambda: seq_model(
        L.RNN([L.SimpleRNNCell(8, use_bias=False), L.GRUCell(8, reset_after=False)],
              return_sequences=True),
        L.Dense(3, activation="silu")),
    "tokens": lambda: seq_model(
        L.Embedding(20, 6), L.LSTM(16, return_sequences=True),
        L.Dense(20, activation="log_softmax"), tokens=True),
    "final_return_sequences_false": lambda: seq_model(
        L.LSTM(16, use_bias=False, return_sequences=True), L.GRU(8),
        L.Dense(3, activation="elu")),
    "activations": lambda: seq_model(
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

    ``test_twins_equal_their_model`` (tests/executors/test_executor_ort.py) checks both against the
    model itself.
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


def random_seq(ex: Any, steps: int, rng: np.random.Generator) -> np.ndarray:
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


def run_round(ex: Any, streams: list[Stream], rng: np.random.Generator) -> None:
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


def stream_and_check(ex: Any, reference: keras.Model, seed: int) -> list[Stream]:
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


def check_idle_rows_untouched(ex: Any) -> None:
    """A run over slots 1 and 4 (and an empty chunk for 5) leaves every other row as it
    was, bit for bit (``ex`` needs 6 slots)."""
    rng = np.random.default_rng(0)
    before = [rng.standard_normal((ex.state.slots, *r.shape)).astype(np.float32)
              for r in ex.state.initial_rows]
    ex.state.write(range(ex.state.slots), before)
    ex.run({1: random_seq(ex, 3, rng), 4: random_seq(ex, 9, rng), 5: random_seq(ex, 0, rng)}, 16)
    after = ex.state.read(range(ex.state.slots))
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(a[[0, 2, 3, 5]], b[[0, 2, 3, 5]])
        assert not np.array_equal(a[[1, 4]], b[[1, 4]])


def check_snapshot_from_keras(model: keras.Model, make: Callable[[keras.Model, int], Any]
                              ) -> None:
    """The executor ``make(model, slots)`` has the Keras serving clone's state layout, and
    a stream started on the Keras executor continues on it from a snapshot."""
    from streamrnn.engine.state import StateBank
    from streamrnn.executors.keras_runner import ModelRunner
    from streamrnn.executors.models import build_serving_model

    serving = build_serving_model(model, slots=2)
    bank = StateBank(serving.state_variables())
    ex = make(model, 2)
    assert [r.shape for r in bank.initial_rows] == [r.shape for r in ex.state.initial_rows]
    seq = random_seq(ex, 30, np.random.default_rng(0))
    first = ModelRunner(serving, max_bucket=16, jit_compile=False).run({1: seq[:12]}, 16)[1]
    ex.state.restore(0, bank.snapshot(1))
    rest = ex.run({0: seq[12:]}, 32)[0]
    got = np.concatenate([first, rest])
    assert np.abs(got - offline(model, seq)).max() <= TOL

def check_refusals(convert: Callable[[keras.Model], Any], unsupported: type[Exception]
                   ) -> None:
    """``convert(model)`` refuses token masking with ``unsupported`` (kind ``"masking"``:
    the caller falls back to Keras) and models that cannot stream at all with
    UnsupportedModelError, like the Keras serving clone."""
    model = seq_model(L.Embedding(9, 4, mask_zero=True), L.GRU(4, return_sequences=True),
                      tokens=True)
    with pytest.raises(unsupported, match="masking") as info:
        convert(model)
    assert info.value.kind == "masking"
    with pytest.raises(UnsupportedModelError, match="Bidirectional"):
        convert(seq_model(L.Bidirectional(L.LSTM(4, return_sequences=True))))
    with pytest.raises(UnsupportedModelError, match="no recurrent layer"):
        convert(seq_model(L.Dense(3)))

# Custom cells (no ONNX / torch equivalent): one from scratch, one subclassing LSTMCell
# (a subclass may override call(), so only the exact standard cell types map).
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
