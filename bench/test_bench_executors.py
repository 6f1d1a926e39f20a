"""The executors against their peers, beside a CPU hog, over a grid, and in bf16.

    pytest bench/test_bench_executors.py -q [--benchmark-json bench/results/kernel.json]
    STREAMRNN_BENCH=full pytest bench/test_bench_executors.py -q    # the whole grid

Every kernel runs in its own process (``bench/kernel_peers.py``, driven by
``bench/peer_rounds.py``): streamrnn's executors (``onnxruntime``: the default on CPU;
``keras``: fused step under XLA; ``torch``, when torch is installed) and the peers (the raw
ONNX Runtime ``LSTM`` op, torch ``nn.LSTM`` with libgomp's default wait policy and with
``PASSIVE``), 2 threads each, and the float32 GEMM ceiling of each library (2048^3 numpy,
torch and ONNX Runtime matmul). Their timings alternate round by round (the order rotates),
so ratios compare rounds taken under the same load. Model: ``Input(T, 64) -> LSTM(256) ->
Dense(64)``; headline shape 64 slots x 16-step chunks. Cases (``extra_info["suite"]``):

* ``peers``: every kernel and ceiling at the headline shape: the default executor's ratio
  to the faster peer, its share of each GEMM ceiling;
* ``hog``: quiet and hogged runs alternate (a one-thread ``while True: pass`` process
  resumed for the hogged ones): the share of its quiet rate each kernel keeps;
* ``grid``: each executor at slots x chunk (quick: the headline's slots and chunk sweeps;
  ``STREAMRNN_BENCH=full``: slots {1, 8, 64, 256} x chunk {1, 16, 128}), ratio to Keras;
* ``bf16``: ``TorchExecutor(precision="bf16")`` vs the float32 kernels (speed-up over the
  best, max abs difference from float32), or the reason it was refused.

Knobs: ``STREAMRNN_BENCH_SECONDS`` (per timing, default 1; the grid uses half),
``STREAMRNN_BENCH_ROUNDS`` (default 3), ``STREAMRNN_BENCH_DEFAULT_EXECUTOR`` (default
``onnxruntime``).
"""

from __future__ import annotations

import os

import pytest
from kernel_peers import GEMM_N, KernelSpec, flops_per_timestep
from peer_rounds import Hog, KernelSet, Rounds, median_ratio

FULL = os.environ.get("STREAMRNN_BENCH", "quick") == "full"
SECONDS = float(os.environ.get("STREAMRNN_BENCH_SECONDS", "1"))
ROUNDS = int(os.environ.get("STREAMRNN_BENCH_ROUNDS", "3"))
DEFAULT = os.environ.get("STREAMRNN_BENCH_DEFAULT_EXECUTOR", "onnxruntime")
HEADLINE = (64, 16)
EXECUTORS = ("onnxruntime", "keras", "torch")
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}
PEERS = {"ort-op": KernelSpec("ort-op"), "torch-lstm": KernelSpec("torch-lstm"),
         "torch-lstm-passive": (KernelSpec("torch-lstm"), PASSIVE)}
GEMMS = {f"gemm-{lib}": KernelSpec(f"gemm-{lib}") for lib in ("numpy", "torch", "ort")}
FLOPS = flops_per_timestep()


def _executors(slots: int = HEADLINE[0], chunk: int = HEADLINE[1]) -> dict[str, KernelSpec]:
    return {name: KernelSpec(f"executor-{name}", slots, chunk) for name in EXECUTORS}


def _play(benchmark, kernels: KernelSet, seconds: float = SECONDS, hog: Hog | None = None
          ) -> Rounds:
    """``ROUNDS`` interleaved rounds of the ready kernels, one pytest-benchmark round each."""
    rounds = Rounds({n: k.work for n, k in kernels.ready.items()})
    benchmark.pedantic(lambda: rounds.play(kernels.ready, seconds, hog), rounds=ROUNDS,
                       iterations=1)
    return rounds


def _kernel_rows(rounds: Rounds, kernels: KernelSet, reference: str | None) -> dict:
    """Per kernel: median and best rate, rates per round, CPU per wall second, the kernel
    in words, and the median per-round ratio to ``reference``."""
    rows = {}
    for name in rounds.quiet:
        rates = rounds.rates(name)
        row = {"rate": rounds.median(name), "best": rounds.best_rate(name),
               "per_round": [round(r, 1) for r in rates], "cpu_per_wall": rounds.cpu_share(name),
               "unit": kernels.ready[name].info["unit"],
               "kernel": kernels.ready[name].info["kernel"]}
        if reference in rounds.quiet and row["unit"] == "timesteps":
            row["ratio_vs_reference"] = median_ratio(rates, rounds.rates(reference))
        rows[name] = row
    return rows


def _faster(rounds: Rounds, names: list[str]) -> list[float]:
    """Per round, the rate of the fastest of ``names`` in that round."""
    return [max(rates) for rates in zip(*(rounds.rates(n) for n in names), strict=True)]


def _peer_summary(rounds: Rounds) -> dict:
    """The default executor vs the faster peer and vs each GEMM ceiling (per-round ratios)."""
    peers = [n for n in PEERS if n in rounds.quiet]
    out: dict = {"default": DEFAULT, "peers": peers}
    if DEFAULT not in rounds.quiet:
        return out
    default = rounds.rates(DEFAULT)
    if peers:
        out["faster_peer"] = max(peers, key=rounds.median)
        out["ratio_vs_faster_peer"] = median_ratio(default, _faster(rounds, peers))
        out["ratio_vs_faster_peer_per_round"] = [
            round(d / p, 3) for d, p in zip(default, _faster(rounds, peers), strict=True)]
    out["share_of_gemm"] = {g: median_ratio([d * FLOPS for d in default], rounds.rates(g))
                            for g in GEMMS if g in rounds.quiet}
    return out


def test_peers_headline(benchmark) -> None:
    """Executors, peers and GEMM ceilings at 64 slots x 16 steps, interleaved."""
    slots, chunk = HEADLINE
    with KernelSet({**_executors(), **PEERS, **GEMMS}) as kernels:
        rounds = _play(benchmark, kernels)
        benchmark.extra_info.update(
            suite="peers", slots=slots, chunk=chunk, features=64, units=256, threads=2,
            flops_per_timestep=FLOPS, gemm_n=GEMM_N, seconds=SECONDS,
            kernels=_kernel_rows(rounds, kernels, DEFAULT), missing=kernels.missing,
            **_peer_summary(rounds))


def test_colocated_hog(benchmark) -> None:
    """The share of its quiet rate each kernel keeps beside a one-thread busy loop."""
    specs = {**_executors(), **PEERS}
    with KernelSet(specs) as kernels, Hog() as hog:
        rounds = _play(benchmark, kernels, hog=hog)
        rows = {}
        for name in rounds.quiet:
            quiet, hogged = rounds.rates(name), rounds.rates(name, hogged=True)
            rows[name] = {"quiet": rounds.median(name), "hogged": rounds.median(name, True),
                          "share": median_ratio(hogged, quiet),
                          "per_round": [round(h / q, 3) for h, q in
                                        zip(hogged, quiet, strict=True)],
                          "kernel": kernels.ready[name].info["kernel"]}
        benchmark.extra_info.update(suite="hog", slots=HEADLINE[0], chunk=HEADLINE[1],
                                    threads=2, seconds=SECONDS, kernels=rows,
                                    missing=kernels.missing)


def _grid() -> list[tuple[int, int]]:
    if FULL:
        return [(s, c) for s in (1, 8, 64, 256) for c in (1, 16, 128)]
    return [(1, 16), (8, 16), (64, 1), (64, 16), (64, 128), (256, 16)]


@pytest.fixture(scope="module")
def grid_kernels():
    with KernelSet(_executors()) as kernels:
        yield kernels


@pytest.mark.parametrize(("slots", "chunk"), _grid(), ids=lambda v: str(v))
def test_executor_grid(benchmark, grid_kernels: KernelSet, slots: int, chunk: int) -> None:
    """Each executor at ``slots`` x ``chunk``, interleaved; ratios to the Keras executor."""
    grid_kernels.build(_executors(slots, chunk))
    rounds = _play(benchmark, grid_kernels, seconds=SECONDS / 2)
    benchmark.extra_info.update(
        suite="grid", grid="full" if FULL else "quick", slots=slots, chunk=chunk,
        seconds=SECONDS / 2, kernels=_kernel_rows(rounds, grid_kernels, "keras"),
        missing=dict(grid_kernels.missing))


def _bf16_summary(rounds: Rounds) -> dict:
    float32 = [n for n in rounds.quiet if n != "torch-bf16"]
    best = max(float32, key=rounds.median)
    bf16 = rounds.rates("torch-bf16")
    return {"best_float32": best,
            "speedup_vs_best_float32": median_ratio(bf16, _faster(rounds, float32)),
            "per_round": [round(b / f, 3) for b, f in
                          zip(bf16, _faster(rounds, float32), strict=True)]}


def test_bf16(benchmark) -> None:
    """``TorchExecutor(precision="bf16")`` vs the float32 executors and peers (interleaved),
    or the reason the executor refused it (no AMX / AVX512-BF16 on this CPU, ...)."""
    bf16 = {"torch-bf16": KernelSpec("executor-torch", *HEADLINE, precision="bf16")}
    with KernelSet(bf16) as alone:
        refused = alone.missing.get("torch-bf16")
    info = benchmark.extra_info
    info.update(suite="bf16", slots=HEADLINE[0], chunk=HEADLINE[1], threads=2)
    if refused:
        info["refused"] = refused
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
        return
    specs = {**bf16, "torch": _executors()["torch"], "onnxruntime": _executors()["onnxruntime"],
             **PEERS}
    with KernelSet(specs) as kernels:
        rounds = _play(benchmark, kernels)
        info.update(kernels=_kernel_rows(rounds, kernels, "torch-bf16"), missing=kernels.missing,
                    max_abs_diff_vs_float32=kernels.ready["torch-bf16"].info[
                        "max_abs_diff_vs_float32"], **_bf16_summary(rounds))
