"""``streamrnn bench``: run the benchmark suites and write ``bench/results/report.md`` with
PNG plots. Needs the source checkout (``bench/`` is not installed).

The kernel suites (``bench/test_bench_kernel.py``: the Keras step's variants;
``bench/test_bench_executors.py``: the executors against the raw ONNX Runtime and torch
peers and the GEMM ceilings, beside a CPU hog, over slots x chunk, bf16) always run; ``--e2e``
adds the end-to-end suite through a worker, once per executor with ``--executors``.

Example::

    streamrnn bench --e2e          # kernel suites, then the end-to-end suite through a worker
    streamrnn bench --e2e --executors onnxruntime,keras,torch   # e2e once per executor
    streamrnn bench --no-run       # re-render the report from the existing JSON
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``streamrnn bench``."""
    parser.add_argument("--long", action="store_true", help="the full grid (much longer)")
    parser.add_argument("--e2e", action="store_true",
                        help="also run bench/test_bench_e2e.py (engine vs kernel-only, latency)")
    parser.add_argument("--executors", default=None,
                        help="with --e2e: comma-separated executors to run it with, one run "
                             "each (default: the engine's default)")
    parser.add_argument("--out", default=None, help="output folder (default bench/results)")
    parser.add_argument("--no-run", action="store_true", help="re-render from existing JSON")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the suites (unless ``--no-run``) and render the report; returns the exit status."""
    bench_dir = Path(__file__).resolve().parents[2] / "bench"  # <root>/streamrnn/cli/bench.py
    report_path = bench_dir / "report.py"
    if not report_path.exists():
        raise SystemExit(f"streamrnn bench needs the source checkout: {report_path} not found "
                         "(install with `pip install -e .` from a clone)")
    out = Path(args.out) if args.out else bench_dir / "results"
    if args.e2e and not args.no_run:
        out.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if args.executors:
            env["STREAMRNN_E2E_EXECUTORS"] = args.executors
        subprocess.run([sys.executable, "-m", "pytest", str(bench_dir / "test_bench_e2e.py"),
                        "-q", "-p", "no:cacheprovider", f"--benchmark-json={out / 'e2e.json'}"],
                       check=True, cwd=bench_dir.parent, env=env)
    spec = importlib.util.spec_from_file_location("streamrnn_bench_report", report_path)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    argv = ["--out", str(out)] + (["--long"] if args.long else []) + (
        ["--no-run"] if args.no_run else [])
    return int(report.main(argv) or 0)
