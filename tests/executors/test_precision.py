"""Reduced precision (``TorchExecutor(..., precision="bf16")``): where it is allowed, the
refusal elsewhere, and its tolerance contract.

The contract: streamed bf16 == one offline float32 Keras call within
``BF16_TOLERANCE`` (``|got - want| <= atol + rtol * |want|``), under the shared harness'
random chunking, reset and snapshot restore (tests/helpers/executor_contract.py), and the
error does not grow over a 2,000-step stream. It runs on the real bf16 path where the host
has AMX / AVX512-BF16; elsewhere (this AVX2 CI machine) the ``bf16`` fixture lifts the
refusal, a test-only override: torch computes bf16 on any CPU, by emulation (slowly).
Measured here (AMD EPYC, AVX2, torch 2.13, emulated): max abs 0.0008..0.0040 on the shared
models, 0.022 on ``no_bias_stack`` (LayerNormalization over 4 features of spread ~0.004
multiplies the Dense output's bf16 rounding by 1/std).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from streamrnn.errors import NotSupportedError
from streamrnn.executors.precision import (
    BF16_TOLERANCE,
    PrecisionUnsupported,
    bf16_missing,
    cpu_flags,
)
from tests.helpers import executor_contract
from tests.helpers.executor_contract import build, offline, random_seq, seq_model

L = keras.layers
CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16
bugs\t\t: sysret_ss_attrs
"""
#: the ONNX suite's models torch maps (the worst case, no_bias_stack, is built below)
SHARED = ["final_return_sequences_false", "gru_reset_after", "lstm", "rnn_lstm_cell",
          "simple_layernorm", "stacked_cells", "stacked_dropout_batchnorm", "tokens"]


def test_cpu_flags_reads_the_flags_line() -> None:
    assert cpu_flags(CPUINFO) == {"fpu", "sse2", "avx2", "fma", "avx512f", "avx512_bf16"}
    assert cpu_flags("processor\t: 0\n") == frozenset()


@pytest.mark.parametrize(("device", "flags", "cuda", "missing"), [
    ("cpu", {"avx2", "amx_tile", "amx_bf16"}, False, None),
    ("cpu", {"avx512f", "avx512_bf16"}, False, None),
    ("cpu", {"avx2", "fma"}, False, "AMX or AVX512-BF16"),
    ("cpu", {"avx512f", "avx512bw"}, True, "AMX or AVX512-BF16"),  # emulated on AVX512 too
    ("cuda", set(), True, None),
    ("cuda", {"amx_bf16"}, False, "CUDA device with bf16 support"),
    ("mps", {"amx_bf16"}, True, "a CPU or CUDA device"),
])
def test_bf16_missing_names_what_is_missing(device: str, flags: set[str], cuda: bool,
                                            missing: str | None) -> None:
    got = bf16_missing(device, flags, cuda)
    assert got is None if missing is None else missing in got


torch = pytest.importorskip("torch")

from streamrnn.executors import torch_rnn  # noqa: E402
from streamrnn.executors.torch_rnn import TorchExecutor, TorchUnsupported  # noqa: E402


def _host_missing() -> str | None:
    return bf16_missing("cpu", *torch_rnn.host_bf16_facts(torch.device("cpu")))


@pytest.fixture(autouse=True)
def _torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the executor sets it process-wide


@pytest.fixture
def bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """``precision="bf16"`` runs: for real where the host does bf16 fast, else by the
    test-only override (torch emulates bf16 on this CPU)."""
    if _host_missing():
        monkeypatch.setattr(torch_rnn, "bf16_missing", lambda *facts: None)


@pytest.mark.skipif(not _host_missing(), reason="this CPU has AMX or AVX512-BF16")
def test_bf16_is_refused_on_a_cpu_without_amx_or_avx512_bf16() -> None:
    model = build("lstm")
    with pytest.raises(PrecisionUnsupported) as info:
        TorchExecutor.from_keras(model, slots=2, threads=1, precision="bf16")
    err = info.value
    assert (err.kind, err.precision, err.device) == ("precision", "bf16", "cpu")
    assert "AMX or AVX512-BF16" in str(err) and "amx_bf16 or avx512_bf16" in err.missing
    assert "precision='float32'" in str(err)
    # explicit: not a TorchUnsupported, which a caller may answer by falling back to Keras
    assert isinstance(err, NotSupportedError) and not isinstance(err, TorchUnsupported)


def test_unknown_precision_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        TorchExecutor.from_keras(build("lstm"), slots=2, threads=1, precision="fp16")


def _check_within_bf16_tolerance(self: executor_contract.Stream, reference: keras.Model
                                 ) -> None:
    """Stream.check with the bf16 tolerance (the harness' chunking, resets, restores)."""
    if self.outs:
        full = np.concatenate([self.prefix, self.seq[self.origin:self.pos]])
        want = offline(reference, full)[len(self.prefix):]
        np.testing.assert_allclose(np.concatenate(self.outs), want, **BF16_TOLERANCE)


def _no_bias_stack() -> keras.Model:
    """The worst case measured: LayerNormalization over 4 features of tiny spread."""
    keras.utils.set_random_seed(0)
    model = seq_model(L.LSTM(10, use_bias=False, return_sequences=True),
                      L.GRU(7, use_bias=False, return_sequences=True),
                      L.Dense(4, use_bias=False), L.LayerNormalization(scale=False))
    executor_contract.randomize(model, np.random.default_rng(0))
    return model


@pytest.mark.parametrize("name", [*SHARED, "no_bias_stack"])
def test_bf16_streaming_equals_offline_within_tolerance(name: str, bf16: None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    model = _no_bias_stack() if name == "no_bias_stack" else build(name)
    ex = TorchExecutor.from_keras(model, slots=5, threads=1, precision="bf16")
    assert ex.kernel.endswith(", bf16)") and ex.precision == "bf16"
    monkeypatch.setattr(executor_contract.Stream, "check", _check_within_bf16_tolerance)
    executor_contract.stream_and_check(ex, executor_contract.offline_model(model),
                                       seed=len(name))
    assert all(not r.any() for r in ex.state.read([4]))  # never stepped, never written


def test_bf16_error_does_not_grow_over_a_long_stream(bf16: None) -> None:
    """2,000 steps in random chunks of 1..64 next to a ragged neighbour: bf16 vs float32
    stays within the tolerance, and the last 200 steps err no more than the first 200
    (state rows are float32 in the bank, bf16 inside a step; measured here: LSTM(64)
    max abs 0.003 in every 200-step window)."""
    model = seq_model(L.LSTM(64, return_sequences=True), L.Dense(3))
    executor_contract.randomize(model, np.random.default_rng(0))
    f32 = TorchExecutor.from_keras(model, slots=2, threads=1)
    b16 = TorchExecutor.from_keras(model, slots=2, threads=1, precision="bf16")
    rng = np.random.default_rng(1)
    x = random_seq(f32, 2000, rng)
    got, want, start = [], [], 0
    while start < len(x):
        chunk = x[start:start + int(rng.integers(1, 65))]
        got.append(b16.run({0: chunk, 1: chunk[: len(chunk) // 2]}, 64)[0])
        want.append(f32.run({0: chunk}, 64)[0])
        start += len(chunk)
    diff = np.abs(np.concatenate(got) - np.concatenate(want))
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), **BF16_TOLERANCE)
    assert diff[-200:].max() <= 2 * diff[:200].max()
    assert all(t.dtype == torch.float32 for t in b16.state.tensors)  # float32 rows
    assert np.abs(b16.state.read([0])[0] - f32.state.read([0])[0]).max() <= 2e-2


def test_bf16_weights_snapshots_and_per_step_weights(bf16: None) -> None:
    """GEMM weights in bf16, norm weights in float32; a float32 snapshot (here: from the
    float32 executor) continues in bf16; pinned weights convert to each parameter's dtype."""
    model, other = build("stacked_dropout_batchnorm"), build("stacked_dropout_batchnorm", 1)
    ex = TorchExecutor.from_keras(model, slots=2, threads=1, precision="bf16")
    dtypes = {name: p.dtype for name, p in ex.chain.named_parameters()}
    assert {dtypes[n] for n in dtypes if ".rnn." in n} == {torch.bfloat16}
    assert dtypes["steps.2.params.0"] == torch.float32  # BatchNormalization's gamma
    assert dtypes["steps.3.params.0"] == torch.bfloat16  # Dense kernel
    seq = random_seq(ex, 30, np.random.default_rng(0))
    f32 = TorchExecutor.from_keras(model, slots=2, threads=1)
    first = f32.run({1: seq[:12]}, 16)[1]
    ex.state.restore(0, f32.state.snapshot(1))
    got = np.concatenate([first, ex.run({0: seq[12:]}, 32)[0]])
    np.testing.assert_allclose(got, offline(model, seq), **BF16_TOLERANCE)
    pinned = ex.convert_weights(other.get_weights())
    assert {n: t.dtype for n, t in pinned.items()} == dtypes
    np.testing.assert_allclose(ex.run({1: seq}, 32, weights=pinned)[1], offline(other, seq),
                               **BF16_TOLERANCE)
