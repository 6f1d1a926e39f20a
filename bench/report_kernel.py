"""The kernel suite's sections of the report: headline, step table, partly filled steps, plots.

Reads the rows of ``bench/test_bench_kernel.py`` (``suite`` ``kernel`` / ``kernel-partial``,
``variant``, ``xla``, ``slots``, ``chunk``, rates and interleaved ratios) as loaded by
:func:`report_format.load`, and writes ``kernel_vs_slots.png``, ``kernel_vs_chunk.png`` and
``kernel_headline.png``.

Example::

    rows = load(out_dir / "kernel.json")
    text = "\n".join([headline(rows), kernel_table(rows)])
    images = plots(rows, out_dir)
"""

from __future__ import annotations

import math
from pathlib import Path

from report_format import fmt

__all__ = ["HEADLINE", "headline", "kernel_table", "label", "partial_table", "plots"]

HEADLINE = (64, 16)


def _steps(rows: list[dict]) -> list[dict]:
    """The kernel suite's steps (its rows with a slots x chunk shape)."""
    return [r for r in rows if r.get("suite") == "kernel" and r.get("slots") is not None
            and r.get("chunk") is not None]


def label(row: dict) -> str:
    variant = row.get("variant") or row["name"]
    if variant in ("keras-lstm", "keras-rnn-cell", "fused"):
        return f"{variant} ({'XLA' if row.get('xla') else 'no XLA'})"
    return variant


def kernel_table(rows: list[dict]) -> str:
    lines = [
        "| variant | slots | chunk | timesteps/s (median) | timesteps/s (best round) | "
        "GFLOP/s | x Keras LSTM+XLA (interleaved) | compile s | kernel |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    steps = _steps(rows)
    steps.sort(key=lambda r: (r["slots"], r["chunk"], label(r)))
    for r in steps:
        lines.append(
            f"| {label(r)} | {r['slots']} | {r['chunk']} | {fmt(r.get('timesteps_per_s'))} | "
            f"{fmt(r.get('timesteps_per_s_best'))} | {fmt(r.get('gflops'), 1)} | "
            f"{fmt(r.get('ratio_vs_keras_lstm_xla'), 2)} | {fmt(r.get('compile_s'), 1)} | "
            f"{r.get('kernel', '')} |"
        )
    return "\n".join(lines)


def _variant_line(name: str, r: dict, torch: dict | None) -> str:
    """One headline bullet for a variant of the step."""
    parts = [f"- **{name}**: {fmt(r['timesteps_per_s'])} timesteps/s, "
             f"{fmt(r['gflops'], 1)} GFLOP/s"]
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
    at = {label(r): r for r in _steps(rows) if (r["slots"], r["chunk"]) == HEADLINE}
    gemm = next((r for r in rows if r.get("variant") == "gemm"), None)
    torch = at.get("torch-nn.LSTM")
    out = [f"At slots={HEADLINE[0]}, chunk {HEADLINE[1]}, 64 features, 256 units:", ""]
    out += [_variant_line(name, at[name], torch)
            for name in ("fused (XLA)", "fused (no XLA)", "keras-lstm (XLA)",
                         "keras-lstm (no XLA)", "keras-rnn-cell (XLA)", "keras-rnn-cell (no XLA)")
            if name in at]
    if torch:
        out.append(f"- **torch nn.LSTM** ({torch.get('peer_output', '').splitlines()[0]}): "
                   f"{fmt(torch['timesteps_per_s'])} timesteps/s, "
                   f"{fmt(torch['gflops'], 1)} GFLOP/s (its own GEMM: "
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
                   f"{fmt(r['timesteps_per_s'])} timesteps/s{tail}")
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
        lines.append(f"| {r['busy']} of {r['total_slots']} | {fmt(r['timesteps_per_s'])} | "
                     f"{fmt(r['full_timesteps_per_s'])} | **{r['ratio_vs_full']:.2f}x** |")
    return "\n".join(lines)


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
        style = "-" if "fused" in name or "executor" in name else "--"
        ax.plot(*zip(*pts, strict=True), style, marker="o", label=name)
    if ceiling:
        ax.axhline(ceiling, color="black", lw=1, ls=":",
                   label=f"GEMM ceiling ({gemm['gflops_best']:.0f} GFLOP/s, best round)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(axis if axis != "chunk" else "chunk length (timesteps per step)")
    ax.set_ylabel("timesteps/s (best round; executors: fastest call)")
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


def _executor_points(rows: list[dict]) -> list[dict]:
    """The executor grid's cases (``bench/test_bench_executors.py``, each executor in its
    own process) as plot points: ``executor <name>`` at its fastest call."""
    return [{"variant": f"executor {name}", "slots": r["slots"], "chunk": r["chunk"],
             "timesteps_per_s_best": k["best"]}
            for r in rows if r.get("suite") == "grid" for name, k in r["kernels"].items()]


def plots(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")

    steps = _steps(rows)
    if not steps:
        return []
    sweeps = steps + _executor_points(rows)
    gemm = next((r for r in rows if r.get("variant") == "gemm"), None)
    flops = next((r["flops_per_timestep"] for r in steps if r.get("flops_per_timestep")), None)
    # Plots use each case's fastest round (least disturbed by other load on a shared box).
    ceiling = gemm["gflops_best"] * 1e9 / flops if gemm and flops else None
    written: list[Path] = []
    _save(_sweep(sweeps, ceiling, gemm, "slots", "chunk", HEADLINE[1],
                 f"Serving step, LSTM 256 units, chunk {HEADLINE[1]}: timesteps/s vs slots"),
          out_dir / "kernel_vs_slots.png", written)
    _save(_sweep(sweeps, ceiling, gemm, "chunk", "slots", HEADLINE[0],
                 f"Serving step, LSTM 256 units, {HEADLINE[0]} slots: timesteps/s vs chunk "
                 "length"),
          out_dir / "kernel_vs_chunk.png", written)
    at = [r for r in steps if (r["slots"], r["chunk"]) == HEADLINE]
    if at:
        _save(_headline_bars(at, ceiling), out_dir / "kernel_headline.png", written)
    return written
