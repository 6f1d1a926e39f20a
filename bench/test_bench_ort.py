"""ONNX Runtime executor vs the Keras executor (fused, XLA), in alternating rounds.

    pytest bench/test_bench_ort.py -q [--benchmark-json bench/results/ort.json]

Model: ``Input(T, 64) -> LSTM(256) -> Dense(64)`` (the kernel suite's shapes), 64 slots,
16-step chunks. Each round runs one :meth:`OrtExecutor.run` (timed by pytest-benchmark)
right after one ``ModelRunner.run`` of the Keras executor
(``build_serving_model(model, 64, fused=True)``, XLA on CPU) on the same chunks, timed
here: both see the same load, so their ratio holds on a shared machine where absolute
rates drift. Variants:

* ``ort``: the executor as served (intra-op threads = ``os.cpu_count()``, no spinning,
  weights baked into the session as initializers);
* ``ort-1thread``: one intra-op thread;
* ``ort-inputs``: ``bake_weights=False``, the weights fed as graph inputs every step (one
  session for every weight version): the price of that;
* ``busy`` / ``ort-inputs-busy``: only 16 of the 64 slots have a chunk (the executor
  gathers those rows only).

Each case stores in ``extra_info``: ``suite="ort"``, ``variant``, ``slots``, ``busy``,
``chunk``, ``timesteps_per_s`` (median round), ``keras_timesteps_per_s`` (median of the
interleaved Keras rounds) and ``ratio_vs_keras`` (Keras median seconds / ORT median seconds).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

FEATURES, UNITS, SLOTS, CHUNK = 64, 256, 64, 16
SECONDS = float(os.environ.get("STREAMRNN_BENCH_SECONDS", "3"))


def _model():
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((None, FEATURES)),
                             keras.layers.LSTM(UNITS, return_sequences=True),
                             keras.layers.Dense(FEATURES)])


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def keras_runner(model):
    from streamrnn.executors.keras_runner import ModelRunner
    from streamrnn.executors.models import build_serving_model

    runner = ModelRunner(build_serving_model(model, SLOTS, fused=True), max_bucket=CHUNK)
    runner.warmup()
    return runner


@pytest.mark.parametrize(("variant", "busy"), [
    ("ort", SLOTS), ("ort-1thread", SLOTS), ("ort-inputs", SLOTS), ("busy", 16),
    ("ort-inputs-busy", 16)])
def test_ort_vs_keras(benchmark, model, keras_runner, variant: str, busy: int) -> None:
    from streamrnn.executors.ort import OrtExecutor

    executor = OrtExecutor(model, SLOTS, max_bucket=CHUNK,
                           threads=1 if variant == "ort-1thread" else None,
                           bake_weights=not variant.startswith("ort-inputs"))
    executor.warmup()
    rng = np.random.default_rng(0)
    chunks = {s: rng.standard_normal((CHUNK, FEATURES)).astype(np.float32)
              for s in range(busy)}
    keras_seconds: list[float] = []

    def keras_round() -> None:
        t = time.perf_counter()
        keras_runner.run(chunks, CHUNK)
        keras_seconds.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    executor.run(chunks, CHUNK)
    keras_round()
    rounds = int(min(500, max(30, SECONDS / (time.perf_counter() - t0))))
    benchmark.pedantic(lambda: executor.run(chunks, CHUNK), setup=keras_round,
                       rounds=rounds, iterations=1, warmup_rounds=2)
    ort_s = benchmark.stats.stats.median
    keras_s = float(np.median(keras_seconds[3:]))
    benchmark.extra_info.update(
        suite="ort", variant=variant, slots=SLOTS, busy=busy, chunk=CHUNK,
        kernel=executor.kernel, keras_kernel=keras_runner.kernel,
        timesteps_per_s=busy * CHUNK / ort_s, keras_timesteps_per_s=busy * CHUNK / keras_s,
        ratio_vs_keras=keras_s / ort_s)
