"""Benchmark report: runs the kernel suites and writes a markdown report plus PNG plots.

    python bench/report.py              # quick kernel grid + executors (minutes on 2 cores)
    python bench/report.py --long       # the full grids (slots x chunk x every variant)
    python bench/report.py --no-run     # re-render from the JSON already in --out

Reads pytest-benchmark JSON (``--benchmark-json``), the common format of every suite in
``bench/``: ``kernel.json`` is written here by ``bench/test_bench_kernel.py`` (the Keras
step's variants, the GEMM ceiling, the torch peer) and ``bench/test_bench_executors.py``
(the executors against the raw ONNX Runtime ``LSTM`` op and torch ``nn.LSTM`` peers and
the GEMM ceilings, beside a CPU hog, over slots x chunk, bf16); any other ``*.json`` in the
output folder (e.g. ``e2e.json`` from ``pytest bench/test_bench_e2e.py --benchmark-json
bench/results/e2e.json``) is added as its own table. GPU: every ``gpu_torch*.json`` (written
by ``bench/gpu_torch.py --out``) in ``bench/`` or the output folder, and
``bench/gpu_cudnn_h100.json`` (``bench/gpu_cudnn.py``). Output: ``report.md``,
``kernel_vs_slots.png``, ``kernel_vs_chunk.png``, ``kernel_headline.png``. The sections
live in ``report_kernel.py``, ``report_executors.py`` and ``report_gpu.py``.

Entry point for ``streamrnn bench``: :func:`main` (argv list) or :func:`build_report`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # loaded by path (streamrnn bench): the sections sit here
    sys.path.insert(0, str(BENCH))

from report_executors import e2e_table, executor_sections  # noqa: E402
from report_format import load, machine, other_table  # noqa: E402
from report_gpu import gpu_cudnn_table, gpu_torch_section  # noqa: E402
from report_kernel import headline, kernel_table, partial_table, plots  # noqa: E402

__all__ = ["KERNEL_SUITES", "build_report", "main", "run_kernel_suite"]

RESULTS = BENCH / "results"
GPU_CUDNN_JSON = BENCH / "gpu_cudnn_h100.json"
KERNEL_SUITES = ("test_bench_kernel.py", "test_bench_executors.py")


def run_kernel_suite(out_dir: Path, long: bool = False, extra_args: Iterable[str] = (),
                     suites: Iterable[str] = KERNEL_SUITES) -> Path:
    """Run the kernel ``suites`` under one pytest; returns the JSON path it wrote."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "kernel.json"
    env = dict(os.environ, STREAMRNN_BENCH="full" if long else "quick")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cmd = [
        sys.executable, "-m", "pytest", *(str(BENCH / s) for s in suites), "-q",
        "-p", "no:cacheprovider", f"--benchmark-json={path}", *extra_args,
    ]
    subprocess.run(cmd, check=True, env=env, cwd=BENCH.parent)
    return path


def _grid_name(rows: list[dict], long: bool) -> str:
    return next((r["grid"] for r in rows if "grid" in r), "full" if long else "quick")


def _kernel_parts(rows: list[dict], kernel_json: Path, images: list[Path], long: bool
                  ) -> list[str]:
    parts = [
        "# streamrnn benchmark report", "",
        f"Machine: {machine(kernel_json)}. Kernel suite: `bench/test_bench_kernel.py` "
        f"({_grid_name(rows, long)} grid; model Input(T, 64) -> LSTM(256) -> Dense(64); "
        "each case times `ModelRunner.run` on a full batch) and "
        "`bench/test_bench_executors.py` (the executors and their peers, each in its own "
        "process). Ratios marked *interleaved* alternate rounds of the kernels under the "
        "same load; plain rates drift with whatever else runs on this machine.", "",
        "## Headline", "", headline(rows), "",
        *[f"![{p.stem}]({p.name})" for p in images], "",
    ]
    parts += [s + "\n" for s in executor_sections(rows)]
    parts += ["## Kernel step", "", kernel_table(rows), ""]
    partial = partial_table(rows)
    return parts + ([partial, ""] if partial else [])


def _extra_parts(out_dir: Path) -> list[str]:
    """Every other pytest-benchmark file in ``out_dir`` (the e2e suite's, ...)."""
    parts: list[str] = []
    for extra in sorted(out_dir.glob("*.json")):
        if extra.name == "kernel.json" or extra.name.startswith("gpu_torch"):
            continue
        rows_extra = load(extra) if "benchmarks" in json.loads(extra.read_text()) else None
        e2e = e2e_table(rows_extra) if rows_extra else None
        if e2e:
            parts += [e2e, ""]
        elif rows_extra:  # other suites' pytest-benchmark JSON (generate, training, ...)
            parts += [other_table(rows_extra, f"{extra.stem} ({extra.name})"), ""]
        else:
            parts += [f"### {extra.name}", "", "(not pytest-benchmark JSON; not rendered)", ""]
    return parts


def _gpu_parts(out_dir: Path) -> list[str]:
    found = {p.resolve() for d in (BENCH, out_dir) for p in d.glob("gpu_torch*.json")}
    parts = [gpu_torch_section(sorted(found)), ""]
    if GPU_CUDNN_JSON.exists():
        parts += [gpu_cudnn_table(GPU_CUDNN_JSON), ""]
    return parts


def build_report(out_dir: Path = RESULTS, run: bool = True, long: bool = False) -> Path:
    """Run the kernel suites (unless ``run`` is False) and write ``report.md`` + PNGs."""
    out_dir = Path(out_dir)
    kernel_json = out_dir / "kernel.json"
    if run:
        run_kernel_suite(out_dir, long=long)
    if not kernel_json.exists():
        raise FileNotFoundError(f"{kernel_json} missing: run without --no-run first")
    rows = load(kernel_json)
    parts = _kernel_parts(rows, kernel_json, plots(rows, out_dir), long)
    parts += _extra_parts(out_dir) + _gpu_parts(out_dir)
    report = out_dir / "report.md"
    report.write_text("\n".join(parts))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the kernel benchmarks and write a report.")
    p.add_argument("--long", action="store_true", help="the full grids (much longer)")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    p.add_argument("--no-run", action="store_true", help="re-render from existing JSON")
    a = p.parse_args(argv)
    report = build_report(a.out, run=not a.no_run, long=a.long)
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
