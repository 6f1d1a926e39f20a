"""``streamrnn demo``: a real worker on loopback, many concurrent streams, verified outputs.

Builds a small seeded 2-layer LSTM (32 features -> 64 units -> 64 units -> 8 outputs), saves
it to a temporary ``.keras`` file, starts ``python -m streamrnn.cli.worker`` on a free
loopback port,
publishes ``streams`` synthetic sequences from one client thread each (random chunk sizes,
a reset in some streams), shows live progress, checks a sample of streams against one
offline call of the original model, prints throughput and chunk latency, and stops the
worker with SIGTERM.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["DemoConfig", "add_arguments", "build_demo_model", "run", "run_demo"]

FEATURES, UNITS, OUTPUTS = 32, 64, 8


@dataclass
class DemoConfig:
    streams: int = 48
    steps: int = 400
    slots: int = 64
    max_chunk: int = 64
    verify: int = 6
    seed: int = 0
    window: int = 4  # chunks in flight per stream
    xla: bool = False  # Keras executor: XLA steps run faster but take ~10 s longer to trace
    executor: str = "auto"  # the worker's --executor (auto: ONNX Runtime on CPU)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``streamrnn demo``."""
    parser.add_argument("--streams", type=int, default=48, help="concurrent streams")
    parser.add_argument("--steps", type=int, default=400, help="timesteps per stream")
    parser.add_argument("--slots", type=int, default=64, help="worker slots")
    parser.add_argument("--max-chunk", type=int, default=64, help="longest random chunk")
    parser.add_argument("--verify", type=int, default=6, help="streams checked offline")
    parser.add_argument("--seed", type=int, default=0)
    from streamrnn.engine.interface import EXECUTORS

    parser.add_argument("--executor", choices=EXECUTORS, default="auto",
                        help="the worker's --executor")
    parser.add_argument("--xla", action="store_true",
                        help="compile the Keras executor's step with XLA (faster steps, slower "
                             "start)")
    return parser


def run(args: argparse.Namespace) -> int:
    """``streamrnn demo``: :func:`run_demo` with the command-line options."""
    return run_demo(DemoConfig(streams=args.streams, steps=args.steps, slots=args.slots,
                               max_chunk=args.max_chunk, verify=args.verify, seed=args.seed,
                               xla=args.xla, executor=args.executor))


@dataclass
class _StreamRun:
    """One synthetic stream: its input, where it is chunked and reset, what came back."""

    name: str
    inputs: np.ndarray  # (steps, FEATURES)
    cuts: list[int]  # chunk boundaries, 0 .. steps
    reset_at: int | None  # a boundary where the stream is reset, or None
    outputs: list[np.ndarray] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    error: BaseException | None = None


def build_demo_model(seed: int = 0):
    """The built-in model: ``(None, 32)`` -> LSTM(64) -> LSTM(64) -> Dense(8) per step."""
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((None, FEATURES)),
        keras.layers.LSTM(UNITS, return_sequences=True),
        keras.layers.LSTM(UNITS, return_sequences=True),
        keras.layers.Dense(OUTPUTS),
    ])


def _plan_streams(config: DemoConfig) -> list[_StreamRun]:
    rng = np.random.default_rng(config.seed)
    runs = []
    for i in range(config.streams):
        inputs = rng.standard_normal((config.steps, FEATURES)).astype(np.float32)
        cuts = [0]
        while cuts[-1] < config.steps:
            cuts.append(min(config.steps, cuts[-1] + int(rng.integers(1, config.max_chunk + 1))))
        reset_at = cuts[len(cuts) // 2] if i % 4 == 0 and len(cuts) > 2 else None
        runs.append(_StreamRun(f"demo-{i:03d}", inputs, cuts, reset_at))
    return runs


def _drive(client, run: _StreamRun, window: int, progress: list[int]) -> None:
    """Publish one stream with up to ``window`` chunks in flight; record outputs/latency."""
    try:
        pending: deque = deque()

        def collect() -> None:
            future, sent = pending.popleft()
            run.outputs.append(future.result())
            run.latencies.append(time.perf_counter() - sent)
            progress[0] += len(run.outputs[-1])

        for start, stop in zip(run.cuts, run.cuts[1:], strict=False):
            if start == run.reset_at:
                while pending:
                    collect()
                client.reset(run.name)
            pending.append((client.push_async(run.name, run.inputs[start:stop]),
                            time.perf_counter()))
            if len(pending) >= window:
                collect()
        while pending:
            collect()
    except BaseException as exc:  # reported by the main thread
        run.error = exc


def run_demo(config: DemoConfig | None = None) -> int:
    """Run the demo; returns the exit status (0 when every check passed)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from streamrnn.cli.process import WorkerProcess
    from streamrnn.client.client import Client

    config = config or DemoConfig()
    console = Console()
    console.print(f"[bold]streamrnn demo[/]: {config.streams} streams x {config.steps} steps, "
                  f"2-layer LSTM ({FEATURES} -> {UNITS} -> {UNITS} -> {OUTPUTS}), "
                  f"{config.slots} slots")
    model = build_demo_model(config.seed)
    runs = _plan_streams(config)
    total_steps = config.streams * config.steps
    with tempfile.TemporaryDirectory(prefix="streamrnn-demo-") as tmp:
        model_path = Path(tmp) / "demo_lstm.keras"
        model.save(model_path)
        with console.status("starting worker (loads TensorFlow, traces the step)..."):
            worker = WorkerProcess.start(model_path, config.slots,
                                         "--xla" if config.xla else "--no-xla",
                                         "--executor", config.executor,
                                         log_path=Path(tmp) / "worker.log")
        console.print(f"worker ready on {worker.endpoint} (pid {worker.proc.pid})")
        try:
            with Client(worker.endpoint, timeout=30) as client:
                console.print(f"kernel: {client.ping()['worker'].get('kernel')}")
                done = [0]
                threads = [threading.Thread(target=_drive, args=(client, run, config.window, done),
                                            daemon=True) for run in runs]
                columns = [TextColumn("[bold]streaming"), BarColumn(),
                           TextColumn("{task.completed:,}/{task.total:,} steps"),
                           TextColumn("{task.fields[rate]:>9,.0f} steps/s"), TimeElapsedColumn()]
                start = time.perf_counter()
                with Progress(*columns, console=console) as progress:
                    task = progress.add_task("streams", total=total_steps, rate=0.0)
                    for thread in threads:
                        thread.start()
                    while any(t.is_alive() for t in threads):
                        time.sleep(0.1)
                        elapsed = time.perf_counter() - start
                        progress.update(task, completed=done[0], rate=done[0] / elapsed)
                    progress.update(task, completed=done[0])
                seconds = time.perf_counter() - start
                worker_stats = client.stats()
        finally:
            exit_code = worker.stop()
    failed = [run for run in runs if run.error is not None]
    for run in failed[:5]:
        console.print(f"[red]stream {run.name} failed: {run.error!r}")
    checked = [run for run in runs if run.error is None]
    checked = ([r for r in checked if r.reset_at is not None][: max(1, config.verify // 2)]
               + [r for r in checked if r.reset_at is None])[: config.verify]
    max_diff = max((_offline_diff(model, run) for run in checked), default=float("nan"))
    latencies = np.array([x for run in runs for x in run.latencies]) * 1000
    counts = worker_stats.get("counts", {})
    table = Table(title="streamrnn demo results", show_header=False)
    table.add_row("timesteps", f"{done[0]:,} in {seconds:.2f} s")
    table.add_row("throughput", f"{done[0] / seconds:,.0f} timesteps/s")
    if latencies.size:
        table.add_row("chunk latency", f"p50 {np.percentile(latencies, 50):.1f} ms, "
                                       f"p99 {np.percentile(latencies, 99):.1f} ms")
    batches = max(counts.get("batches", 0), 1)
    table.add_row("worker", f"{counts.get('batches', 0):,} batched steps, "
                            f"{counts.get('applied_push', 0) / batches:.1f} chunks per step, "
                            f"{counts.get('busy', 0)} BUSY answers")
    table.add_row("verified", f"{len(checked)} streams vs offline model: max abs diff "
                              f"{max_diff:.2e}")
    for run in checked[:3]:
        last = run.outputs[-1][-1] if run.outputs else np.zeros(0)
        table.add_row(f"{run.name} last output", np.array2string(last[:4], precision=4))
    table.add_row("worker exit", str(exit_code))
    console.print(table)
    ok = not failed and max_diff <= 1e-5 and exit_code == 0
    console.print("[bold green]OK[/]" if ok else "[bold red]FAILED[/]")
    return 0 if ok else 1


def _offline_diff(model, run: _StreamRun) -> float:
    """Max abs diff between the streamed outputs and one offline call per reset segment."""
    streamed = np.concatenate(run.outputs)
    bounds = [0, run.reset_at, len(run.inputs)] if run.reset_at else [0, len(run.inputs)]
    diffs = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        offline = np.asarray(model(run.inputs[None, a:b]))[0]
        diffs.append(float(np.abs(streamed[a:b] - offline).max()))
    return max(diffs)
