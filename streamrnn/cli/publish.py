"""``streamrnn publish``: send a ``.npy`` sequence to a worker (or router) in chunks and
collect the outputs.

The sequence is ``(T, D)`` float features or ``(T,)`` int token ids; the outputs
``(T, output_dim)`` are saved with ``--out``. If the worker already holds the stream it is
reset first, unless ``--append``.

Example::

    streamrnn publish data.npy --stream s1 --chunk 32 --endpoint tcp://127.0.0.1:5555 \\
        --out out.npy
"""

from __future__ import annotations

import argparse
import time

import numpy as np

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``streamrnn publish``."""
    parser.add_argument("data", help=".npy file: [T, D] float features or [T] int token ids")
    parser.add_argument("--stream", required=True, help="stream id")
    parser.add_argument("--chunk", type=int, default=32, help="timesteps per chunk")
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:5555", help="worker endpoint")
    parser.add_argument("--out", default=None, help="save the outputs [T, output_dim] here")
    parser.add_argument("--append", action="store_true",
                        help="continue the stream's current state instead of resetting it")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per reply")
    return parser


def run(args: argparse.Namespace) -> int:
    """Publish ``args.data`` and print the throughput; returns the exit status."""
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
