"""The torch executor's contract: streaming equals one offline Keras call.

The same harness as the ONNX Runtime executor (tests/helpers/executor_contract.py): for each small
seeded model, several streams are fed random chunks (1..40 steps) in random groups, with a
reset in the middle and a snapshot restored into another slot; every stream's concatenated
outputs must equal the original model applied once to its whole sequence since its last
reset (max abs difference <= 1e-5). Skipped when torch is not installed.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from streamrnn.engine.interface import Executor, StateRows  # noqa: E402
from streamrnn.errors import UnsupportedModelError  # noqa: E402
from streamrnn.executors.torch_layers import ACTIVATION_FUNCTIONS  # noqa: E402
from streamrnn.executors.torch_rnn import (  # noqa: E402
    TorchExecutor,
    TorchStateBank,
    TorchUnsupported,
)
from streamrnn.executors.torch_spec import (  # noqa: E402
    ACTIVATIONS,
    LayerSpec,
    ModelSpec,
    spec_from_keras,
)
from tests.helpers.executor_contract import (  # noqa: E402
    MODELS,
    MinimalCell,
    MyLSTMCell,
    offline,
    offline_model,
    random_seq,
    randomize,
    stream_and_check,
)
from tests.helpers.executor_contract import seq_model as _seq  # noqa: E402

L = keras.layers
TOL = 1e-5

# the ONNX models torch maps too, and what it says about the others
SHARED = ["final_return_sequences_false", "gru_reset_after", "lstm", "rnn_lstm_cell",
          "simple_layernorm", "stacked_cells", "stacked_dropout_batchnorm", "tokens"]
REFUSED = {"gru_reset_before": "gru reset_after=False", "cell_list": "gru reset_after=False",
           "activations": "activation", "functional_linear": "activation"}
OWN: dict[str, Callable[[], keras.Model]] = {
    "relu_rnn_heads": lambda: _seq(
        L.SimpleRNN(12, activation="relu", return_sequences=True), L.ReLU(max_value=0.8),
        L.Dense(6, activation="hard_silu"), L.LeakyReLU(0.1), L.ELU(0.7),
        L.BatchNormalization(center=False), L.Dense(3, activation="softmax")),
    "no_bias_stack": lambda: _seq(
        L.LSTM(10, use_bias=False, return_sequences=True),
        L.GRU(7, use_bias=False, return_sequences=True), L.Dropout(0.5),
        L.TimeDistributed(L.Dense(4, use_bias=False)), L.LayerNormalization(scale=False)),
}


def build(name: str, seed: int = 0) -> keras.Model:
    """The model ``name`` (ONNX suite's or this one's) with every weight random."""
    keras.utils.set_random_seed(seed)
    model = (OWN.get(name) or MODELS[name])()
    randomize(model, np.random.default_rng(seed))
    return model


@pytest.fixture(autouse=True)
def _torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the executor sets it process-wide


@pytest.mark.parametrize("name", SHARED + sorted(OWN))
def test_streaming_equals_offline(name: str) -> None:
    model = build(name)
    ex = TorchExecutor.from_keras(model, slots=5, threads=1)
    stream_and_check(ex, offline_model(model), seed=len(name))
    assert all(not r.any() for r in ex.state.read([4]))  # never stepped, never written


@pytest.mark.parametrize("name", SHARED + sorted(OWN))
def test_spec_lists_the_keras_weights(name: str) -> None:
    model = build(name)
    spec, weights = spec_from_keras(model)
    assert spec.weight_shapes() == [w.shape for w in model.get_weights()]
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights(), strict=True))


def test_spec_path_needs_no_keras_and_matches() -> None:
    model = build("stacked_dropout_batchnorm")
    spec, _ = spec_from_keras(model)
    plain = ModelSpec(list(spec.layers), spec.input_kind, spec.input_dim)
    a = TorchExecutor(plain, model.get_weights(), slots=2, threads=1)
    b = TorchExecutor.from_keras(model, slots=2, threads=1)
    x = random_seq(a, 11, np.random.default_rng(0))
    np.testing.assert_array_equal(a.run({1: x}, 16)[1], b.run({1: x}, 16)[1])
    assert np.abs(a.run({0: x}, 16)[0] - offline(model, x)).max() <= TOL


def test_weights_swap_equals_offline_with_new_weights() -> None:
    model = build("stacked_cells", seed=1)
    ex = TorchExecutor.from_keras(model, slots=5, threads=1)
    stream_and_check(ex, model, seed=1)
    params = [id(p) for p in ex.chain.parameters()]
    new = build("stacked_cells", seed=2)
    ex.set_weights(new.get_weights())
    assert [id(p) for p in ex.chain.parameters()] == params  # copied in, not rebuilt
    ex.state.reset(range(5))
    stream_and_check(ex, new, seed=2)
    with pytest.raises(ValueError, match="weight arrays"):
        ex.set_weights(new.get_weights()[:-1])
    with pytest.raises(ValueError, match="shape"):
        ex.set_weights([w.T for w in new.get_weights()])


def test_per_step_weights_leave_the_current_ones() -> None:
    model, other = build("stacked_cells", seed=1), build("stacked_cells", seed=2)
    ex = TorchExecutor.from_keras(model, slots=2, threads=1)
    x = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)
    pinned = ex.run({0: x}, 8, weights=ex.convert_weights(other.get_weights()))[0]
    current = ex.run({1: x}, 8)[1]
    assert np.abs(pinned - offline(other, x)).max() <= TOL
    assert np.abs(current - offline(model, x)).max() <= TOL
    ex.set_weights(ex.convert_weights(other.get_weights()))  # converted once, copied in
    ex.state.reset([1])
    assert np.abs(ex.run({1: x}, 8)[1] - offline(other, x)).max() <= TOL


def test_idle_rows_are_untouched() -> None:
    ex = TorchExecutor.from_keras(build("stacked_dropout_batchnorm"), slots=6, threads=1)
    rng = np.random.default_rng(0)
    before = [rng.standard_normal(t.shape).astype(np.float32) for t in ex.state.tensors]
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
    ex = TorchExecutor.from_keras(model, slots=2, threads=1)
    assert [r.shape for r in bank.initial_rows] == [r.shape for r in ex.state.initial_rows]
    seq = random_seq(ex, 30, np.random.default_rng(0))
    first = ModelRunner(serving, max_bucket=16, jit_compile=False).run({1: seq[:12]}, 16)[1]
    ex.state.restore(0, bank.snapshot(1))
    middle = ex.run({0: seq[12:20]}, 8)[0]
    bank.restore(0, ex.state.snapshot(0))  # and back to Keras
    rest = ModelRunner(serving, max_bucket=16, jit_compile=False).run({0: seq[20:]}, 16)[0]
    got = np.concatenate([first, middle, rest])
    assert np.abs(got - offline(model, seq)).max() <= TOL


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_onnx_suite_models_torch_refuses(name: str) -> None:
    with pytest.raises(TorchUnsupported) as info:
        TorchExecutor.from_keras(build(name), slots=2)
    assert info.value.kind == REFUSED[name]


def _rms_norm() -> L.Layer:
    with warnings.catch_warnings():  # Keras deprecates rms_scaling
        warnings.simplefilter("ignore", UserWarning)
        return L.LayerNormalization(rms_scaling=True)


@pytest.mark.parametrize(("layers", "kind", "words"), [
    ([L.RNN(MinimalCell(4), return_sequences=True)], "custom cell", "MinimalCell"),
    ([L.RNN(MyLSTMCell(4), return_sequences=True)], "custom cell", "MyLSTMCell"),
    ([L.Masking(), L.LSTM(4, return_sequences=True)], "masking", "masking"),
    ([L.GRU(4, reset_after=False)], "gru reset_after=False", "reset_after=True"),
    ([L.LSTM(4, activation="relu")], "activation", "'relu'"),
    ([L.GRU(4, recurrent_activation="hard_sigmoid")], "activation", "'hard_sigmoid'"),
    ([L.SimpleRNN(4, activation="linear")], "activation", "'linear'"),
    ([L.LSTM(4, return_sequences=True), L.Dense(2, activation=lambda x: x)], "activation",
     "Dense"),
    ([L.LSTM(4, return_sequences=True), L.Dense(2, activation="sparsemax")], "activation",
     "'sparsemax'"),
    ([L.GRU(4, return_sequences=True, dtype="float64")], "dtype", "float32 only"),
    ([L.LSTM(4, return_sequences=True, dtype="mixed_float16")], "dtype", "mixed_float16"),
    ([L.LSTM(4, return_sequences=True), L.ReLU(threshold=0.5)], "layer", "threshold"),
    ([L.LSTM(4, return_sequences=True), _rms_norm()], "layer", "rms_scaling"),
    ([L.LSTM(4, return_sequences=True), L.EinsumDense("btd,de->bte", (None, 3))], "layer",
     "EinsumDense"),
])
@pytest.mark.filterwarnings("ignore::UserWarning")  # Keras: "serializing a lambda"
def test_unsupported_parts_say_why(layers: list[L.Layer], kind: str, words: str) -> None:
    with pytest.raises(TorchUnsupported) as info:
        spec_from_keras(_seq(*layers))
    assert info.value.kind == kind
    assert words in info.value.reason
    assert any(layer.name in info.value.reason for layer in layers)


def test_token_masking_says_why() -> None:
    model = _seq(L.Embedding(9, 4, mask_zero=True), L.GRU(4, return_sequences=True),
                 tokens=True)
    with pytest.raises(TorchUnsupported, match="masking") as info:
        TorchExecutor.from_keras(model, slots=2)
    assert info.value.kind == "masking"


def test_models_that_cannot_stream_are_refused_like_keras() -> None:
    with pytest.raises(UnsupportedModelError, match="Bidirectional"):
        spec_from_keras(_seq(L.Bidirectional(L.LSTM(4, return_sequences=True))))
    with pytest.raises(UnsupportedModelError, match="no recurrent layer"):
        spec_from_keras(_seq(L.Dense(3)))


def test_activation_functions_equal_keras() -> None:
    assert set(ACTIVATION_FUNCTIONS) == ACTIVATIONS
    x = np.random.default_rng(0).uniform(-4, 4, (7, 9)).astype(np.float32)
    for name in sorted(ACTIVATIONS):
        want = np.asarray(keras.activations.get(name)(x))
        got = ACTIVATION_FUNCTIONS[name](torch.from_numpy(x), None).numpy()
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6, err_msg=name)


def test_executor_facts_and_warmup() -> None:
    ex = TorchExecutor.from_keras(build("stacked_dropout_batchnorm"), slots=3, max_bucket=8,
                                  threads=1)
    assert (ex.name, ex.device, ex.buckets, ex.trace_count) == ("torch", "CPU", [1, 2, 4, 8], 0)
    assert ex.kernel == "GRU+LSTM torch on CPU (1 threads)"
    assert isinstance(ex, Executor) and isinstance(ex.state, StateRows)
    assert torch.get_num_threads() == 1
    ex.warmup()
    assert all(not t.any() for t in ex.state.tensors)
    with pytest.raises(ValueError, match="bucket"):
        ex.run({0: np.zeros((9, 5), np.float32)}, 8)
    out = ex.run({0: np.zeros((0, 5), np.float32)}, 8)
    assert out[0].shape == (0, 3) and ex.steps_run == 0
    ex.run({0: np.ones((3, 5), np.float32), 2: np.ones((5, 5), np.float32)}, 8)
    assert (ex.steps_run, ex.timesteps_run) == (1, 8)


def test_state_bank_rows_behave_like_the_host_bank() -> None:
    from streamrnn.executors.ort import HostStateBank

    rng = np.random.default_rng(0)
    ours = TorchStateBank([3, 2], slots=5)
    host = HostStateBank([np.zeros((5, 3), np.float32), np.zeros((5, 2), np.float32)])
    for _ in range(20):  # the same random writes, resets, snapshots and restores on both
        slots = rng.choice(5, size=int(rng.integers(1, 4)), replace=False).tolist()
        op = rng.integers(3)
        if op == 0:
            rows = [rng.standard_normal((len(slots), n)) for n in (3, 2)]
            ours.write(slots, rows)
            host.write(slots, rows)
        elif op == 1:
            ours.reset(slots)
            host.reset(slots)
        else:
            ours.restore(slots[-1], ours.snapshot(slots[0]))
            host.restore(slots[-1], host.snapshot(slots[0]))
        for a, b in zip(ours.read(range(5)), host.read(range(5)), strict=True):
            np.testing.assert_array_equal(a, b)
    assert ours.nbytes_per_slot == host.nbytes_per_slot == 20
    with pytest.raises(IndexError):
        ours.reset([5])
    with pytest.raises(ValueError, match="shape"):
        ours.write([0], [np.ones((2, 3)), np.ones((1, 2))])


def test_spec_checks_itself() -> None:
    lstm = LayerSpec("lstm", units=4)
    assert ModelSpec([lstm, LayerSpec("dense", units=2)], "features", 3).weight_shapes() == [
        (3, 16), (4, 16), (16,), (4, 2), (2,)]
    with pytest.raises(ValueError, match="no recurrent layer"):
        ModelSpec([LayerSpec("dense", units=2)], "features", 3)
    with pytest.raises(ValueError, match="embedding"):
        ModelSpec([lstm], "tokens", 3)
    with pytest.raises(ValueError, match="activation"):
        ModelSpec([lstm, LayerSpec("activation", activation="swishy")], "features", 3)


def test_import_loads_no_tensorflow_and_makes_openmp_passive() -> None:
    code = ("import os, sys; import streamrnn.executors.torch_rnn; "
            "print('tensorflow' in sys.modules, 'keras' in sys.modules, "
            "os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout.split()
    assert out == ["False", "False", "PASSIVE"]  # an OMP_WAIT_POLICY already set is kept


def test_gpu_bench_script_dry_runs_on_the_cpu(tmp_path, monkeypatch) -> None:
    """bench/gpu_torch.py's GPU path (cudnn on/off, compared with a third executor), on
    the CPU with a tiny config, so the script cannot rot between GPU loans."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    script = runpy.run_path(str(Path(__file__).resolve().parents[2] / "bench" / "gpu_torch.py"))
    out = tmp_path / "result.json"
    script["main"](["--device", "cpu:0", "--slots", "4", "--chunks", "2", "4", "--busy", "1",
                    "4", "--units", "8", "--features", "3", "--out-dim", "2", "--seconds",
                    "0.01", "--rounds", "2", "--diff-steps", "3", "--out", str(out)])
    result = json.loads(out.read_text())
    assert len(result["summary"]) == 8 and len(result["records"]) == 16
    assert result["max_abs_diff"]["cudnn_vs_no_cudnn"] == {"outputs": 0.0, "states": 0.0}
    assert result["meta"]["kernels"]["cudnn"].startswith("LSTM torch on CPU (")

