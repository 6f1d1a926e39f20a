"""Benchmark report: runs the kernel suite and writes a markdown table plus PNG plots.

    python bench/report.py              # quick kernel grid (a few minutes on 2 cores)
    python bench/report.py --long       # the full grid (slots x chunk x every variant)
    python bench/report.py --no-run     # re-render from the JSON already in --out

Reads pytest-benchmark JSON (``--benchmark-json``), the common format of every suite in
``bench/``: the kernel suite's file is written here; any other ``*.json`` in the output folder
(e.g. ``e2e.json`` from ``pytest bench/test_bench_e2e.py --benchmark-json
bench/results/e2e.json``) is added as its own table (name, rate and ``extra_info``), and
``bench/gpu_cudnn_h100.json`` (written by ``bench/gpu_cudnn.py`` on a GPU box) as the cuDNN
table. Output: ``bench/results/report.md``, ``kernel_vs_slots.png``,
``kernel_vs_chunk.png``, ``kernel_headline.png``.

Entry point for a ``streamrnn bench`` subcommand: :func:`main` (argv list) or
:func:`build_report`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
GPU_JSON = BENCH / "gpu_cudnn_h100.json"
HEADLINE = (64, 16)


# ---- running ---------------------------------------------------------------------------


def run_kernel_suite(out_dir: Path, long: bool = False, extra_args: Iterable[str] = ()) -> Path:
    """Run ``bench/test_bench_kernel.py`` under pytest; returns the JSON path it wrote."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "kernel.json"
    env = dict(os.environ, STREAMRNN_BENCH="full" if long else "quick")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cmd = [
        sys.executable, "-m", "pytest", str(BENCH / "test_bench_kernel.py"), "-q",
        "-p", "no:cacheprovider", f"--benchmark-json={path}", *extra_args,
    ]
    subprocess.run(cmd, check=True, env=env, cwd=BENCH.parent)
    return path


# ---- reading ---------------------------------------------------------------------------


def load(path: Path) -> list[dict]:
    """pytest-benchmark JSON -> one dict per benchmark: name, stats, extra_info merged."""
    data = json.loads(path.read_text())
    rows = []
    for b in data.get("benchmarks", []):
        row = {"name": b["name"], "median_s": b["stats"]["median"], "min_s": b["stats"]["min"]}
        row.update(b.get("extra_info", {}))
        rows.append(row)
    return rows


def machine(path: Path) -> str:
    info = json.loads(path.read_text()).get("machine_info", {})
    cpu = info.get("cpu", {})
    return (
        f"{cpu.get('brand_raw', info.get('processor', '?'))}, "
        f"{cpu.get('count', '?')} logical CPUs, Python {info.get('python_version', '?')}"
    )


def label(row: dict) -> str:
    variant = row.get("variant", row["name"])
    if variant in ("keras-lstm", "keras-rnn-cell", "fused"):
        return f"{variant} ({'XLA' if row.get('xla') else 'no XLA'})"
    return variant


# ---- rendering -------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


def kernel_table(rows: list[dict]) -> str:
    lines = [
        "| variant | slots | chunk | timesteps/s (median) | timesteps/s (best round) | "
        "GFLOP/s | x Keras LSTM+XLA (interleaved) | compile s | kernel |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    steps = [r for r in rows if r.get("slots") is not None]
    steps.sort(key=lambda r: (r["slots"], r["chunk"], label(r)))
    for r in steps:
        lines.append(
            f"| {label(r)} | {r['slots']} | {r['chunk']} | {_fmt(r.get('timesteps_per_s'))} | "
            f"{_fmt(r.get('timesteps_per_s_best'))} | {_fmt(r.get('gflops'), 1)} | "
            f"{_fmt(r.get('ratio_vs_keras_lstm_xla'), 2)} | {_fmt(r.get('compile_s'), 1)} | "
            f"{r.get('kernel', '')} |"
        )
    return "\n".join(lines)


def _variant_line(name: str, r: dict, torch: dict | None) -> str:
    """One headline bullet for a variant of the step."""
    parts = [f"- **{name}**: {_fmt(r['timesteps_per_s'])} timesteps/s, "
             f"{_fmt(r['gflops'], 1)} GFLOP/s"]
    if r.get("ratio_vs_keras_lstm_xla") is not None:
        parts.append(f"{r['ratio_vs_keras_lstm_xla']:.2f}x Keras LSTM+XLA (interleaved)")
    if r.get("fraction_of_gemm") is not None:
        parts.append(f"{100 * r['fraction_of_gemm']:.0f}% of the interleaved GEMM ceiling "
                     f"({r['gemm_gflops_interleaved']:.1f} GFLOP/s)")
    if torch and name == "fused (XLA)" and "ratio_fused_vs_torch_interleaved" in torch:
        parts.append(f"**{torch['ratio_fused_vs_torch_interleaved']:.2f}x torch nn.LSTM "
                     "(interleaved**, per pair "
                     f"{', '.join(f'{v:.2f}' for v in torch['ratios_fused_vs_torch'])})")
    elif torch:
        parts.append(f"{r['timesteps_per_s'] / torch['timesteps_per_s']:.2f}x torch nn.LSTM "
                     "(not interleaved)")
    return ", ".join(parts)


def _chain_line(chain: dict, fused: dict | None, torch: dict | None) -> str:
    """The bound that the recurrent GEMMs alone under XLA put on any XLA step."""
    units = chain["dot_units"]
    line = (f"- **the recurrent GEMMs alone under XLA** ({chain['dot_chunk']} chained "
            f"({chain['dot_slots']}, {units}) @ ({units}, {4 * units}) dots, nothing else): "
            f"{chain['gflops']:.1f} GFLOP/s, **{100 * chain['fraction_of_gemm']:.0f}% of "
            f"the interleaved GEMM ceiling** ({chain['gemm_gflops_interleaved']:.1f} GFLOP/s)")
    if fused:
        # bound of a step whose recurrent dots run at the chain's rate, the rest for free
        share = 2 * units * 4 * units / fused["flops_per_timestep"]
        bound = 1 / (share / chain["fraction_of_gemm"] + 1 - share)
        line += (f". They are {100 * share:.0f}% of the step's FLOPs, so an XLA step at "
                 f"this shape stays below {100 * bound:.0f}% of the ceiling even if "
                 "everything else were free")
        if torch:
            dots_rate = chain["gflops"] * 1e9 / (2 * units * 4 * units)  # timesteps/s
            line += (f", and below {dots_rate / torch['timesteps_per_s']:.2f}x torch "
                     "nn.LSTM (whose whole step is compared)")
    return line


def headline(rows: list[dict]) -> str:
    """Ratios at slots=64, chunk 16: the issue's targets."""
    at = {label(r): r for r in rows if (r.get("slots"), r.get("chunk")) == HEADLINE}
    gemm = next((r for r in rows if r.get("variant") == "gemm"), None)
    torch = at.get("torch-nn.LSTM")
    out = [f"At slots={HEADLINE[0]}, chunk {HEADLINE[1]}, 64 features, 256 units:", ""]
    out += [_variant_line(name, at[name], torch)
            for name in ("fused (XLA)", "fused (no XLA)", "keras-lstm (XLA)",
                         "keras-lstm (no XLA)", "keras-rnn-cell (XLA)", "keras-rnn-cell (no XLA)")
            if name in at]
    if torch:
        out.append(f"- **torch nn.LSTM** ({torch.get('peer_output', '').splitlines()[0]}): "
                   f"{_fmt(torch['timesteps_per_s'])} timesteps/s, "
                   f"{_fmt(torch['gflops'], 1)} GFLOP/s (its own GEMM: "
                   f"{torch.get('torch_gemm_gflops', 0):.1f} GFLOP/s)")
    if gemm:
        out.append(f"- **GEMM ceiling** (2048^3 tf.matmul, own test): "
                   f"{gemm['gflops']:.1f} GFLOP/s median, {gemm['gflops_best']:.1f} best")
    chain = next((r for r in rows if r.get("variant") == "xla-dot-chain"), None)
    if chain:
        out.append(_chain_line(chain, at.get("fused (XLA)"), torch))
    best = at.get("fused (XLA)") or at.get("keras-lstm (XLA)")
    for r in (r for r in rows if r.get("variant") == "predict-recipe"):
        tail = ""
        if best:
            tail = f"; the engine step is {best['timesteps_per_s'] / r['timesteps_per_s']:,.0f}x"
        out.append(f"- **predict([x, h, c]) per step**, batch {r['slots']}: "
                   f"{_fmt(r['timesteps_per_s'])} timesteps/s{tail}")
    return "\n".join(out)


def partial_table(rows: list[dict]) -> str | None:
    """Partly filled steps (``suite == "kernel-partial"``): compact vs every row."""
    cases = sorted((r for r in rows if r.get("suite") == "kernel-partial"),
                   key=lambda r: r["busy"])
    if not cases:
        return None
    lines = [
        "## Partly filled steps", "",
        "`test_partly_filled_step`: 64 slots, some of them with a 16-step chunk (fused, XLA). "
        "The compact step gathers the busy slots' rows into a batch of a quarter or half of "
        "the slots; the reference computes every row (interleaved).", "",
        "| busy slots | compact timesteps/s | every row timesteps/s | compact / every row |",
        "|---|---|---|---|",
    ]
    for r in cases:
        lines.append(f"| {r['busy']} of {r['total_slots']} | {_fmt(r['timesteps_per_s'])} | "
                     f"{_fmt(r['full_timesteps_per_s'])} | **{r['ratio_vs_full']:.2f}x** |")
    return "\n".join(lines)


def e2e_table(rows: list[dict]) -> str | None:
    """The end-to-end suite's rows (``suite == "e2e"``): e2e vs kernel-only per chunk length,
    and the latency line; None if the file holds none of them."""
    cases = [r for r in rows if r.get("suite") == "e2e" and "ratio_vs_kernel" in r]
    latency = [r for r in rows if r.get("suite") == "e2e" and "latency_p50_ms" in r]
    if not cases and not latency:
        return None
    first = cases[0] if cases else {}
    window = first.get("window", 3)
    wire = ("chunks of many streams in one BATCH message each way" if first.get("batch", True)
            else "one message per chunk")
    lines = [
        "## End to end through ZeroMQ vs kernel-only", "",
        f"`bench/test_bench_e2e.py`: a real worker process and one `Client` (64 streams, "
        f"{window} chunks in flight each, {wire}) on the same machine, vs `engine.push_many` "
        "in-process; the two alternate and the ratio is the median of the per-pair ratios "
        "(target >= 0.9)."
        + (" The worker coalesces: a stream's queued consecutive chunks share a step, so a "
           "step can carry more chunks than slots." if first.get("coalesce") else ""),
        "", "| chunk | slots | kernel-only timesteps/s | e2e timesteps/s | e2e / kernel | "
        "per pair | chunks per step | CPU us per chunk: worker / client |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(cases, key=lambda r: r["chunk"]):
        lines.append(
            f"| {r['chunk']} | {r['slots']} | {_fmt(r['kernel_timesteps_per_s'])} | "
            f"{_fmt(r['timesteps_per_s'])} | **{r['ratio_vs_kernel']:.2f}** | "
            f"{', '.join(f'{v:.2f}' for v in r.get('ratios', []))} | "
            f"{r.get('chunks_per_batch', float('nan')):.1f} | "
            f"{_fmt(r.get('worker_cpu_us_per_chunk'))} / "
            f"{_fmt(r.get('client_cpu_us_per_chunk'))} |")
    for r in latency:
        lines += ["", f"Latency, open loop at half the measured e2e rate "
                      f"({_fmt(r['offered_timesteps_per_s'])} timesteps/s offered, chunks of "
                      f"{r['chunk']}): p50 {r['latency_p50_ms']:.1f} ms, "
                      f"p99 {r['latency_p99_ms']:.1f} ms."]
    return "\n".join(lines)


def other_table(rows: list[dict], title: str) -> str:
    lines = [f"### {title}", "", "| benchmark | median s | extra_info |", "|---|---|---|"]
    for r in rows:
        extra = {k: v for k, v in r.items() if k not in ("name", "median_s", "min_s")}
        text = ", ".join(
            f"{k}={v:,.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()
        )
        lines.append(f"| {r['name']} | {r['median_s']:.4g} | {text} |")
    return "\n".join(lines)


def gpu_table(path: Path) -> str:
    data = json.loads(path.read_text())
    lines = [
        "### cuDNN vs non-cuDNN (GPU, Keras 3 on its torch backend)", "",
        f"`{data['command']}`", "",
        "| run | case | chunk | cuDNN timesteps/s | non-cuDNN timesteps/s | ratio | "
        "max abs diff | kernels (cuDNN / other) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for run in data["runs"]:
        env = run[0]
        for r in run[1:]:
            if r["case"] == "unmasked":
                lines.append(
                    f"| {env['run']} ({env['device']}) | all slots busy, no mask | {r['chunk']} | "
                    f"{_fmt(r['cudnn_timesteps_s'])} | {_fmt(r['plain_timesteps_s'])} | "
                    f"{r['ratio']:.1f}x | {r['max_abs_diff_out']:.1e} | "
                    f"{r['kernel_cudnn']} / {r['kernel_plain']} |"
                )
            elif r["case"] == "active-rows":
                lines.append(
                    f"| {env['run']} | {r['active']}/{r['slots']} busy: gather+cuDNN vs masked | "
                    f"{r['chunk']} | {_fmt(r['gather_cudnn_timesteps_s'])} | "
                    f"{_fmt(r['masked_timesteps_s'])} | {r['ratio']:.1f}x | "
                    f"{r['max_abs_diff_out']:.1e} | {r['kernel_gather']} / {r['kernel_masked']} |"
                )
            elif r["case"] == "mask" and env["run"] == data["runs"][0][0]["run"]:
                what = r.get("error") or f"ran {r['kernel']}, max diff {r['max_abs_diff']:.1e}"
                notes.append(f"- mask *{r['mask']}*, use_cudnn={r['use_cudnn']}: {what}")
    return "\n".join(lines + ["", "Masks (Keras 3.15, torch backend):", *notes])


def _save(fig, path: Path, written: list[Path]) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)


def _sweep(steps: list[dict], ceiling: float | None, gemm: dict | None, axis: str, fixed: str,
           fixed_value: int, title: str):
    """Timesteps/s (best round) of each variant along ``axis`` with ``fixed`` held."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in steps:
        if r[fixed] == fixed_value and r.get("variant") != "torch-nn.LSTM":
            series.setdefault(label(r), []).append((r[axis], r["timesteps_per_s_best"]))
    for name, pts in sorted(series.items()):
        if len(pts) < 2:
            continue
        pts.sort()
        style = "-" if "fused" in name else "--"
        ax.plot(*zip(*pts, strict=True), style, marker="o", label=name)
    if ceiling:
        ax.axhline(ceiling, color="black", lw=1, ls=":",
                   label=f"GEMM ceiling ({gemm['gflops_best']:.0f} GFLOP/s, best round)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(axis if axis != "chunk" else "chunk length (timesteps per step)")
    ax.set_ylabel("timesteps/s (best round)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _headline_bars(at: list[dict], ceiling: float | None):
    """Median timesteps/s and the interleaved ratio of each variant at the headline shape."""
    import matplotlib.pyplot as plt

    at.sort(key=lambda r: r["timesteps_per_s"])
    fig, (ax, rax) = plt.subplots(
        1, 2, figsize=(11, 0.45 * len(at) + 1.8), sharey=True,
        gridspec_kw={"width_ratios": [3, 2]},
    )
    names = [label(r) for r in at]
    ratios = [r.get("ratio_vs_keras_lstm_xla", 1.0 if label(r) == "keras-lstm (XLA)"
                    else float("nan")) for r in at]
    rax.barh(names, ratios, color="tab:gray")
    for i, v in enumerate(ratios):
        if not math.isnan(v):
            rax.text(v, i, f" {v:.2f}x", va="center", fontsize=8)
    rax.axvline(1.0, color="black", lw=1)
    rax.set_xlabel("x Keras LSTM+XLA (interleaved rounds)")
    rax.set_xlim(0, max([v for v in ratios if not math.isnan(v)] + [1.0]) * 1.3)
    colors = ["tab:green" if "fused" in n else "tab:orange" if "torch" in n else "tab:blue"
              for n in names]
    ax.barh(names, [r["timesteps_per_s"] for r in at], color=colors)
    for i, r in enumerate(at):
        ax.text(r["timesteps_per_s"], i, f" {r['timesteps_per_s']:,.0f}", va="center",
                fontsize=8)
    if ceiling:
        ax.axvline(ceiling, color="black", lw=1, ls=":", label="GEMM ceiling")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("timesteps/s (median)")
    fig.suptitle(f"slots={HEADLINE[0]}, chunk {HEADLINE[1]}, 64 features, 256 units")
    fig.tight_layout()
    return fig


def plots(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")

    steps = [r for r in rows if r.get("slots") is not None and r.get("chunk") is not None]
    gemm = next((r for r in rows if r.get("variant") == "gemm"), None)
    flops = next((r["flops_per_timestep"] for r in steps if r.get("flops_per_timestep")), None)
    # Plots use each case's fastest round (least disturbed by other load on a shared box).
    ceiling = gemm["gflops_best"] * 1e9 / flops if gemm and flops else None
    written: list[Path] = []
    _save(_sweep(steps, ceiling, gemm, "slots", "chunk", HEADLINE[1],
                 f"Serving step, LSTM 256 units, chunk {HEADLINE[1]}: timesteps/s vs slots"),
          out_dir / "kernel_vs_slots.png", written)
    _save(_sweep(steps, ceiling, gemm, "chunk", "slots", HEADLINE[0],
                 f"Serving step, LSTM 256 units, {HEADLINE[0]} slots: timesteps/s vs chunk "
                 "length"),
          out_dir / "kernel_vs_chunk.png", written)
    at = [r for r in steps if (r["slots"], r["chunk"]) == HEADLINE]
    if at:
        _save(_headline_bars(at, ceiling), out_dir / "kernel_headline.png", written)
    return written


def build_report(out_dir: Path = RESULTS, run: bool = True, long: bool = False) -> Path:
    """Run the kernel suite (unless ``run`` is False) and write ``report.md`` + PNGs."""
    out_dir = Path(out_dir)
    kernel_json = out_dir / "kernel.json"
    if run:
        run_kernel_suite(out_dir, long=long)
    if not kernel_json.exists():
        raise FileNotFoundError(f"{kernel_json} missing: run without --no-run first")
    rows = load(kernel_json)
    images = plots(rows, out_dir)
    parts = [
        "# streamrnn benchmark report", "",
        f"Machine: {machine(kernel_json)}. Kernel suite: `bench/test_bench_kernel.py` "
        f"({'full' if long else 'quick'} grid; model Input(T, 64) -> LSTM(256) -> Dense(64); "
        "each case times `ModelRunner.run` on a full batch). Ratios marked *interleaved* "
        "alternate rounds of the two steps under the same load; plain rates drift with "
        "whatever else runs on this machine.", "",
        "## Headline", "", headline(rows), "",
        *[f"![{p.stem}]({p.name})" for p in images], "",
        "## Kernel step", "", kernel_table(rows), "",
    ]
    partial = partial_table(rows)
    if partial:
        parts += [partial, ""]
    for extra in sorted(out_dir.glob("*.json")):
        if extra.name == "kernel.json":
            continue
        rows_extra = load(extra) if "benchmarks" in json.loads(extra.read_text()) else None
        e2e = e2e_table(rows_extra) if rows_extra else None
        if e2e:
            parts += [e2e, ""]
        elif rows_extra:  # other suites' pytest-benchmark JSON (generate, training, ...)
            parts += [other_table(rows_extra, f"{extra.stem} ({extra.name})"), ""]
        else:
            parts += [f"### {extra.name}", "", "(not pytest-benchmark JSON; not rendered)", ""]
    if GPU_JSON.exists():
        parts += [gpu_table(GPU_JSON), ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(parts))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the kernel benchmarks and write a report.")
    p.add_argument("--long", action="store_true", help="the full grid (much longer)")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    p.add_argument("--no-run", action="store_true", help="re-render from existing JSON")
    a = p.parse_args(argv)
    report = build_report(a.out, run=not a.no_run, long=a.long)
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
