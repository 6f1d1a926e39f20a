"""Kernels timed each in its own process, and the loop that serves them.

One kernel per process: its runtime's thread pool (ONNX Runtime's, torch's OpenMP pool,
TensorFlow's Eigen pool, OpenBLAS) is alone in the process, as in a worker, and kernels of
different processes alternate round by round (``bench/peer_rounds.py`` drives them). Every
kernel steps ``slots`` rows by one chunk of ``chunk`` timesteps per call (``features`` inputs,
an LSTM of ``units``, a Dense head back to ``features``) and carries its state across calls:

* ``ort-op``: the raw ONNX Runtime ``LSTM`` op, one node + a ``MatMul`` head (+ ``Add`` bias),
  built with ``onnx.helper``; time-major ``x (chunk, slots, features)``; ``Y_h``/``Y_c`` fed
  back as the next call's initial state; ``threads`` intra-op threads, spinning off;
* ``torch-lstm``: torch ``nn.LSTM(batch_first=True)`` + ``nn.Linear`` under
  ``inference_mode`` (the peer of ``/work/shared/bench/peer_torch_lstm.py``),
  ``torch.set_num_threads(threads)``, the OpenMP wait policy the process started with;
* ``gemm-numpy`` / ``gemm-torch`` / ``gemm-ort``: a float32 ``2048 x 2048 @ 2048 x 2048``
  matmul with that library on ``threads`` threads: the GEMM ceiling, measured with the
  library each peer uses (work unit: FLOPs, not timesteps);
* ``executor-onnxruntime`` / ``executor-keras`` / ``executor-torch``: streamrnn's executors
  (``OrtExecutor``; ``ModelRunner`` over the fused serving clone with XLA, as the engine runs
  it on CPU, TensorFlow's intra-op pool on ``threads`` threads; ``TorchExecutor``) over
  ``Input(T, features) -> LSTM(units) -> Dense(features)`` (seed 0),
  ``run({slot: chunk}, chunk)`` on every slot. ``precision`` other than
  ``float32`` goes to ``TorchExecutor(precision=...)``, and the build reports the max abs
  difference of 4 steps' outputs and states from a float32 twin with the same weights.

Protocol (one JSON object per line; the kernel's own prints go to stderr)::

    -> {"op": "build", "kernel": "ort-op", "slots": 64, "chunk": 16, "threads": 2}
    <- {"ok": true, "info": {"work": 1024, "unit": "timesteps", "kernel": "...", ...}}
    -> {"op": "time", "seconds": 1.0}
    <- {"ok": true, "calls": 120, "seconds": 1.003, "best_s": 0.0079, "cpu_s": 1.9}
    -> {"op": "quit"}

A failed build answers ``{"ok": false, "error": "ModuleNotFoundError: ..."}`` (torch missing,
bf16 refused, ...). One-shot use::

    python bench/kernel_peers.py --kernel ort-op --slots 64 --chunk 16 --seconds 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

__all__ = ["Built", "GEMM_N", "KERNELS", "KernelSpec", "build", "flops_per_timestep",
           "serve", "time_calls"]

GEMM_N = 2048


def flops_per_timestep(features: int = 64, units: int = 256) -> int:
    """Multiply-adds x 2 of one LSTM step plus the Dense head (the peer's formula)."""
    return 2 * 4 * units * (features + units) + 2 * units * features


@dataclass(frozen=True)
class KernelSpec:
    """What to build: a kernel name and its shape (see the module docstring)."""

    kernel: str
    slots: int = 64
    chunk: int = 16
    features: int = 64
    units: int = 256
    threads: int = 2
    precision: str = "float32"


@dataclass
class Built:
    """A built kernel: ``step()`` does ``work`` units (timesteps or FLOPs) per call."""

    step: Callable[[], object]
    work: float
    unit: str = "timesteps"
    info: dict[str, Any] = field(default_factory=dict)


# ---- raw peers ---------------------------------------------------------------------------


def _ort_session(proto: Any, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(proto.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _onnx_model(nodes: list, inputs: list, outputs: list, initializers: dict[str, np.ndarray]
                ) -> Any:
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(a, name) for name, a in initializers.items()]
    graph = helper.make_graph(nodes, "peer", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


def _ort_op(spec: KernelSpec) -> Built:
    """One ONNX ``LSTM`` node + ``MatMul`` + ``Add``, time-major, state fed back."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    t, b, d, h = spec.chunk, spec.slots, spec.features, spec.units
    rng = np.random.default_rng(0)
    weights = {"W": rng.standard_normal((1, 4 * h, d)), "R": rng.standard_normal((1, 4 * h, h)),
               "B": np.zeros((1, 8 * h)), "head": rng.standard_normal((h, d)),
               "head_b": np.zeros(d)}
    weights = {k: (0.05 * v).astype(np.float32) for k, v in weights.items()}
    f32 = TensorProto.FLOAT
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B", "", "h0", "c0"], ["y", "h", "c"],
                              hidden_size=h),
             helper.make_node("MatMul", ["y", "head"], ["z"]),
             helper.make_node("Add", ["z", "head_b"], ["out"])]
    inputs = [helper.make_tensor_value_info("x", f32, ["T", "B", d]),
              helper.make_tensor_value_info("h0", f32, [1, "B", h]),
              helper.make_tensor_value_info("c0", f32, [1, "B", h])]
    outputs = [helper.make_tensor_value_info("out", f32, ["T", 1, "B", d]),
               helper.make_tensor_value_info("h", f32, [1, "B", h]),
               helper.make_tensor_value_info("c", f32, [1, "B", h])]
    session = _ort_session(_onnx_model(nodes, inputs, outputs, weights), spec.threads)
    x = rng.standard_normal((t, b, d)).astype(np.float32)
    state = {"h0": np.zeros((1, b, h), np.float32), "c0": np.zeros((1, b, h), np.float32)}

    def step() -> np.ndarray:
        out, state["h0"], state["c0"] = session.run(None, {"x": x, **state})
        return out

    return Built(step, t * b, info={"kernel": f"onnxruntime {ort.__version__} LSTM op + MatMul "
                                    f"(time-major, {spec.threads} threads, no spinning)"})


def _torch_lstm(spec: KernelSpec) -> Built:
    import torch

    torch.set_num_threads(spec.threads)
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(spec.features, spec.units, batch_first=True)
    head = torch.nn.Linear(spec.units, spec.features)
    x = torch.randn(spec.slots, spec.chunk, spec.features)
    state = [torch.zeros(1, spec.slots, spec.units) for _ in range(2)]

    def step() -> np.ndarray:
        with torch.inference_mode():
            y, (state[0], state[1]) = lstm(x, (state[0], state[1]))
            return head(y).numpy()

    policy = os.environ.get("OMP_WAIT_POLICY", "libgomp default")
    return Built(step, spec.slots * spec.chunk, info={
        "kernel": f"torch {torch.__version__} nn.LSTM + Linear ({spec.threads} threads, "
                  f"OMP_WAIT_POLICY {policy})"})


def _gemm(spec: KernelSpec) -> Built:
    """2048^3 float32 matmul with the library in the kernel's name."""
    n, lib = GEMM_N, spec.kernel.removeprefix("gemm-")
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    if lib == "numpy":
        step: Callable[[], object] = lambda: a @ b  # noqa: E731
        blas = os.environ.get("OPENBLAS_NUM_THREADS", "unset")
        what = f"numpy {np.__version__} (OPENBLAS_NUM_THREADS={blas})"
    elif lib == "torch":
        import torch

        torch.set_num_threads(spec.threads)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        step, what = (lambda: torch.matmul(ta, tb)), f"torch {torch.__version__}"
    elif lib == "ort":
        from onnx import TensorProto, helper

        io = [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in "abc"]
        proto = _onnx_model([helper.make_node("MatMul", ["a", "b"], ["c"])], io[:2], io[2:], {})
        session = _ort_session(proto, spec.threads)
        step, what = (lambda: session.run(None, {"a": a, "b": b})), "onnxruntime MatMul"
    else:
        raise ValueError(f"unknown GEMM library {lib!r}")
    return Built(step, 2 * n**3, unit="flop",
                 info={"kernel": f"{n}^3 float32 matmul, {what}, {spec.threads} threads"})


# ---- streamrnn's executors -----------------------------------------------------------------


def _keras_model(features: int, units: int) -> Any:
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((None, features)),
                             keras.layers.LSTM(units, return_sequences=True),
                             keras.layers.Dense(features)])


def _make_executor(name: str, model: Any, spec: KernelSpec, precision: str = "float32") -> Any:
    if name == "onnxruntime":
        from streamrnn.executors.ort import OrtExecutor

        return OrtExecutor(model, spec.slots, max_bucket=spec.chunk, threads=spec.threads)
    if name == "keras":
        from streamrnn.executors.keras_runner import ModelRunner
        from streamrnn.executors.models import build_serving_model

        return ModelRunner(build_serving_model(model, spec.slots, fused=True),
                           max_bucket=spec.chunk)  # XLA on CPU: the engine's default
    if name == "torch":
        from streamrnn.executors.torch_rnn import TorchExecutor

        extra = {} if precision == "float32" else {"precision": precision}
        return TorchExecutor.from_keras(model, spec.slots, max_bucket=spec.chunk,
                                        threads=spec.threads, **extra)
    raise ValueError(f"unknown executor {name!r}")


def _difference(ex: Any, twin: Any, chunks: dict[int, np.ndarray], chunk: int) -> dict:
    """Max abs difference of 4 steps' outputs and final states of ``ex`` vs ``twin``."""
    slots = list(chunks)
    out = 0.0
    for _ in range(4):
        a, b = ex.run(chunks, chunk), twin.run(chunks, chunk)
        out = max(out, max(float(np.abs(a[s] - b[s]).max()) for s in slots))
    states = max(float(np.abs(x - y).max()) for x, y in
                 zip(ex.state.read(slots), twin.state.read(slots), strict=True))
    ex.state.reset(slots)
    return {"outputs": out, "states": states}


def _tf_threads(threads: int) -> None:
    """TensorFlow's intra-op pool (XLA:CPU's too) on ``threads`` threads, as the peers'
    (settable once per process, before TensorFlow starts; the default is every core)."""
    import tensorflow as tf

    if tf.config.threading.get_intra_op_parallelism_threads() == 0:
        tf.config.threading.set_intra_op_parallelism_threads(threads)


def _executor(spec: KernelSpec) -> Built:
    name = spec.kernel.removeprefix("executor-")
    _tf_threads(spec.threads)
    model = _keras_model(spec.features, spec.units)
    ex = _make_executor(name, model, spec, spec.precision)
    rng = np.random.default_rng(0)
    chunks = {s: rng.standard_normal((spec.chunk, spec.features)).astype(np.float32)
              for s in range(spec.slots)}
    info: dict[str, Any] = {"kernel": ex.kernel, "executor": name, "precision": spec.precision}
    if spec.precision != "float32":
        twin = _make_executor(name, model, spec)
        info["max_abs_diff_vs_float32"] = _difference(ex, twin, chunks, spec.chunk)
        del twin
    t0 = time.perf_counter()
    ex.run(chunks, spec.chunk)  # traces / compiles / pre-packs
    info["first_call_s"] = time.perf_counter() - t0
    return Built(lambda: ex.run(chunks, spec.chunk), spec.slots * spec.chunk, info=info)


KERNELS: dict[str, Callable[[KernelSpec], Built]] = {
    "ort-op": _ort_op, "torch-lstm": _torch_lstm,
    "gemm-numpy": _gemm, "gemm-torch": _gemm, "gemm-ort": _gemm,
    "executor-onnxruntime": _executor, "executor-keras": _executor, "executor-torch": _executor,
}


def build(spec: KernelSpec) -> Built:
    """Build ``spec.kernel`` and warm it up (two calls)."""
    if spec.kernel not in KERNELS:
        raise ValueError(f"unknown kernel {spec.kernel!r}; one of {sorted(KERNELS)}")
    built = KERNELS[spec.kernel](spec)
    for _ in range(2):
        built.step()
    built.info.update(work=built.work, unit=built.unit)
    return built


def time_calls(step: Callable[[], object], seconds: float, min_calls: int = 2) -> dict:
    """Call ``step`` for about ``seconds`` (at least ``min_calls`` times): calls, wall
    seconds, the fastest call and the process CPU seconds they took."""
    calls, best = 0, float("inf")
    t0, cpu0 = time.perf_counter(), time.process_time()
    while calls < min_calls or time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t)
        calls += 1
    return {"calls": calls, "seconds": time.perf_counter() - t0, "best_s": best,
            "cpu_s": time.process_time() - cpu0}


# ---- serving -------------------------------------------------------------------------------


def _answer(built: Built | None, request: dict) -> tuple[Built | None, dict]:
    op = request.get("op")
    if op == "build":
        fields = {k: v for k, v in request.items() if k != "op"}
        try:
            built = build(KernelSpec(**fields))
        except Exception as exc:  # noqa: BLE001 - the driver records why a kernel is missing
            return None, {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
        return built, {"ok": True, "info": built.info}
    if op == "time":
        if built is None:
            return built, {"ok": False, "error": "nothing built"}
        return built, {"ok": True, **time_calls(built.step, float(request["seconds"]))}
    return built, {"ok": False, "error": f"unknown op {op!r}"}


def serve(requests: TextIO, answers: TextIO) -> None:
    """Answer JSON-line requests until ``quit`` or end of input."""
    built: Built | None = None
    for line in requests:
        request = json.loads(line)
        if request.get("op") == "quit":
            return
        built, answer = _answer(built, request)
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernel", choices=sorted(KERNELS), help="one-shot: time this kernel")
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="float32")
    p.add_argument("--seconds", type=float, default=2.0)
    a = p.parse_args(argv)
    if a.kernel is None:  # serve: answers on the real stdout, anything printed to stderr
        answers = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        serve(sys.stdin, answers)
        return 0
    built = build(KernelSpec(a.kernel, a.slots, a.chunk, threads=a.threads,
                             precision=a.precision))
    t = time_calls(built.step, a.seconds)
    print(f"{built.info['kernel']}: {t['calls'] * built.work / t['seconds']:,.0f} {built.unit}/s")
    return 0


if __name__ == "__main__":
    if __package__ is None and str(Path(__file__).resolve().parents[1]) not in sys.path:
        sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # streamrnn from a checkout
    raise SystemExit(main())
