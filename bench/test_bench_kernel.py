"""Kernel throughput of the serving step (no sockets): timesteps/s and GFLOP/s.

    pytest bench/test_bench_kernel.py -q [--benchmark-json bench/results/kernel.json]
    STREAMRNN_BENCH=full pytest bench/test_bench_kernel.py -q     # the whole grid

Model: ``Input(T, 64) -> LSTM(256) -> Dense(64)`` (the PyTorch peer's shapes). Each case
builds a serving clone at batch == slots and times ``ModelRunner.run`` on a full batch
(every slot has a chunk of ``chunk`` steps): the packing into the padded buffers, the
compiled step and the copy-out, as the engine runs it. Variants:

* ``keras-lstm``: the Keras ``LSTM`` layer (``fused=False``);
* ``keras-rnn-cell``: ``keras.layers.RNN(LSTMCell)`` (``fused=False``);
* ``fused``: :mod:`streamrnn.executors.fused` on the ``LSTM`` layer's variables;

each with XLA on and off. Also: the classic per-step ``predict([x, h, c])`` recipe, a
float32 GEMM ceiling (2048^3 ``tf.matmul``), the headline step's recurrent GEMMs alone as
XLA dots (``xla-dot-chain``: the bound of any XLA step at that shape, as a fraction of the
ceiling), cuDNN on/off on a GPU, and the PyTorch
``nn.LSTM`` peer (``torch-lstm`` of ``bench/kernel_peers.py`` in its own process, run by
``$STREAMRNN_TORCH_PYTHON``, default this interpreter; skipped if torch is missing there),
whose runs alternate with rounds of the fused step for an interleaved ratio.
``bench/test_bench_executors.py`` sets the executors against the peers.

Every case stores in ``extra_info``: ``suite="kernel"``, ``variant``, ``xla``, ``slots``,
``chunk``, ``timesteps_per_s`` (from the median round), ``timesteps_per_s_best`` (from the
fastest round: the least disturbed by other processes on a shared machine), ``gflops`` and
``flops_per_timestep``; ``bench/report.py`` turns the JSON into tables and plots.

The default (quick) grid runs in a few minutes on 2 cores; ``STREAMRNN_BENCH=full`` runs
slots {1, 8, 64, 256} x chunk {1, 16, 128} x every variant.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest
from kernel_peers import KernelSpec, flops_per_timestep
from peer_rounds import KernelSet

FEATURES, UNITS = 64, 256
FULL = os.environ.get("STREAMRNN_BENCH", "quick") == "full"
SECONDS = float(os.environ.get("STREAMRNN_BENCH_SECONDS", "3" if FULL else "1.5"))
VARIANTS = [
    ("keras-lstm", True), ("keras-lstm", False),
    ("keras-rnn-cell", True), ("keras-rnn-cell", False),
    ("fused", True), ("fused", False),
]
SLOTS, CHUNKS = (1, 8, 64, 256), (1, 16, 128)
TORCH_PYTHON = os.environ.get("STREAMRNN_TORCH_PYTHON", sys.executable)
TORCH_PAIRS = 3  # torch peer runs alternating with rounds of the fused step
HEADLINE = (64, 16)  # slots, chunk: the shape of the kernel targets


def _grid() -> list[tuple[str, bool, int, int]]:
    if FULL:
        return [(v, x, s, c) for v, x in VARIANTS for s in SLOTS for c in CHUNKS]
    cases = [(v, x, 64, 16) for v, x in VARIANTS]  # the headline shape, every variant
    for v, x in (("keras-lstm", True), ("fused", True), ("fused", False)):
        cases += [(v, x, s, 16) for s in (1, 8, 256)]  # slots sweep
        cases += [(v, x, 64, c) for c in (1, 128)]  # chunk-length sweep
    return cases


def _model(variant: str):
    import keras

    keras.utils.set_random_seed(0)
    if variant == "keras-rnn-cell":
        rnn = keras.layers.RNN(keras.layers.LSTMCell(UNITS), return_sequences=True)
    else:
        rnn = keras.layers.LSTM(UNITS, return_sequences=True)
    return keras.Sequential([keras.Input((None, FEATURES)), rnn, keras.layers.Dense(FEATURES)])


def _timed(benchmark, fn, timesteps_per_call: int, seconds: float = SECONDS, refs=None) -> None:
    """Run ``fn`` under pytest-benchmark for about ``seconds`` and record rates.

    ``refs`` (name -> callable) run before every round, untimed by pytest-benchmark but timed
    here, so each ratio compares rounds taken under the same load (this machine is shared:
    rates drift by 2x between tests run a minute apart, ratios of interleaved rounds do not).
    Their median seconds per call land in ``extra_info["ref_seconds"]``.
    """
    refs = refs or {}
    ref_times: dict[str, list[float]] = {name: [] for name in refs}

    def setup():
        for name, ref in refs.items():
            t = time.perf_counter()
            ref()
            ref_times[name].append(time.perf_counter() - t)

    t0 = time.perf_counter()
    fn()
    for ref in refs.values():
        ref()
    once = max(time.perf_counter() - t0, 1e-6)
    rounds = int(min(2000, max(5, seconds / once)))
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=2, setup=setup)
    stats = benchmark.stats.stats
    flops = flops_per_timestep()
    if refs:
        benchmark.extra_info["ref_seconds"] = {
            name: float(np.median(times[2:] or times)) for name, times in ref_times.items()
        }
        benchmark.extra_info["seconds_median"] = stats.median
    benchmark.extra_info.update(
        suite="kernel",
        timesteps_per_call=timesteps_per_call,
        flops_per_timestep=flops,
        timesteps_per_s=timesteps_per_call / stats.median,
        timesteps_per_s_best=timesteps_per_call / stats.min,
        gflops=timesteps_per_call * flops / stats.median / 1e9,
        gflops_best=timesteps_per_call * flops / stats.min / 1e9,
    )


def _runner(variant: str, xla: bool, slots: int, chunk: int):
    from streamrnn.executors.keras_runner import ModelRunner
    from streamrnn.executors.models import build_serving_model

    serving = build_serving_model(_model(variant), slots, fused=variant == "fused")
    runner = ModelRunner(serving, max_bucket=chunk, jit_compile=xla)
    rng = np.random.default_rng(0)
    chunks = {s: rng.standard_normal((chunk, FEATURES)).astype(np.float32) for s in range(slots)}
    t0 = time.perf_counter()
    runner.run(chunks, chunk)  # trace + compile
    compile_s = time.perf_counter() - t0
    return runner, (lambda: runner.run(chunks, chunk)), compile_s


_REFS: dict[tuple[int, int], object] = {}
REFERENCE = ("keras-lstm", True)  # the Keras layer under XLA: the engine's step before fused


def _gemm_fn(n: int = 2048):
    import tensorflow as tf

    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    matmul = tf.function(lambda: tf.matmul(a, b))
    return lambda: matmul().numpy()


@pytest.mark.parametrize(
    ("variant", "xla", "slots", "chunk"),
    _grid(),
    ids=lambda v: {True: "xla", False: "noxla"}.get(v, str(v)) if isinstance(v, bool) else str(v),
)
def test_kernel_step(benchmark, variant, xla, slots, chunk):
    runner, step, compile_s = _runner(variant, xla, slots, chunk)
    refs = {}
    if (variant, xla) != REFERENCE:
        if (slots, chunk) not in _REFS:
            _REFS[(slots, chunk)] = _runner(*REFERENCE, slots, chunk)[1]
        refs["keras-lstm-xla"] = _REFS[(slots, chunk)]
    if (slots, chunk) == HEADLINE:
        refs["gemm"] = _REFS.setdefault("gemm", _gemm_fn())
    _timed(benchmark, step, slots * chunk, refs=refs)
    info = benchmark.extra_info
    info.update(
        variant=variant, xla=xla, slots=slots, chunk=chunk, kernel=runner.kernel,
        compile_s=compile_s, traces=runner.trace_count, grid="full" if FULL else "quick",
    )
    if "keras-lstm-xla" in refs:
        info["ratio_vs_keras_lstm_xla"] = info["ref_seconds"]["keras-lstm-xla"] / info[
            "seconds_median"]
    if "gemm" in refs:
        info["gemm_gflops_interleaved"] = 2 * 2048**3 / info["ref_seconds"]["gemm"] / 1e9
        info["fraction_of_gemm"] = info["gflops"] / info["gemm_gflops_interleaved"]


@pytest.mark.parametrize("busy", [16, 32])
def test_partly_filled_step(benchmark, busy):
    """64 slots, ``busy`` of them with a 16-step chunk (fused, XLA): the compact step, which
    gathers the busy slots' rows into a smaller batch, vs the same runner computing every
    row (``row_buckets`` emptied), interleaved."""
    runner, _, _ = _runner("fused", True, 64, 16)
    rng = np.random.default_rng(1)
    chunks = {s: rng.standard_normal((16, FEATURES)).astype(np.float32) for s in range(busy)}
    row_buckets = list(runner.row_buckets)

    def run(buckets: list[int]) -> None:
        runner.row_buckets = buckets
        runner.run(chunks, 16)

    run([])  # trace both
    run(row_buckets)
    _timed(benchmark, lambda: run(row_buckets), busy * 16, refs={"full": lambda: run([])})
    info = benchmark.extra_info
    full_s = info["ref_seconds"]["full"]
    info.update(suite="kernel-partial", busy=busy, total_slots=64, chunk=16,
                full_timesteps_per_s=busy * 16 / full_s,
                ratio_vs_full=full_s / info["seconds_median"])


def test_gemm_ceiling(benchmark):
    """float32 GEMM GFLOP/s of this machine (2048^3 ``tf.matmul``): the reference line."""
    n = 2048
    _timed(benchmark, _gemm_fn(n), 0, seconds=max(SECONDS, 2.0))
    stats = benchmark.stats.stats
    benchmark.extra_info.update(
        variant="gemm", n=n,
        gflops=2 * n**3 / stats.median / 1e9, gflops_best=2 * n**3 / stats.min / 1e9,
    )


def _dot_chain_fn(slots: int, chunk: int, units: int = UNITS):
    """The fused step's recurrent GEMMs and nothing else: ``chunk`` chained
    ``(slots, units) @ (units, 4 * units)`` XLA dots (a tanh of a slice feeds each next one)."""
    import tensorflow as tf

    h = tf.random.normal((slots, units))
    kernel = tf.random.normal((units, 4 * units)) * 0.05

    @tf.function(jit_compile=True)
    def chain(h):
        for _ in range(chunk):
            h = tf.tanh(tf.matmul(h, kernel)[:, :units])
        return h

    return lambda: chain(h).numpy()


def test_xla_dot_chain(benchmark):
    """How fast XLA:CPU runs the headline step's recurrent GEMMs alone, as a fraction of the
    GEMM ceiling (interleaved): no step built on XLA dots at this shape can beat it."""
    slots, chunk = HEADLINE
    refs = {"gemm": _REFS.setdefault("gemm", _gemm_fn())}
    _timed(benchmark, _dot_chain_fn(slots, chunk), 0, refs=refs)
    flops = 2 * slots * UNITS * 4 * UNITS * chunk
    stats = benchmark.stats.stats
    gflops = flops / stats.median / 1e9
    ceiling = 2 * 2048**3 / benchmark.extra_info["ref_seconds"]["gemm"] / 1e9
    benchmark.extra_info.update(
        variant="xla-dot-chain", dot_slots=slots, dot_chunk=chunk, dot_units=UNITS, gflops=gflops,
        gflops_best=flops / stats.min / 1e9, gemm_gflops_interleaved=ceiling,
        fraction_of_gemm=gflops / ceiling,
    )


@pytest.mark.parametrize("slots", [1, 64] if not FULL else [1, 8, 64])
def test_predict_recipe(benchmark, slots):
    """The classic recipe: an inference model with explicit state, ``predict`` per step."""
    import keras

    trained = _model("keras-lstm")
    x_in = keras.Input((1, FEATURES))
    h_in, c_in = keras.Input((UNITS,)), keras.Input((UNITS,))
    lstm = keras.layers.LSTM(UNITS, return_sequences=True, return_state=True)
    y, h, c = lstm(x_in, initial_state=[h_in, c_in])
    head = keras.layers.Dense(FEATURES)
    model = keras.Model([x_in, h_in, c_in], [head(y), h, c])
    lstm.set_weights(trained.layers[0].get_weights())
    head.set_weights(trained.layers[1].get_weights())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((slots, 1, FEATURES)).astype(np.float32)
    state = [np.zeros((slots, UNITS), np.float32), np.zeros((slots, UNITS), np.float32)]

    def step():
        _, state[0], state[1] = model.predict([x, state[0], state[1]], verbose=0)

    _timed(benchmark, step, slots, seconds=min(SECONDS, 2.0))
    benchmark.extra_info.update(variant="predict-recipe", xla=False, slots=slots, chunk=1)


@pytest.mark.parametrize("use_cudnn", [True, False], ids=["cudnn", "no-cudnn"])
def test_cudnn_step(benchmark, use_cudnn):
    """cuDNN vs the generic loop for the stateful LSTM step (same weights, same inputs)."""
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        pytest.skip(
            "no GPU: tf.config.list_physical_devices('GPU') is empty (bench/gpu_cudnn.py runs "
            "this comparison with Keras on its torch backend on a GPU box)"
        )
    from streamrnn.executors.keras_runner import ModelRunner
    from streamrnn.executors.models import build_serving_model

    slots, chunk = 64, 16
    serving = build_serving_model(_model("keras-lstm"), slots, use_cudnn=use_cudnn, fused=False)
    runner = ModelRunner(serving, max_bucket=chunk, jit_compile=False)
    rng = np.random.default_rng(0)
    chunks = {s: rng.standard_normal((chunk, FEATURES)).astype(np.float32) for s in range(slots)}
    runner.run(chunks, chunk)
    _timed(benchmark, lambda: runner.run(chunks, chunk), slots * chunk)
    benchmark.extra_info.update(
        variant=f"keras-lstm use_cudnn={use_cudnn}", xla=False, slots=slots, chunk=chunk,
        kernel=runner.kernel,
    )


def test_torch_peer(benchmark):
    """PyTorch ``nn.LSTM`` + Linear on the same shapes and threads, in its own process.

    Peer runs (and a torch 2048^3 matmul, its GEMM) alternate with rounds of the engine's
    Keras step (fused, XLA) at the same shape, ``TORCH_PAIRS`` times;
    ``ratio_fused_vs_torch_interleaved`` is the median of the per-pair ratios (this
    machine's speed drifts between minutes).
    """
    slots, chunk = HEADLINE
    specs = {"torch": KernelSpec("torch-lstm", slots, chunk, FEATURES, UNITS),
             "gemm": KernelSpec("gemm-torch")}
    with KernelSet(specs, python=TORCH_PYTHON) as peers:
        if "torch" not in peers.ready:
            pytest.skip(f"no torch peer with {TORCH_PYTHON}: {peers.missing['torch']}")
        _, fused_step, _ = _runner("fused", True, slots, chunk)
        torch_rates: list[float] = []
        torch_gemm: list[float] = []
        fused_rates: list[float] = []

        def pair():
            t = peers.ready["torch"].process.time(SECONDS)
            torch_rates.append(t["calls"] * slots * chunk / t["seconds"])
            g = peers.ready["gemm"].process.time(SECONDS)
            torch_gemm.append(g["calls"] * peers.ready["gemm"].work / g["seconds"] / 1e9)
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < SECONDS:
                fused_step()
                calls += 1
            fused_rates.append(calls * slots * chunk / (time.perf_counter() - start))

        benchmark.pedantic(pair, rounds=TORCH_PAIRS, iterations=1)
        peer = peers.ready["torch"].info["kernel"]
    rate = float(np.median(torch_rates))
    ratios = [f / t for f, t in zip(fused_rates, torch_rates, strict=True)]
    benchmark.extra_info.update(
        suite="kernel", variant="torch-nn.LSTM", xla=False, slots=slots, chunk=chunk,
        timesteps_per_s=rate, timesteps_per_s_best=max(torch_rates),
        gflops=rate * flops_per_timestep() / 1e9,
        torch_gemm_gflops=float(np.median(torch_gemm)), flops_per_timestep=flops_per_timestep(),
        peer_output=peer, python=sys.version.split()[0],
        fused_timesteps_per_s_interleaved=float(np.median(fused_rates)),
        ratio_fused_vs_torch_interleaved=float(np.median(ratios)),
        ratios_fused_vs_torch=[round(r, 3) for r in ratios],
    )
