"""The executor sections of the report: peers, co-located hog, grid, bf16, end to end.

Reads the rows of ``bench/test_bench_executors.py`` (``suite`` ``peers``, ``hog``, ``grid``,
``bf16``: per-kernel rates and per-round ratios, already computed by the suite) and of
``bench/test_bench_e2e.py`` (``suite`` ``e2e``, one set of cases per executor), as loaded by
:func:`report_format.load`. Every function returns markdown, or None when its rows are
absent.

Example::

    rows = load(out_dir / "kernel.json")
    parts = [s for s in (peers_section(rows), hog_section(rows), grid_section(rows),
                         bf16_section(rows)) if s]
"""

from __future__ import annotations

from report_format import fmt, ratios

__all__ = ["bf16_section", "e2e_table", "executor_sections", "grid_section", "hog_section",
           "peers_section"]

NAMES = {
    "onnxruntime": "executor **onnxruntime**", "keras": "executor **keras** (fused, XLA)",
    "torch": "executor **torch**", "torch-bf16": "executor **torch, bf16**",
    "ort-op": "peer: raw ONNX Runtime `LSTM` op",
    "torch-lstm": "peer: torch `nn.LSTM` (libgomp's default wait policy)",
    "torch-lstm-passive": "peer: torch `nn.LSTM` (`OMP_WAIT_POLICY=PASSIVE`)",
    "gemm-numpy": "GEMM ceiling: numpy (OpenBLAS)", "gemm-torch": "GEMM ceiling: torch",
    "gemm-ort": "GEMM ceiling: ONNX Runtime MatMul",
}


def _name(key: str) -> str:
    return NAMES.get(key, key)


def _suite(rows: list[dict], suite: str) -> list[dict]:
    return [r for r in rows if r.get("suite") == suite]


def _first(rows: list[dict], suite: str) -> dict | None:
    return next(iter(_suite(rows, suite)), None)


def _setting(r: dict, test: str) -> str:
    return (f"`test_bench_executors.py::{test}`: {r['slots']} slots x {r['chunk']}-step "
            f"chunks, {r['threads']} threads each")


def _missing(row: dict) -> list[str]:
    return [f"- not run: {_name(k)}: {v}" for k, v in (row.get("missing") or {}).items()]


def _peer_lead(r: dict) -> str:
    """The headline sentence: the default executor vs the faster peer and the ceilings."""
    default = r.get("default", "onnxruntime")
    if "ratio_vs_faster_peer" not in r:
        return f"The default CPU executor ({default}) or every peer did not run."
    shares = r.get("share_of_gemm", {})
    same = shares.get("gemm-ort") if default == "onnxruntime" else None
    text = (f"**The default CPU executor ({default}) runs at {r['ratio_vs_faster_peer']:.2f}x "
            f"the faster peer** ({_name(r['faster_peer'])}; per round "
            f"{ratios(r.get('ratio_vs_faster_peer_per_round'))})")
    if same is not None:
        text += f", **{100 * same:.0f}% of the GEMM ceiling of its own library**"
    others = ", ".join(f"{100 * v:.0f}% of {_name(k).removeprefix('GEMM ceiling: ')}'s"
                       for k, v in shares.items() if k != "gemm-ort" or same is None)
    return text + (f" ({others})" if others else "") + "."


def _peer_table(r: dict) -> list[str]:
    lines = ["| kernel | timesteps/s (median) | best call | GFLOP/s | x default executor "
             "(interleaved) | CPU s per s | what runs |", "|---|---|---|---|---|---|---|"]
    for key, k in r["kernels"].items():
        gemm = k["unit"] == "flop"
        gflops = (k["rate"] if gemm else k["rate"] * r["flops_per_timestep"]) / 1e9
        lines.append(
            f"| {_name(key)} | {'-' if gemm else fmt(k['rate'])} | "
            f"{'-' if gemm else fmt(k['best'])} | {gflops:.1f} | "
            f"{fmt(k.get('ratio_vs_reference'), 2)} | {k['cpu_per_wall']:.2f} | {k['kernel']} |")
    return lines


def peers_section(rows: list[dict]) -> str | None:
    """``test_peers_headline``: every kernel and GEMM ceiling at the headline shape."""
    r = _first(rows, "peers")
    if r is None:
        return None
    intro = (f"{_setting(r, 'test_peers_headline')}, {r['features']} features, LSTM "
             f"{r['units']} + Dense {r['features']}; every kernel in its own process, timed "
             f"{r['seconds']} s per round, rounds alternating (the order rotates), ratios the "
             "median of per-round ratios.")
    return "\n".join(["## Executors vs peers", "", intro, "", _peer_lead(r), "",
                      *_peer_table(r), *_missing(r)])


def hog_section(rows: list[dict]) -> str | None:
    """``test_colocated_hog``: the share of its quiet rate each kernel keeps."""
    r = _first(rows, "hog")
    if r is None:
        return None
    intro = (f"{_setting(r, 'test_colocated_hog')}; a one-thread `while True: pass` "
             "process is resumed (SIGCONT) for every other timing and stopped (SIGSTOP) for "
             "the rest, so each hogged run follows a quiet one. A worker's I/O thread or a "
             "neighbour process is such a hog.")
    table = [f"| {_name(key)} | {fmt(k['quiet'])} | {fmt(k['hogged'])} | "
             f"**{k['share']:.2f}** | {ratios(k['per_round'])} |"
             for key, k in r["kernels"].items()]
    return "\n".join(["## Beside a co-located CPU hog", "", intro, "",
                      "| kernel | quiet timesteps/s | beside the hog | share kept | per round |",
                      "|---|---|---|---|---|", *table, *_missing(r)])


def grid_section(rows: list[dict]) -> str | None:
    """``test_executor_grid``: each executor at slots x chunk, ratios to Keras."""
    found = sorted(_suite(rows, "grid"), key=lambda r: (r["slots"], r["chunk"]))
    if not found:
        return None
    names = list(dict.fromkeys(k for r in found for k in r["kernels"]))
    which = found[0].get("grid", "quick")
    other = ("the full grid (slots 1/8/64/256 x chunk 1/16/128)" if which == "full" else
             "the quick grid (the headline shape's slots and chunk sweeps; `STREAMRNN_BENCH="
             "full` or `streamrnn bench --long` runs slots 1/8/64/256 x chunk 1/16/128)")
    lines = [
        "## Executors over slots x chunk", "",
        f"`test_bench_executors.py::test_executor_grid`, {other}: every slot has a chunk; "
        "timesteps/s (median of the rounds) and, in brackets, the interleaved ratio to the "
        "Keras executor.", "",
        "| slots | chunk | " + " | ".join(_name(n) for n in names) + " |",
        "|---|---|" + "---|" * len(names)]
    for r in found:
        cells = []
        for n in names:
            k = r["kernels"].get(n)
            cells.append("-" if k is None else
                         f"{fmt(k['rate'])} ({fmt(k.get('ratio_vs_reference'), 2)}x)")
        lines.append(f"| {r['slots']} | {r['chunk']} | " + " | ".join(cells) + " |")
    return "\n".join(lines + _missing(found[-1]))


def _refusal(reason: str) -> str:
    if reason.startswith("TypeError") and "precision" in reason:
        return f"Not run: this torch executor takes no `precision` yet ({reason})."
    if reason.startswith(("ModuleNotFoundError", "ImportError")):
        return f"Not run: torch is not installed ({reason})."
    return f"**Refused on this CPU**: {reason}"


def bf16_section(rows: list[dict]) -> str | None:
    """``test_bf16``: the bf16 torch executor's speed-up and accuracy, or its refusal."""
    r = _first(rows, "bf16")
    if r is None:
        return None
    lines = ["## bf16 (torch executor)", "",
             f"{_setting(r, 'test_bf16')}: `TorchExecutor(precision=\"bf16\")` against the "
             "float32 executors and peers, interleaved.", ""]
    if "refused" in r:
        return "\n".join(lines + [_refusal(r["refused"])])
    diff = r["max_abs_diff_vs_float32"]
    lines += [f"**{r['speedup_vs_best_float32']:.2f}x the best float32 kernel** "
              f"({_name(r['best_float32'])}; per round {ratios(r['per_round'])}); max abs "
              f"difference from float32 over 4 steps: outputs {diff['outputs']:.1e}, states "
              f"{diff['states']:.1e}.", "",
              "| kernel | timesteps/s (median) | bf16 / this (interleaved) |", "|---|---|---|"]
    for key, k in r["kernels"].items():
        ratio = k.get("ratio_vs_reference")
        lines.append(f"| {_name(key)} | {fmt(k['rate'])} | "
                     f"{fmt(None if not ratio else 1 / ratio, 2)} |")
    return "\n".join(lines + _missing(r))


def _e2e_intro(first: dict) -> list[str]:
    window = first.get("window", 3)
    wire = ("chunks of many streams in one BATCH message each way" if first.get("batch", True)
            else "one message per chunk")
    return [
        "## End to end through ZeroMQ vs kernel-only", "",
        f"`bench/test_bench_e2e.py`: a real worker process and one `Client` (64 streams, "
        f"{window} chunks in flight each, {wire}) on the same machine, vs `engine.push_many` "
        "in-process with the same executor; the two alternate and the ratio is the median of "
        "the per-pair ratios (target >= 0.9). CPU per chunk: the worker process (its step "
        "included) and the client process; *outside the kernel* is the worker's minus the "
        "kernel-only loop's."
        + (" The worker coalesces: a stream's queued consecutive chunks share a step, so a "
           "step can carry more chunks than slots." if first.get("coalesce") else ""),
        "", "| executor | chunk | kernel-only timesteps/s | e2e timesteps/s | e2e / kernel | "
        "per pair | chunks per step | CPU us per chunk: worker / client | worker outside the "
        "kernel / kernel-only |", "|---|---|---|---|---|---|---|---|---|"]


def e2e_table(rows: list[dict]) -> str | None:
    """The end-to-end suite's rows (``suite == "e2e"``): e2e vs kernel-only per executor and
    chunk length, and the latency lines; None if the file holds none of them."""
    cases = [r for r in _suite(rows, "e2e") if "ratio_vs_kernel" in r]
    latency = [r for r in _suite(rows, "e2e") if "latency_p50_ms" in r]
    if not cases and not latency:
        return None
    lines = _e2e_intro(cases[0] if cases else {})
    for r in sorted(cases, key=lambda r: (r.get("executor", ""), r["chunk"])):
        lines.append(
            f"| {r.get('executor', '-')} | {r['chunk']} | {fmt(r['kernel_timesteps_per_s'])} | "
            f"{fmt(r['timesteps_per_s'])} | **{r['ratio_vs_kernel']:.2f}** | "
            f"{ratios(r.get('ratios'))} | {r.get('chunks_per_batch', float('nan')):.1f} | "
            f"{fmt(r.get('worker_cpu_us_per_chunk'))} / {fmt(r.get('client_cpu_us_per_chunk'))}"
            f" | {fmt(r.get('worker_outside_kernel_us_per_chunk'))} / "
            f"{fmt(r.get('kernel_cpu_us_per_chunk'))} |")
    for r in latency:
        lines += ["", f"Latency ({r.get('executor', 'default')}), open loop at half the "
                      f"measured e2e rate ({fmt(r['offered_timesteps_per_s'])} timesteps/s "
                      f"offered, chunks of {r['chunk']}): p50 {r['latency_p50_ms']:.1f} ms, "
                      f"p99 {r['latency_p99_ms']:.1f} ms."]
    return "\n".join(lines)


def executor_sections(rows: list[dict]) -> list[str]:
    """Every executor section the rows hold, in report order."""
    found = (peers_section(rows), hog_section(rows), grid_section(rows), bf16_section(rows))
    return [s for s in found if s]
