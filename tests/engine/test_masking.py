"""Masking models (``Embedding(mask_zero=True)``, ``Masking``) stream like one offline call.

Built with the functional API (Keras 3 passes the mask to the next layers as a second input
node) or as ``keras.Sequential``; chunks that start on a masked step, a stream whose first
steps are masked, a final ``return_sequences=False`` layer, a layer that drops the mask
(``EinsumDense``), ``zero_output_for_mask=True``; the Keras executor fused and unfused. ONNX
Runtime and torch refuse masking in both forms with the same reason (``auto`` falls back to
Keras). Each stream's outputs are compared with one offline Keras call (max abs <= 1e-5).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from streamrnn import Engine
from streamrnn.errors import UnsupportedModelError
from tests.helpers.engines import engine_on
from tests.helpers.modelzoo import offline

TOL = 1e-5
L = keras.layers
# Token ids with masked (0) steps at the start, inside and at the end of chunks.
IDS = np.array([0, 0, 3, 1, 0, 0, 5, 9, 0, 2, 2, 7, 0, 0, 4, 0], dtype=np.int32)
CHUNKS = [2, 3, 1, 3, 2, 3, 2]  # boundaries at 2, 5, 6, 9, 11, 14: several start masked


def _functional(tokens: bool, *layers: keras.layers.Layer) -> keras.Model:
    inp = keras.Input((None,), dtype="int32") if tokens else keras.Input((None, 3))
    h = inp
    for layer in layers:
        h = layer(h)
    return keras.Model(inp, h)


def _sequential(tokens: bool, *layers: keras.layers.Layer) -> keras.Model:
    inp = keras.Input((None,), dtype="int32") if tokens else keras.Input((None, 3))
    return keras.Sequential([inp, *layers])


def _layers(kind: str) -> tuple[bool, list[keras.layers.Layer]]:
    keras.utils.set_random_seed(3)
    if kind == "tokens-gru":
        return True, [L.Embedding(10, 4, mask_zero=True), L.GRU(5, return_sequences=True),
                      L.Dense(2)]
    if kind == "tokens-last-state":  # a final return_sequences=False layer
        return True, [L.Embedding(10, 4, mask_zero=True), L.LSTM(5, return_sequences=True),
                      L.Dense(3), L.SimpleRNN(4)]
    if kind == "features-lstm":
        return False, [L.Masking(0.0), L.LSTM(5, return_sequences=True), L.Dense(2)]
    raise ValueError(kind)


def _features(ids: np.ndarray) -> np.ndarray:
    """Float steps with the same masked positions as ``ids`` (all-zero rows)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((len(ids), 3)).astype(np.float32)
    x[ids == 0] = 0.0
    return x


def _stream(engine: Engine, seq: np.ndarray, stream: str = "s") -> np.ndarray:
    out, start = [], 0
    for n in CHUNKS:
        out.append(engine.push(stream, seq[start:start + n]))
        start += n
    assert start == len(seq)
    return np.concatenate(out)


def _expected(model: keras.Model, seq: np.ndarray) -> np.ndarray:
    """One offline call; for a final ``return_sequences=False`` layer one call per prefix
    (traced once for any length)."""
    if not (isinstance(model.layers[-1], L.RNN) and not model.layers[-1].return_sequences):
        return offline(model, seq)
    spec = tf.TensorSpec((1, None, *seq.shape[1:]), tf.as_dtype(seq.dtype))
    call = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    return np.stack([call(seq[None, : t + 1]).numpy()[0] for t in range(len(seq))])


def _check(kind: str, form: str, fused: bool) -> None:
    tokens, layers = _layers(kind)
    model = (_functional if form == "functional" else _sequential)(tokens, *layers)
    seq = IDS if tokens else _features(IDS)
    engine = Engine.from_keras(model, slots=3, jit_compile=False, max_bucket=4, fused=fused)
    assert engine.executor.name == "keras"  # auto: ONNX Runtime cannot mask
    other = seq[::-1].copy()  # interleaved with a second stream
    engine.push("o", other[:5])
    got = _stream(engine, seq)
    np.testing.assert_allclose(got, _expected(model, seq), atol=TOL, rtol=0)
    rest = engine.push("o", other[5:])
    np.testing.assert_allclose(rest, _expected(model, other)[5:], atol=TOL, rtol=0)


# The default suite: each form, each kind, fused (the CPU default) and unfused (GPU default).
@pytest.mark.parametrize(("kind", "form", "fused"), [
    ("tokens-gru", "functional", True),
    ("features-lstm", "functional", False),
    ("tokens-last-state", "functional", True),
    ("tokens-last-state", "sequential", False),
])
def test_masking_models_stream_like_offline_with_chunks_starting_on_masked_steps(
        kind: str, form: str, fused: bool) -> None:
    _check(kind, form, fused)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tokens-gru", "tokens-last-state", "features-lstm"])
@pytest.mark.parametrize("form", ["functional", "sequential"])
@pytest.mark.parametrize("fused", [True, False])
def test_every_masking_model_form_and_path_streams_like_offline(
        kind: str, form: str, fused: bool) -> None:
    _check(kind, form, fused)


@pytest.mark.parametrize("executor", ["onnxruntime", "torch"])
@pytest.mark.parametrize("form", ["functional", "sequential"])
def test_onnxruntime_and_torch_refuse_masking_the_same_way_in_both_forms(
        executor: str, form: str) -> None:
    tokens, layers = _layers("tokens-gru")
    model = (_functional if form == "functional" else _sequential)(tokens, *layers)
    with pytest.raises(UnsupportedModelError, match=f"executor='{executor}'.*masking"):
        engine_on(executor, model, slots=2)


@pytest.mark.filterwarnings("ignore:.*does not support masking")
def test_a_layer_that_drops_the_mask_drops_it_for_the_next_recurrent_layer_too() -> None:
    # Keras 3: EinsumDense does not support masking, so the LSTM after it sees no mask.
    keras.utils.set_random_seed(4)
    for build, fused in ((_functional, True), (_sequential, False)):
        model = build(True, L.Embedding(10, 4, mask_zero=True),
                      L.EinsumDense("btd,de->bte", (None, 4)), L.LSTM(5, return_sequences=True))
        engine = Engine.from_keras(model, slots=2, jit_compile=False, max_bucket=4, fused=fused)
        np.testing.assert_allclose(_stream(engine, IDS), offline(model, IDS), atol=TOL, rtol=0)


def test_zero_output_for_mask_gives_zeros_on_masked_steps_as_keras_does() -> None:
    keras.utils.set_random_seed(5)
    model = _functional(True, L.Embedding(10, 4, mask_zero=True),
                        L.GRU(5, return_sequences=True, zero_output_for_mask=True))
    for fused in (True, False):
        engine = Engine.from_keras(model, slots=2, jit_compile=False, max_bucket=4,
                                   fused=fused)
        got = _stream(engine, IDS)
        np.testing.assert_allclose(got, offline(model, IDS), atol=TOL, rtol=0)
        assert not got[IDS == 0].any()


def test_an_explicit_mask_from_another_tensor_is_still_refused() -> None:
    inp = keras.Input((None, 3))
    flags = keras.layers.Lambda(lambda x: keras.ops.any(x > 0.5, axis=-1))(inp)
    out = L.LSTM(4, return_sequences=True)(inp, mask=flags)
    with pytest.raises(UnsupportedModelError, match="several inputs"):
        Engine.from_keras(keras.Model(inp, out), slots=2)
