"""cuDNN vs non-cuDNN through the engine's torch executor, on a machine without TensorFlow.

The GPU machines we borrow carry torch (and JAX), not TensorFlow, so this builds the model
from a plain layer spec and random numpy weights in Keras layout (LSTM(units) + Dense,
``features`` inputs) and runs :class:`~streamrnn.executors.torch_rnn.TorchExecutor` itself:
the same gather / step / scatter of busy rows the engine runs, with ``cudnn=True`` and
``cudnn=False`` on the same weights and inputs, in alternating rounds. Measures timesteps/s
for each chunk length and number of busy slots (all, and a part of them), and the max abs
difference of the outputs and states of cuDNN vs non-cuDNN (and vs torch on the CPU) on
ragged random chunks.

    python bench/gpu_torch.py --out bench/gpu_torch_h200.json             # on the GPU box
    python bench/gpu_torch.py --device cpu --slots 8 --chunks 4 --busy 2 8 --units 32 \\
        --seconds 0.2 --rounds 1                                         # smoke test
    python bench/gpu_torch.py --device cpu --busy 64 --chunks 16 --neighbour \\
        --omp-policy default                                             # CPU threads study

``--device cpu:0`` runs the GPU path (two executors, cudnn=True/False, compared with a
third) on the CPU, where the cuDNN switch does nothing: a dry run of the script.
``--neighbour`` measures each case twice: quiet, and beside a one-thread busy loop (a
``while True: pass`` subprocess), as a worker's I/O thread would sit next to the kernel.
``--omp-policy`` is the OpenMP wait policy torch loads with (the executor's own default is
``passive``; ``default`` is libgomp's spin-then-sleep). Writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

if importlib.util.find_spec("streamrnn") is None:  # a bare checkout: run from its root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load_torch(policy: str) -> Any:
    """Import torch and the executor with the OpenMP wait ``policy`` (read once, at load)."""
    if policy == "default":
        os.environ.pop("OMP_WAIT_POLICY", None)
        import torch  # noqa: F401  (loaded before the executor, so it keeps libgomp's default)
    else:
        os.environ["OMP_WAIT_POLICY"] = policy.upper()
    from streamrnn.executors import torch_rnn

    return torch_rnn


def keras_weights(shapes: list[tuple[int, ...]], rng: np.random.Generator) -> list[np.ndarray]:
    """Random Keras-layout weights: kernels uniform / sqrt(fan in), vectors small."""
    return [(rng.uniform(-1, 1, s) / np.sqrt(s[0]) if len(s) >= 2 else
             rng.uniform(-0.5, 0.5, s)).astype(np.float32) for s in shapes]


class Neighbour:
    """A one-thread busy loop in a subprocess while the ``with`` block runs (or nothing)."""

    def __init__(self, on: bool):
        self.on, self.proc = on, None

    def __enter__(self) -> Neighbour:
        if self.on:
            self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def rate(ex: Any, chunks: dict[int, np.ndarray], bucket: int, seconds: float) -> float:
    """Timesteps/s of ``ex.run(chunks)`` over about ``seconds`` (two warm-up calls)."""
    for _ in range(2):
        ex.run(chunks, bucket)
    steps = sum(len(c) for c in chunks.values())
    calls, t0 = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - t0 < seconds:
        ex.run(chunks, bucket)  # returns host copies: the device work is done
        calls += 1
    return calls * steps / (time.perf_counter() - t0)


def max_differences(executors: dict[str, Any], args: argparse.Namespace
                    ) -> dict[str, float]:
    """Feed every executor the same ragged random chunks from zero states; the max abs
    difference of outputs and states of each executor against the first one."""
    rng = np.random.default_rng(1)
    for ex in executors.values():
        ex.state.reset(range(args.slots))
    outs: dict[str, list[np.ndarray]] = {name: [] for name in executors}
    top = max(args.chunks)
    for _ in range(args.diff_steps):
        slots = rng.choice(args.slots, size=int(rng.integers(1, args.slots + 1)), replace=False)
        chunks = {int(s): rng.standard_normal((int(rng.integers(1, top + 1)), args.features)
                                              ).astype(np.float32) for s in slots}
        for name, ex in executors.items():
            out = ex.run(chunks, top)
            outs[name].extend(out[s] for s in sorted(out))
    names = list(executors)
    ref_out = np.concatenate([o.ravel() for o in outs[names[0]]])
    ref_state = executors[names[0]].state.read(range(args.slots))
    diffs = {}
    for name in names[1:]:
        got = np.concatenate([o.ravel() for o in outs[name]])
        state = executors[name].state.read(range(args.slots))
        diffs[f"{names[0]}_vs_{name}"] = {
            "outputs": float(np.abs(got - ref_out).max()),
            "states": max(float(np.abs(a - b).max()) for a, b in
                          zip(state, ref_state, strict=True))}
    return diffs


def build(torch_rnn: Any, args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    spec = torch_rnn.ModelSpec(
        [torch_rnn.LayerSpec("lstm", units=args.units),
         torch_rnn.LayerSpec("dense", units=args.out_dim)], "features", args.features)
    weights = keras_weights(spec.weight_shapes(), np.random.default_rng(0))
    common = {"max_bucket": max(args.chunks), "threads": args.threads}
    if args.device == "cpu":
        variants = {"cpu": torch_rnn.TorchExecutor(spec, weights, args.slots, **common)}
        return variants, None
    variants = {name: torch_rnn.TorchExecutor(spec, weights, args.slots, device=args.device,
                                              cudnn=name == "cudnn", **common)
                for name in ("cudnn", "no_cudnn")}
    cpu = torch_rnn.TorchExecutor(spec, weights, args.slots, **common)
    return variants, cpu


def measure(variants: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.slots, max(args.chunks), args.features)).astype(np.float32)
    records = []
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for chunk in args.chunks:
            for busy in args.busy:
                slots = np.sort(rng.choice(args.slots, size=busy, replace=False))
                chunks = {int(s): x[s, :chunk] for s in slots}
                for name in order:
                    for beside in ([False, True] if args.neighbour else [False]):
                        with Neighbour(beside):
                            ts = rate(variants[name], chunks, chunk, args.seconds)
                        rec = {"round": r, "variant": name, "chunk": chunk, "busy": busy,
                               "neighbour": beside, "timesteps_per_s": ts}
                        records.append(rec)
                        print(json.dumps(rec), flush=True)
    return records


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[float]] = {}
    for rec in records:
        key = (rec["variant"], rec["chunk"], rec["busy"], rec["neighbour"])
        groups.setdefault(key, []).append(rec["timesteps_per_s"])
    rows = [{"variant": v, "chunk": c, "busy": b, "neighbour": n, "rounds": len(xs),
             "median_timesteps_per_s": statistics.median(xs), "min": min(xs), "max": max(xs)}
            for (v, c, b, n), xs in sorted(groups.items())]
    by_key = {(r["variant"], r["chunk"], r["busy"], r["neighbour"]): r for r in rows}
    for row in rows:  # cuDNN speedup, and the share of the quiet rate kept beside a busy loop
        if row["variant"] == "cudnn":
            other = by_key.get(("no_cudnn", row["chunk"], row["busy"], row["neighbour"]))
            if other:
                row["cudnn_speedup"] = (row["median_timesteps_per_s"]
                                        / other["median_timesteps_per_s"])
        if row["neighbour"]:
            quiet = by_key[(row["variant"], row["chunk"], row["busy"], False)]
            row["share_of_quiet"] = (row["median_timesteps_per_s"]
                                     / quiet["median_timesteps_per_s"])
    return rows


def meta(torch_rnn: Any, variants: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(),
        "omp_wait_policy": args.omp_policy,
        "cpu_count": os.cpu_count(), "kernels": {n: ex.kernel for n, ex in variants.items()},
        "config": {k: v for k, v in vars(args).items() if k != "out"}}
    if torch.device(args.device).type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(args.device),
                    cudnn_version=torch.backends.cudnn.version(),
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
        for name, ex in variants.items():  # what a step runs under
            with ex.backend_flags():
                info[f"{name}_flags"] = {
                    "cudnn_enabled": torch.backends.cudnn.enabled,
                    "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                    "cudnn_rnn_fp32_precision": torch.backends.cudnn.rnn.fp32_precision}
    return info


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (cuda:N) or cpu")
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--chunks", type=int, nargs="+", default=[16, 128])
    p.add_argument("--busy", type=int, nargs="+", default=[64, 32, 8],
                   help="busy slots per step (at most --slots)")
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--units", type=int, default=256)
    p.add_argument("--out-dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    p.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: cores)")
    p.add_argument("--omp-policy", choices=["passive", "active", "default"], default="passive")
    p.add_argument("--neighbour", action="store_true", help="also beside a busy loop")
    p.add_argument("--diff-steps", type=int, default=20)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if max(args.busy) > args.slots:
        p.error("--busy cannot exceed --slots")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    torch_rnn = load_torch(args.omp_policy)
    variants, cpu = build(torch_rnn, args)
    for ex in variants.values():
        ex.warmup()
    records = measure(variants, args)
    checked = dict(variants) if cpu is None else {**variants, "cpu": cpu}
    result = {"meta": meta(torch_rnn, variants, args), "summary": summarize(records),
              "max_abs_diff": max_differences(checked, args) if len(checked) > 1 else {},
              "records": records}
    for row in result["summary"]:
        extra = "".join(f"  {k}={row[k]:.2f}" for k in ("cudnn_speedup", "share_of_quiet")
                        if k in row)
        print(f"{row['variant']:>9} chunk={row['chunk']:<4} busy={row['busy']:<3} "
              f"neighbour={row['neighbour']!s:<5} {row['median_timesteps_per_s']:>12,.0f} "
              f"timesteps/s{extra}")
    print("max abs diff:", json.dumps(result["max_abs_diff"]))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
