"""The ``streamrnn`` command.

Subcommands::

    streamrnn worker  --model M.keras --slots 64 --bind tcp://127.0.0.1:5555
    streamrnn publish data.npy --stream ID --chunk 32 --endpoint E [--out out.npy]
    streamrnn demo    [--streams 48 --steps 400]

plus ``trainer``, ``router``, ``bench`` and ``keys``. Each lives in its own module
``streamrnn.cli.<name>`` (``add_arguments(parser)`` and ``run(args)``) and is registered in
:data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from streamrnn.logs import quiet_frameworks

__all__ = ["SUBCOMMANDS", "build_parser", "main"]


def _subcommand(name: str, help: str, description: str
                ) -> Callable[[argparse._SubParsersAction], None]:
    """Registers subcommand ``name``: the options (``add_arguments``) and ``run`` of
    :mod:`streamrnn.cli.<name>` (for a process, the module behind
    ``python -m streamrnn.cli.<name>``)."""

    def register(subparsers: argparse._SubParsersAction) -> None:
        module = importlib.import_module(f"streamrnn.cli.{name}")
        parser = subparsers.add_parser(name, help=help, description=description)
        module.add_arguments(parser)
        parser.set_defaults(func=module.run)

    return register


#: name -> registration function.
SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "worker": _subcommand(
        "worker", help="serve a Keras RNN to many streams over ZeroMQ",
        description="Serve a trained Keras RNN model to many concurrent streams over ZeroMQ "
                    "(wire format: docs/protocol.md)."),
    "publish": _subcommand(
        "publish", help="stream a .npy sequence to a worker in chunks",
        description="Send a sequence (.npy: [T, D] floats or [T] token ids) to a worker in "
                    "chunks and collect the outputs. If the worker already holds the stream "
                    "it is reset first, unless --append."),
    "demo": _subcommand(
        "demo", help="run a worker on loopback and drive many concurrent streams",
        description="Build a small LSTM, start a real worker process on loopback, publish many "
                    "concurrent synthetic streams (with resets), verify a sample against the "
                    "offline model, and print throughput and latency. Needs no files."),
    "trainer": _subcommand(
        "trainer", help="train a Keras RNN decoder online on streams (free-running)",
        description="Train a Keras RNN decoder on training streams published over ZeroMQ, "
                    "feeding its own outputs back in (free-running / scheduled sampling); "
                    "checkpoints, resumes, and publishes weight versions for workers "
                    "(--weights-from)."),
    "bench": _subcommand(
        "bench", help="run the benchmark suites and write the report (bench/results/)",
        description="Run the kernel benchmark suite (and with --e2e the end-to-end suite "
                    "through a real worker) and write bench/results/report.md with PNG plots. "
                    "Needs the source checkout (bench/ is not installed)."),
    "keys": _subcommand(
        "keys", help="make a CURVE key pair or an HMAC key (secret files 0600)",
        description="Make the secret files of a deployment, readable by their owner only: "
                    "'keys curve DIR NAME' writes DIR/NAME.key and DIR/NAME.key_secret "
                    "(--curve-secret-key, --curve-allow), 'keys hmac FILE' a key for "
                    "--checkpoint-key."),
    "router": _subcommand(
        "router", help="one endpoint in front of many workers (stateless, replicated)",
        description="Route streams to the workers that hold them, read from Redis "
                    "(--store; workers run with the same --store): a stream with no live "
                    "holder goes to the least-loaded live worker, which claims it; run "
                    "several routers on one store and give clients all of them."),
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
    quiet_frameworks()  # before anything imports TensorFlow ($STREAMRNN_FRAMEWORK_LOGS=1: not)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
