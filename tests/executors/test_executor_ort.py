"""The ONNX Runtime executor's contract: streaming equals one offline Keras call.

For each small seeded model, several streams are fed random chunks (1..40 steps) in random
groups, with a reset in the middle and a snapshot restored into another slot; every
stream's concatenated outputs must equal the original model applied once to its whole
sequence since its last reset (max abs difference <= 1e-5).
"""

from __future__ import annotations

import numpy as np
import pytest

from streamrnn.executors.onnx_graph import OnnxUnsupported, build_onnx_graph
from streamrnn.executors.ort import HostStateBank, OrtExecutor
from tests.helpers.executor_contract import (
    MODELS,
    TOL,
    L,
    MinimalCell,
    MyLSTMCell,
    build,
    check_idle_rows_untouched,
    check_refusals,
    check_snapshot_from_keras,
    offline,
    offline_model,
    stream_and_check,
)
from tests.helpers.executor_contract import seq_model as _seq


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


@pytest.mark.parametrize("bake", [True, False], ids=["baked", "inputs"])
def test_weights_swap_equals_offline_with_new_weights(bake: bool) -> None:
    model = build("stacked_dropout_batchnorm", seed=1)
    ex = OrtExecutor(model, slots=5, threads=1, bake_weights=bake)
    first = ex.weights
    new = build("stacked_dropout_batchnorm", seed=2)
    ex.set_weights(new.get_weights())
    stream_and_check(ex, new, seed=2)
    ex.set_weights(first)  # a converted version: a pointer swap
    ex.state.reset(range(5))
    stream_and_check(ex, model, seed=3)
    other = ex.convert_weights(new.get_weights())
    assert (other.session is first.session) is not bake  # fed as inputs: one session


def test_weights_as_inputs_stream_the_same() -> None:
    model = build("tokens")
    stream_and_check(OrtExecutor(model, slots=5, threads=1, bake_weights=False), model, seed=4)


def test_per_step_weights_leave_the_current_ones() -> None:
    model, other = build("lstm", seed=1), build("lstm", seed=2)
    ex = OrtExecutor(model, slots=2, threads=1)
    x = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)
    pinned = ex.run({0: x}, 8, weights=ex.convert_weights(other.get_weights()))[0]
    current = ex.run({1: x}, 8)[1]
    assert np.abs(pinned - offline(other, x)).max() <= TOL
    assert np.abs(current - offline(model, x)).max() <= TOL


def test_idle_rows_are_untouched() -> None:
    check_idle_rows_untouched(OrtExecutor(build("stacked_cells"), slots=6, threads=1))


def test_state_layout_matches_keras_and_snapshots_cross_executors() -> None:
    check_snapshot_from_keras(build("stacked_cells"),
                              lambda model, slots: OrtExecutor(model, slots, threads=1))


@pytest.mark.parametrize(("layers", "kind", "words"), [
    ([L.RNN(MinimalCell(4), return_sequences=True)], "custom cell", "custom cell MinimalCell"),
    ([L.RNN(MyLSTMCell(4), return_sequences=True)], "custom cell", "custom cell MyLSTMCell"),
    ([L.Masking(), L.LSTM(4, return_sequences=True)], "masking", "masking"),
    ([L.LSTM(4, return_sequences=True), L.Dense(2, activation="sparsemax")], "activation",
     "'sparsemax'"),
    ([L.LSTM(4, return_sequences=True, activation="selu")], "activation", "ONNX LSTM op"),
    ([L.GRU(4, return_sequences=True, dtype="float64")], "dtype", "float32 only"),
    ([L.LSTM(4, return_sequences=True), L.ReLU(threshold=0.5)], "layer", "no ONNX equivalent"),
])
def test_unsupported_parts_say_why(layers: list[L.Layer], kind: str, words: str) -> None:
    with pytest.raises(OnnxUnsupported) as info:
        build_onnx_graph(_seq(*layers))
    assert info.value.kind == kind
    assert words in info.value.reason
    assert layers[-1].name in info.value.reason or layers[0].name in info.value.reason


def test_masking_and_models_that_cannot_stream_are_refused() -> None:
    check_refusals(lambda model: OrtExecutor(model, slots=2), OnnxUnsupported)


def test_executor_facts_and_warmup() -> None:
    from streamrnn.engine.interface import Executor, StateRows

    ex = OrtExecutor(build("stacked_dropout_batchnorm"), slots=3, max_bucket=8)
    assert isinstance(ex, Executor) and isinstance(ex.state, StateRows)
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
    assert not batch.x[0, 2:].any() and batch.x[0, :2].all() and batch.steps == 7
    y = np.arange(20, dtype=np.float32).reshape(2, 5, 2)
    out = batch.outputs(y, 2)
    assert {s: o.shape for s, o in out.items()} == {1: (0, 2), 4: (2, 2), 0: (5, 2)}
    assert (out[4] == y[0, :2]).all() and (out[0] == y[1]).all()
    with pytest.raises(ValueError, match="bucket"):
        pad_chunks({0: np.ones((9, 3))}, 8, (3,), np.float32)


@pytest.mark.parametrize("full", [True, False])
def test_pad_chunks_time_major(full: bool) -> None:
    from streamrnn.executors.padding import pad_chunks

    rng = np.random.default_rng(0)
    chunks = {5: rng.standard_normal((4, 3)), 2: rng.standard_normal((4 if full else 1, 3)),
              7: np.zeros((0, 3))}
    tm = pad_chunks(chunks, 8, (3,), np.float32, time_major=True)
    bm = pad_chunks(chunks, 8, (3,), np.float32)
    assert tm.slots == bm.slots == [5, 2] and tm.idle == [7]
    np.testing.assert_array_equal(tm.x, bm.x.transpose(1, 0, 2))
    y = rng.standard_normal((2, 4, 6)).astype(np.float32)
    a, b = tm.outputs(y.transpose(1, 0, 2), 6), bm.outputs(y, 6)
    assert a.keys() == b.keys() and all(np.array_equal(a[s], b[s]) for s in a)
    assert all(o.flags.c_contiguous and not np.shares_memory(o, y) for o in a.values())


@pytest.mark.parametrize("name", ["lstm", "tokens"])
def test_run_rows_equals_run_and_touches_only_its_rows(name: str) -> None:
    model = build(name, seed=7)
    rows, twin = OrtExecutor(model, slots=5, threads=1), OrtExecutor(model, slots=5, threads=1)
    rng = np.random.default_rng(7)
    tokens = rows.input_kind == "tokens"
    for steps in (1, 3, 1):
        x = (rng.integers(0, 9, (2, steps)).astype(np.int32) if tokens
             else rng.standard_normal((2, steps, 5)).astype(np.float32))
        y = rows.run_rows([4, 1], x)
        out = twin.run({4: x[0], 1: x[1]}, 4)
        assert y.shape == (2, steps, rows.output_dim)
        np.testing.assert_allclose(y[0], out[4], atol=TOL, rtol=0)
        np.testing.assert_allclose(y[1], out[1], atol=TOL, rtol=0)
    for a, b in zip(rows.state.read(range(5)), twin.state.read(range(5)), strict=True):
        np.testing.assert_allclose(a, b, atol=TOL, rtol=0)
    assert not any(a[[0, 2, 3]].any() for a in rows.state.read(range(5)))  # untouched rows
