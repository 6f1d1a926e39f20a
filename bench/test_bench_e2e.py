"""End-to-end throughput and latency through ZeroMQ vs the in-process engine step.

    pytest bench/test_bench_e2e.py -q -s [--benchmark-json bench/results/e2e.json]

Same model (by default a 2-layer LSTM, 32 features, 64 units, 8 outputs; see
STREAMRNN_E2E_MODEL below), same slots (64), same chunk length (32), same compile settings
(engine default: XLA on CPU) in both measurements:

* ``kernel``: ``engine.push_many`` over all 64 streams in this process (no sockets);
* ``e2e``: a real worker subprocess; the client keeps ``WINDOW`` chunks in flight per
  stream (callback-driven, one client) and counts timesteps/s;
* ``latency``: open-loop at half the measured e2e throughput; chunk latency p50/p99.

The ratio e2e/kernel (target >= 0.9) is printed and stored in ``extra_info``. Note that on a
2-core machine the client process competes with the worker for the same cores.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

# STREAMRNN_E2E_MODEL=headline measures the kernel suite's headline shape instead (64
# features, one LSTM(256), Dense(64), chunks of 16): more compute per message.
if os.environ.get("STREAMRNN_E2E_MODEL", "small") == "headline":
    SLOTS, CHUNK, FEATURES, UNITS, OUTPUTS, LAYERS = 64, 16, 64, 256, 64, 1
else:
    SLOTS, CHUNK, FEATURES, UNITS, OUTPUTS, LAYERS = 64, 32, 32, 64, 8, 2
WINDOW = 3
ROUNDS = 60  # chunks per stream in one throughput measurement
RESULTS: dict[str, float] = {}


def _model():
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((None, FEATURES)),
        *[keras.layers.LSTM(UNITS, return_sequences=True) for _ in range(LAYERS)],
        keras.layers.Dense(OUTPUTS),
    ])


@pytest.fixture(scope="module")
def model_path():
    with tempfile.TemporaryDirectory(prefix="streamrnn-bench-") as tmp:
        path = Path(tmp) / "bench_lstm.keras"
        _model().save(path)
        yield path


@pytest.fixture(scope="module")
def chunks():
    rng = np.random.default_rng(0)
    return {f"b{i:02d}": rng.standard_normal((CHUNK, FEATURES)).astype(np.float32)
            for i in range(SLOTS)}


def test_kernel_only_engine_step(benchmark, model_path, chunks):
    from streamrnn.engine import Engine

    engine = Engine.from_keras(model_path, slots=SLOTS)
    engine.runner.warmup()
    engine.push_many(chunks)
    benchmark.pedantic(engine.push_many, args=(chunks,), rounds=40, iterations=1,
                       warmup_rounds=3)
    rate = SLOTS * CHUNK / benchmark.stats["median"]
    RESULTS["kernel_timesteps_per_s"] = rate
    benchmark.extra_info["timesteps_per_s"] = rate
    print(f"\nkernel-only engine step: {rate:,.0f} timesteps/s "
          f"({benchmark.stats['median'] * 1000:.2f} ms per step of {SLOTS}x{CHUNK})")


@pytest.fixture(scope="module")
def worker(model_path):
    from workers.process import WorkerProcess

    with WorkerProcess.start(model_path, SLOTS, "--batch-window-us", "500") as process:
        yield process


def _closed_loop(client, chunks, rounds: int) -> float:
    """Every stream keeps WINDOW chunks in flight until it sent ``rounds``; timesteps/s."""
    remaining = {s: rounds for s in chunks}
    outstanding = [0]
    lock = threading.Lock()
    done = threading.Event()

    def submit(stream: str) -> None:
        remaining[stream] -= 1
        outstanding[0] += 1
        client.push_async(stream, chunks[stream]).add_done_callback(
            lambda f, s=stream: on_done(s, f))

    def on_done(stream: str, future) -> None:
        future.result()
        with lock:
            outstanding[0] -= 1
            if remaining[stream] > 0:
                submit(stream)
            elif outstanding[0] == 0:
                done.set()

    start = time.perf_counter()
    with lock:
        for stream in chunks:
            for _ in range(WINDOW):
                submit(stream)
    assert done.wait(600)
    return len(chunks) * rounds * CHUNK / (time.perf_counter() - start)


def test_e2e_throughput_through_zeromq(benchmark, worker, chunks):
    from streamrnn.client import Client

    with Client(worker.endpoint, timeout=60, window=WINDOW) as client:
        _closed_loop(client, chunks, 5)  # open the streams, warm the path
        rates: list[float] = []
        benchmark.pedantic(lambda: rates.append(_closed_loop(client, chunks, ROUNDS)),
                           rounds=3, iterations=1)
        stats = client.stats()
    rate = float(np.median(rates))
    RESULTS["e2e_timesteps_per_s"] = rate
    benchmark.extra_info["timesteps_per_s"] = rate
    counts = stats["counts"]
    fill = counts.get("applied_push", 0) / max(counts.get("batches", 1), 1)
    benchmark.extra_info["chunks_per_batch"] = fill
    print(f"\ne2e through ZeroMQ: {rate:,.0f} timesteps/s, {fill:.1f} chunks per batched step")
    kernel = RESULTS.get("kernel_timesteps_per_s")
    if kernel:
        ratio = rate / kernel
        benchmark.extra_info["ratio_vs_kernel"] = ratio
        print(f"e2e / kernel-only = {ratio:.2f} (target >= 0.9)")


def test_latency_at_half_load(benchmark, worker, chunks):
    from streamrnn.client import Client

    full = RESULTS.get("e2e_timesteps_per_s") or 50_000.0
    chunk_rate = 0.5 * full / CHUNK  # chunks per second over all streams
    total = int(min(4000, max(400, chunk_rate * 4)))  # about 4 s of traffic
    latencies: list[float] = []
    lock = threading.Lock()

    def run() -> None:
        latencies.clear()
        streams = list(chunks)
        futures = []
        start = time.perf_counter()
        for i in range(total):
            due = start + i / chunk_rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent = time.perf_counter()
            future = client.push_async(streams[i % len(streams)], chunks[streams[i % len(streams)]])

            def record(_f, sent=sent) -> None:
                with lock:
                    latencies.append(time.perf_counter() - sent)

            future.add_done_callback(record)
            futures.append(future)
        for future in futures:
            future.result()

    with Client(worker.endpoint, timeout=60, window=WINDOW) as client:
        benchmark.pedantic(run, rounds=1, iterations=1)
    ms = np.array(latencies) * 1000
    p50, p99 = float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
    benchmark.extra_info.update({"offered_timesteps_per_s": chunk_rate * CHUNK,
                                 "latency_p50_ms": p50, "latency_p99_ms": p99})
    print(f"\nlatency at half load ({chunk_rate * CHUNK:,.0f} timesteps/s offered, "
          f"{total} chunks of {CHUNK}): p50 {p50:.1f} ms, p99 {p99:.1f} ms")
