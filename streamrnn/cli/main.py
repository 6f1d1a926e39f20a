"""The ``streamrnn`` command.

Subcommands::

    streamrnn worker  --model M.keras --slots 64 --bind tcp://127.0.0.1:5555
    streamrnn publish data.npy --stream ID --chunk 32 --endpoint E [--out out.npy]
    streamrnn demo    [--streams 48 --steps 400]

Each subcommand is registered by one ``_add_<name>(subparsers)`` function in
:data:`SUBCOMMANDS`; ``trainer``, ``router`` and ``bench`` slot in the same way.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import numpy as np


def _add_worker(subparsers: argparse._SubParsersAction) -> None:
    from streamrnn.cli.worker import add_arguments, run

    parser = subparsers.add_parser(
        "worker", help="serve a Keras RNN to many streams over ZeroMQ",
        description="Serve a trained Keras RNN model to many concurrent streams over ZeroMQ "
                    "(wire format: docs/protocol.md).")
    add_arguments(parser)
    parser.set_defaults(func=run)


def _add_publish(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "publish", help="stream a .npy sequence to a worker in chunks",
        description="Send a sequence (.npy: [T, D] floats or [T] token ids) to a worker in "
                    "chunks and collect the outputs. If the worker already holds the stream "
                    "it is reset first, unless --append.")
    parser.add_argument("data", help=".npy file: [T, D] float features or [T] int token ids")
    parser.add_argument("--stream", required=True, help="stream id")
    parser.add_argument("--chunk", type=int, default=32, help="timesteps per chunk")
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:5555", help="worker endpoint")
    parser.add_argument("--out", default=None, help="save the outputs [T, output_dim] here")
    parser.add_argument("--append", action="store_true",
                        help="continue the stream's current state instead of resetting it")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per reply")
    parser.set_defaults(func=_publish)


def _publish(args: argparse.Namespace) -> int:
    import time

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from streamrnn.client.client import Client

    if args.chunk < 1:
        raise SystemExit("--chunk must be >= 1")
    data = np.load(args.data, mmap_mode="r", allow_pickle=False)
    chunks = [np.ascontiguousarray(data[i:i + args.chunk])
              for i in range(0, len(data), args.chunk)]
    console = Console(stderr=True)
    outputs: list[np.ndarray] = []
    start = time.perf_counter()
    with Client(args.endpoint, timeout=args.timeout) as client:
        if not args.append and client.open(args.stream)["next_seq"] > 0:
            client.reset(args.stream)
        columns = [TextColumn("[bold]{task.description}"), BarColumn(),
                   MofNCompleteColumn(), TextColumn("chunks"),
                   TextColumn("{task.fields[rate]:>10,.0f} steps/s")]
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(f"publish {args.stream}", total=len(chunks), rate=0.0)
            steps = 0
            for output in client.push_iter(args.stream, chunks):
                outputs.append(output)
                steps += len(output)
                rate = steps / max(time.perf_counter() - start, 1e-9)
                progress.update(task, advance=1, rate=rate)
    seconds = time.perf_counter() - start
    result = np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)
    if args.out:
        np.save(args.out, result)
    print(f"published {len(data)} steps in {len(chunks)} chunks to stream {args.stream!r} in "
          f"{seconds:.2f} s ({len(data) / max(seconds, 1e-9):,.0f} steps/s); outputs "
          f"{list(result.shape)}" + (f" saved to {args.out}" if args.out else ""))
    return 0


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="run a worker on loopback and drive many concurrent streams",
        description="Build a small LSTM, start a real worker process on loopback, publish many "
                    "concurrent synthetic streams (with resets), verify a sample against the "
                    "offline model, and print throughput and latency. Needs no files.")
    parser.add_argument("--streams", type=int, default=48, help="concurrent streams")
    parser.add_argument("--steps", type=int, default=400, help="timesteps per stream")
    parser.add_argument("--slots", type=int, default=64, help="worker slots")
    parser.add_argument("--max-chunk", type=int, default=64, help="longest random chunk")
    parser.add_argument("--verify", type=int, default=6, help="streams checked offline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--xla", action="store_true",
                        help="compile the worker's step with XLA (faster steps, slower start)")
    parser.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from streamrnn.cli.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(streams=args.streams, steps=args.steps, slots=args.slots,
                               max_chunk=args.max_chunk, verify=args.verify, seed=args.seed,
                               xla=args.xla))


def _add_trainer(subparsers: argparse._SubParsersAction) -> None:
    from streamrnn.cli.trainer import add_arguments, run

    parser = subparsers.add_parser(
        "trainer", help="train a Keras RNN decoder online on streams (free-running)",
        description="Train a Keras RNN decoder on training streams published over ZeroMQ, "
                    "feeding its own outputs back in (free-running / scheduled sampling); "
                    "checkpoints, resumes, and publishes weight versions for workers "
                    "(--weights-from).")
    add_arguments(parser)
    parser.set_defaults(func=run)


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="run the benchmark suites and write the report (bench/results/)",
        description="Run the kernel benchmark suite (and with --e2e the end-to-end suite "
                    "through a real worker) and write bench/results/report.md with PNG plots. "
                    "Needs the source checkout (bench/ is not installed).")
    parser.add_argument("--long", action="store_true", help="the full grid (much longer)")
    parser.add_argument("--e2e", action="store_true",
                        help="also run bench/test_bench_e2e.py (engine vs kernel-only, latency)")
    parser.add_argument("--out", default=None, help="output folder (default bench/results)")
    parser.add_argument("--no-run", action="store_true", help="re-render from existing JSON")
    parser.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    import importlib.util
    import subprocess
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parent.parent / "bench"
    report_path = bench_dir / "report.py"
    if not report_path.exists():
        raise SystemExit(f"streamrnn bench needs the source checkout: {report_path} not found "
                         "(install with `pip install -e .` from a clone)")
    out = Path(args.out) if args.out else bench_dir / "results"
    if args.e2e and not args.no_run:
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pytest", str(bench_dir / "test_bench_e2e.py"),
                        "-q", "-p", "no:cacheprovider", f"--benchmark-json={out / 'e2e.json'}"],
                       check=True, cwd=bench_dir.parent)
    spec = importlib.util.spec_from_file_location("streamrnn_bench_report", report_path)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    argv = ["--out", str(out)] + (["--long"] if args.long else []) + (
        ["--no-run"] if args.no_run else [])
    return int(report.main(argv) or 0)


def _add_router(subparsers: argparse._SubParsersAction) -> None:
    from streamrnn.cli.router import add_arguments, run

    parser = subparsers.add_parser(
        "router", help="one endpoint in front of many workers (sticky, failover)",
        description="Route streams to registered workers (streamrnn worker --register): "
                    "least-loaded admission, sticky routing, heartbeats, failover of a dead "
                    "worker's streams from the shared checkpoint directory.")
    add_arguments(parser)
    parser.set_defaults(func=run)


#: name -> registration function.
SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "worker": _add_worker,
    "publish": _add_publish,
    "demo": _add_demo,
    "trainer": _add_trainer,
    "bench": _add_bench,
    "router": _add_router,
}


def build_parser() -> argparse.ArgumentParser:
    from streamrnn import __version__

    parser = argparse.ArgumentParser(
        prog="streamrnn",
        description="Serve recurrent Keras models over unbounded streams (ZeroMQ).")
    parser.add_argument("--version", action="version", version=f"streamrnn {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in SUBCOMMANDS.values():
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``streamrnn`` console script."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
