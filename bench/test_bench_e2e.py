"""End-to-end throughput and latency through ZeroMQ vs the in-process engine step.

    pytest bench/test_bench_e2e.py -q -s [--benchmark-json bench/results/e2e.json]

Model: the kernel suite's headline shape, ``Input(T, 64) -> LSTM(256) -> Dense(64)`` with 64
slots (``STREAMRNN_E2E_MODEL=small``: a 2-layer LSTM(64), 32 features, 8 outputs, where the
per-message cost dominates). Same compile settings (engine default: fused, XLA on CPU) in
both measurements. For each chunk length in ``STREAMRNN_E2E_CHUNKS`` (default 16, 64, 128):

* ``kernel``: ``engine.push_many`` over all 64 streams in this process (no sockets);
* ``e2e``: a real worker subprocess; one :class:`~streamrnn.client.client.Client` keeps ``WINDOW``
  chunks in flight per stream (callback-driven; ``STREAMRNN_E2E_WINDOW``, default 3) and
  counts timesteps/s. The pushes submitted from the callbacks of one reply envelope leave
  in one BATCH message, and the worker answers each step in one BATCH_REPLY (the client's
  default, docs/protocol.md section 4a; ``STREAMRNN_E2E_BATCH=0``: one message per chunk,
  for comparison). The worker runs with its default coalescing: the queued consecutive
  chunks of a stream (up to ``--max-bucket`` timesteps) share one step
  (``STREAMRNN_E2E_COALESCE=0``: one chunk per stream per step, as ``engine.push_many``
  does here). The CPU time per chunk of the worker process (compiled step included) and of
  this client process are recorded too (Linux), and the CPU time per chunk of the
  kernel-only loop; the worker's minus the kernel's is the worker's CPU outside the kernel
  (an estimate: a coalesced step carries longer rows than ``push_many``'s).

Executors: ``STREAMRNN_E2E_EXECUTORS`` (comma-separated, e.g. ``onnxruntime,keras,torch``)
runs every case once per executor, the worker started with ``--executor NAME`` and the
kernel-only engine built with ``Engine.from_keras(..., executor=NAME)``; unset (default),
both use the engine's default executor. Each case records ``executor`` and ``kernel``.

The two alternate, ``PAIRS`` times each (``STREAMRNN_E2E_PAIRS``, default 3; each e2e
measurement moves ``STREAMRNN_E2E_TIMESTEPS``, default 400000), and the ratio e2e/kernel
is the median of the per-pair ratios (the machine's speed drifts; a pair sees the same
drift). The target is
>= 0.9 at saturation. On a 2-core machine the client process and the worker's I/O thread
compete with the compiled step for the same two cores, so the ratio grows with the chunk
length: the per-chunk cost (decode, validate, sequence, reply: about 45 us of CPU per chunk
in the client and 60-100 us in the worker, with BATCH messages) is paid per chunk, the
step's cost per timestep.

``latency``: open-loop at half the measured e2e throughput (16-step chunks), once every
stream is open; p50/p99. Before each measurement the objects alive in this process are
frozen out of the garbage collector's view (``gc.freeze``, see ``_freeze_heap``).
"""

from __future__ import annotations

import gc
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("STREAMRNN_E2E_MODEL", "headline") == "small":
    SLOTS, FEATURES, UNITS, OUTPUTS, LAYERS = 64, 32, 64, 8, 2
else:
    SLOTS, FEATURES, UNITS, OUTPUTS, LAYERS = 64, 64, 256, 64, 1
CHUNKS = [int(c) for c in os.environ.get("STREAMRNN_E2E_CHUNKS", "16,64,128").split(",")]
LATENCY_CHUNK = CHUNKS[0]
WINDOW = int(os.environ.get("STREAMRNN_E2E_WINDOW", "3"))
BATCH = os.environ.get("STREAMRNN_E2E_BATCH", "1") != "0"  # 0: one message per chunk
COALESCE = os.environ.get("STREAMRNN_E2E_COALESCE", "1") != "0"  # 0: worker --coalesce-steps 0
EXECUTORS = [e.strip() or None for e in os.environ.get("STREAMRNN_E2E_EXECUTORS", "").split(",")]
PAIRS = int(os.environ.get("STREAMRNN_E2E_PAIRS", "3"))
KERNEL_SECONDS = 2.0
# per e2e measurement (a few seconds; the ramp-up and -down are a small part of it)
E2E_TIMESTEPS = int(os.environ.get("STREAMRNN_E2E_TIMESTEPS", "400000"))
RESULTS: dict[str, float | str] = {}  # e2e rates and executor names, for the latency case


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


def _chunks(length: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(length)
    return {f"b{i:02d}": rng.standard_normal((length, FEATURES)).astype(np.float32)
            for i in range(SLOTS)}


@pytest.fixture(scope="module", params=EXECUTORS, ids=lambda e: e or "default")
def executor(request) -> str | None:
    """The executor of this run of the cases (None: the engine's default)."""
    return request.param


@pytest.fixture(scope="module")
def engine(model_path, executor):
    from streamrnn.engine.engine import Engine

    options = {"executor": executor} if executor else {}
    engine = Engine.from_keras(model_path, slots=SLOTS, **options)
    engine.runner.warmup()
    return engine


@pytest.fixture(scope="module")
def worker(model_path, executor):
    from streamrnn.cli.process import WorkerProcess

    coalesce = () if COALESCE else ("--coalesce-steps", "0")
    chosen = ("--executor", executor) if executor else ()
    with WorkerProcess.start(model_path, SLOTS, "--batch-window-us", "500",
                             *coalesce, *chosen) as process:
        yield process


def _kernel_rate(engine, chunks: dict[str, np.ndarray], seconds: float) -> tuple[float, int]:
    """Timesteps/s of ``engine.push_many`` over about ``seconds``, and the chunks pushed."""
    steps = next(iter(chunks.values())).shape[0]
    engine.push_many(chunks)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        engine.push_many(chunks)
        calls += 1
    return calls * len(chunks) * steps / (time.perf_counter() - start), calls * len(chunks)


def _freeze_heap() -> None:
    """Move everything alive now out of the garbage collector's view.

    This process also holds TensorFlow, Keras and the in-process engine: millions of
    long-lived objects that a client process would not have. With them in view, each
    full (generation 2) collection paused the client's I/O thread for about 200 ms, which
    showed up as a latency p99 of 130-300 ms; after ``gc.freeze()`` it did not.
    """
    gc.collect()
    gc.freeze()


def _process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc; else None)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _closed_loop(client, chunks: dict[str, np.ndarray], rounds: int) -> float:
    """Every stream keeps WINDOW chunks in flight until it sent ``rounds``; timesteps/s."""
    steps = next(iter(chunks.values())).shape[0]
    remaining = {s: rounds for s in chunks}
    outstanding = [0]
    lock = threading.Lock()
    done = threading.Event()
    errors: list[BaseException] = []

    def submit(stream: str) -> None:
        remaining[stream] -= 1
        outstanding[0] += 1
        client.push_async(stream, chunks[stream]).add_done_callback(
            lambda f, s=stream: on_done(s, f))

    def on_done(stream: str, future) -> None:
        if future.exception() is not None:
            errors.append(future.exception())
        with lock:
            outstanding[0] -= 1
            if remaining[stream] > 0 and not errors:
                submit(stream)
            elif outstanding[0] == 0:
                done.set()

    start = time.perf_counter()
    with lock:
        for stream in chunks:
            for _ in range(min(WINDOW, rounds)):
                submit(stream)
    assert done.wait(600), "closed loop did not finish"
    assert not errors, errors[0]
    return len(chunks) * rounds * steps / (time.perf_counter() - start)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_e2e_vs_kernel_only(benchmark, engine, worker, executor, chunk):
    from streamrnn.client.client import Client

    chunks = _chunks(chunk)
    rounds = max(WINDOW, E2E_TIMESTEPS // (SLOTS * chunk))
    kernel: list[float] = []
    e2e: list[float] = []
    _freeze_heap()
    cpu = {"worker": 0.0, "client": 0.0, "kernel": 0.0}  # CPU seconds in the loops
    kernel_chunks = [0]
    with Client(worker.endpoint, timeout=60, window=WINDOW, batch=BATCH) as client:
        _closed_loop(client, chunks, WINDOW)  # open the streams, warm the path
        counts_before = client.stats()["counts"]

        def pair() -> None:
            own_before = _own_cpu_s()
            rate, pushed = _kernel_rate(engine, chunks, KERNEL_SECONDS)
            cpu["kernel"] += _own_cpu_s() - own_before
            kernel.append(rate)
            kernel_chunks[0] += pushed
            worker_before, own_before = _process_cpu_s(worker.proc.pid), _own_cpu_s()
            e2e.append(_closed_loop(client, chunks, rounds))
            worker_after = _process_cpu_s(worker.proc.pid)
            if worker_before is not None and worker_after is not None:
                cpu["worker"] += worker_after - worker_before
            cpu["client"] += _own_cpu_s() - own_before  # the engine here is idle meanwhile

        benchmark.pedantic(pair, rounds=PAIRS, iterations=1)
        counts_after = client.stats()["counts"]
    ratios = [e / k for e, k in zip(e2e, kernel, strict=True)]
    ratio = float(np.median(ratios))
    counts = {k: v - counts_before.get(k, 0) for k, v in counts_after.items()}  # this case
    fill = counts.get("applied_push", 0) / max(counts.get("batches", 1), 1)
    e2e_chunks = PAIRS * SLOTS * rounds
    kernel_us = cpu["kernel"] / max(kernel_chunks[0], 1) * 1e6
    benchmark.extra_info.update({
        "suite": "e2e", "chunk": chunk, "slots": SLOTS, "units": UNITS,
        "executor": executor or engine.executor.name, "kernel": engine.kernel,
        "kernel_timesteps_per_s": float(np.median(kernel)),
        "timesteps_per_s": float(np.median(e2e)),
        "ratio_vs_kernel": ratio, "ratios": [round(r, 3) for r in ratios],
        "chunks_per_batch": fill, "window": WINDOW, "batch": BATCH, "coalesce": COALESCE,
        "coalesced_share": counts.get("coalesced_push", 0) / max(counts.get("applied_push", 1), 1),
        # CPU per chunk, us: the worker process (step included) and this client process
        "worker_cpu_us_per_chunk": cpu["worker"] / e2e_chunks * 1e6,
        "client_cpu_us_per_chunk": cpu["client"] / e2e_chunks * 1e6,
        # the kernel-only loop's CPU per chunk, and the worker's CPU beyond it
        "kernel_cpu_us_per_chunk": kernel_us,
        "worker_outside_kernel_us_per_chunk": cpu["worker"] / e2e_chunks * 1e6 - kernel_us,
    })
    RESULTS[f"e2e_{executor}_{chunk}"] = float(np.median(e2e))
    RESULTS[f"name_{executor}"] = benchmark.extra_info["executor"]
    print(f"\nchunk {chunk}: kernel-only {np.median(kernel):,.0f} timesteps/s, e2e through "
          f"ZeroMQ {np.median(e2e):,.0f}; e2e/kernel per pair {[f'{r:.2f}' for r in ratios]}, "
          f"median {ratio:.2f} (target >= 0.9); {fill:.1f} chunks per batched step "
          f"({100 * benchmark.extra_info['coalesced_share']:.0f}% coalesced); CPU per "
          f"chunk: worker {benchmark.extra_info['worker_cpu_us_per_chunk']:.0f} us "
          f"({benchmark.extra_info['worker_outside_kernel_us_per_chunk']:.0f} outside the "
          f"kernel), client {benchmark.extra_info['client_cpu_us_per_chunk']:.0f} us "
          f"[{benchmark.extra_info['executor']}: {engine.kernel}]")


def test_latency_at_half_load(benchmark, worker, executor):
    from streamrnn.client.client import Client

    chunks = _chunks(LATENCY_CHUNK)
    full = RESULTS.get(f"e2e_{executor}_{LATENCY_CHUNK}") or 50_000.0
    chunk_rate = 0.5 * full / LATENCY_CHUNK  # chunks per second over all streams
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
            stream = streams[i % len(streams)]
            future = client.push_async(stream, chunks[stream])

            def record(_f, sent=sent) -> None:
                with lock:
                    latencies.append(time.perf_counter() - sent)

            future.add_done_callback(record)
            futures.append(future)
        for future in futures:
            future.result()

    with Client(worker.endpoint, timeout=60, window=WINDOW, batch=BATCH) as client:
        _closed_loop(client, chunks, 1)  # open the streams: measure the steady state
        _freeze_heap()
        benchmark.pedantic(run, rounds=1, iterations=1)
    ms = np.array(latencies) * 1000
    p50, p99 = float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
    benchmark.extra_info.update({"suite": "e2e", "chunk": LATENCY_CHUNK,
                                 "executor": RESULTS.get(f"name_{executor}", executor),
                                 "offered_timesteps_per_s": chunk_rate * LATENCY_CHUNK,
                                 "latency_p50_ms": p50, "latency_p99_ms": p99})
    print(f"\nlatency at half load ({chunk_rate * LATENCY_CHUNK:,.0f} timesteps/s offered, "
          f"{total} chunks of {LATENCY_CHUNK}): p50 {p50:.1f} ms, p99 {p99:.1f} ms")
