"""Bad input and unsupported models: clear errors, engine state unchanged."""

import keras
import numpy as np
import pytest

from streamrnn import (
    Engine,
    EngineFullError,
    InvalidInputError,
    UnknownStreamError,
    UnsupportedModelError,
)
from streamrnn.protocol import ErrorCode
from tests.helpers.modelzoo import ModelSpec, build_model, offline

TOL = 1e-5


@pytest.fixture(scope="module")
def dense():
    model = build_model(ModelSpec("gru", features=4))
    return model, Engine.from_keras(model, slots=2, max_bucket=8)


@pytest.fixture(scope="module")
def tokens():
    return Engine.from_keras(build_model(ModelSpec("lstm", tokens=True, features=6)), slots=2)


@pytest.mark.parametrize(
    "chunk, code",
    [
        (np.zeros((3,), np.float32), ErrorCode.BAD_SHAPE),
        (np.zeros((3, 5), np.float32), ErrorCode.BAD_SHAPE),
        (np.zeros((2, 3, 4), np.float32), ErrorCode.BAD_SHAPE),
        (np.zeros((3, 4), np.int64), ErrorCode.BAD_DTYPE),
        (np.zeros((3, 4), np.complex64), ErrorCode.BAD_DTYPE),
        (np.zeros((0, 4), np.float32), ErrorCode.EMPTY_CHUNK),
        (np.array([[0, 0, np.nan, 0]], np.float32), ErrorCode.NON_FINITE),
        (np.array([[0, np.inf, 0, 0]], np.float64), ErrorCode.NON_FINITE),
    ],
)
def test_bad_feature_chunks_raise_and_change_nothing(dense, chunk, code):
    model, engine = dense
    x = np.random.default_rng(0).standard_normal((12, 4)).astype(np.float32)
    if "good" in engine:
        engine.close("good")
    first = engine.push("good", x[:6])
    before = engine.snapshot("good")
    streams = engine.streams
    with pytest.raises(InvalidInputError) as info:
        engine.push_many({"good": x[6:], "bad": chunk})
    assert info.value.code == code
    assert engine.streams == streams  # "bad" was not opened
    for got, want in zip(engine.snapshot("good"), before, strict=True):
        np.testing.assert_array_equal(got, want)
    rest = engine.push("good", x[6:])
    np.testing.assert_allclose(np.concatenate([first, rest]), offline(model, x), atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "chunk, code",
    [
        (np.array([1, 6]), ErrorCode.BAD_VALUE),
        (np.array([-1, 2]), ErrorCode.BAD_VALUE),
        (np.array([[1, 2]]), ErrorCode.BAD_SHAPE),
        (np.array([1.0, 2.0]), ErrorCode.BAD_DTYPE),
    ],
)
def test_bad_token_chunks_raise(tokens, chunk, code):
    with pytest.raises(InvalidInputError) as info:
        tokens.push("t", chunk)
    assert info.value.code == code
    assert "t" not in tokens


def test_nonfinite_accepted_when_configured():
    engine = Engine.from_keras(build_model(ModelSpec("lstm", features=2)), slots=1,
                               allow_nonfinite=True)
    out = engine.push("a", np.array([[np.nan, 0.0]], np.float32))
    assert out.shape == (1, 3)


def test_full_engine_names_the_limit_and_opens_nothing(dense):
    _, engine = dense
    for s in engine.streams:
        engine.close(s)
    engine.push("a", np.zeros((1, 4), np.float32))
    with pytest.raises(EngineFullError, match="slots=2"):
        engine.push_many({"b": np.zeros((1, 4), np.float32), "c": np.zeros((1, 4), np.float32)})
    assert engine.streams == ["a"]


def test_unknown_stream_reset_and_close(dense):
    _, engine = dense
    with pytest.raises(UnknownStreamError, match="ghost"):
        engine.reset("ghost")
    with pytest.raises(UnknownStreamError, match="ghost"):
        engine.close("ghost")


@pytest.mark.parametrize(
    "layer, name",
    [
        (keras.layers.Bidirectional(keras.layers.LSTM(4, return_sequences=True), name="bi"), "bi"),
        (keras.layers.LSTM(4, go_backwards=True, return_sequences=True, name="back"), "back"),
        (keras.layers.Conv1D(4, 3, padding="same", name="conv"), "conv"),
        (keras.layers.GlobalAveragePooling1D(name="pool"), "pool"),
    ],
)
def test_layers_that_cannot_stream_are_refused_by_name(layer, name):
    model = keras.Sequential([keras.Input((None, 3)), layer, keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=name):
        Engine.from_keras(model, slots=2)


def test_attention_model_is_refused_by_name():
    inp = keras.Input((None, 4))
    h = keras.layers.LSTM(4, return_sequences=True)(inp)
    att = keras.layers.Attention(name="att")([h, h])
    with pytest.raises(UnsupportedModelError, match="att"):
        Engine.from_keras(keras.Model(inp, att), slots=2)


def test_model_without_rnn_is_refused():
    model = keras.Sequential([keras.Input((None, 3)), keras.layers.Dense(2)])
    with pytest.raises(UnsupportedModelError, match="no recurrent layer"):
        Engine.from_keras(model, slots=2)


def test_missing_model_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model file"):
        Engine.from_keras(tmp_path / "missing.keras", slots=2)
