"""cuDNN vs non-cuDNN for the stateful serving LSTM step, on a GPU, through Keras 3.

TensorFlow is not needed: this runs Keras 3 on its torch backend (the GPU boxes we borrow
carry PyTorch, not TensorFlow), so it measures the same Keras ``LSTM`` layer the engine
clones, at ``stateful=True`` with batch size == slots, with ``use_cudnn=True`` and
``use_cudnn=False`` on the same weights and the same inputs.

    KERAS_BACKEND=torch python bench/gpu_cudnn.py --slots 64 --chunks 16 128 --units 256

Prints one JSON line per measurement and a summary table; with ``--out F`` writes the
records as JSON (``bench/report.py`` can read them). Also probes which kernel Keras
actually ran (it falls back silently) and the cuDNN mask conditions: a fully-masked row
and a mask that is not right-padded, plus the engine's work-around (gather the active rows,
run them unmasked through cuDNN, scatter the state rows back).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402

BACKEND = keras.backend.backend()


# ---- which kernel ran ------------------------------------------------------------------


class KernelLog:
    """Counts calls into the torch backend's cuDNN / hoisted-fallback LSTM functions.

    Keras's torch backend tries cuDNN and silently falls back on any exception, and sends
    masked calls to the generic per-step cell loop; counting the calls is the only way to
    know which kernel actually ran.
    """

    def __init__(self) -> None:
        self.counts = {"cudnn": 0, "cudnn_failed": 0, "hoisted_fallback": 0, "cell_loop": 0}
        if BACKEND != "torch":
            return
        import importlib

        # (``from keras.src.backend.torch import rnn`` would give the function, not the module)
        trnn = importlib.import_module("keras.src.backend.torch.rnn")

        orig_cudnn, orig_fallback, orig_rnn = trnn._cudnn_lstm, trnn._fallback_lstm, trnn.rnn

        def cudnn(*a, **k):
            try:
                out = orig_cudnn(*a, **k)
            except Exception:
                self.counts["cudnn_failed"] += 1
                raise
            self.counts["cudnn"] += 1
            return out

        def fallback(*a, **k):
            self.counts["hoisted_fallback"] += 1
            return orig_fallback(*a, **k)

        def loop(*a, **k):
            self.counts["cell_loop"] += 1
            return orig_rnn(*a, **k)

        trnn._cudnn_lstm, trnn._fallback_lstm = cudnn, fallback
        # RNN.inner_loop calls keras.src.backend.rnn, i.e. this module's ``rnn``.
        from keras.src import backend as kb

        kb.rnn = loop

    def take(self) -> str:
        ran = [k for k, v in self.counts.items() if v]
        for k in self.counts:
            self.counts[k] = 0
        return "+".join(ran) or "none"


LOG = KernelLog()


def gpu_available() -> bool:
    if BACKEND == "torch":
        import torch

        return torch.cuda.is_available()
    import jax

    return jax.devices()[0].platform == "gpu"


# use_cudnn=True raises on a machine without a GPU; "auto" there lets the script run anyway.
CUDNN = True if gpu_available() else "auto"


def device_name() -> str:
    if BACKEND == "torch":
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (cudnn {torch.backends.cudnn.version()})"
        return "cpu"
    import jax

    return str(jax.devices()[0])


def sync() -> None:
    if BACKEND == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def no_grad():
    if BACKEND == "torch":
        import torch

        return torch.inference_mode()
    import contextlib

    return contextlib.nullcontext()


# ---- models ----------------------------------------------------------------------------


def make_lstm(slots: int, features: int, units: int, use_cudnn, weights=None) -> keras.layers.LSTM:
    """A stateful serving LSTM (batch == slots), built, optionally with given weights."""
    layer = keras.layers.LSTM(
        units, stateful=True, return_sequences=True, use_cudnn=use_cudnn, name=f"lstm_{use_cudnn}"
    )
    layer.build((slots, None, features))
    if weights is not None:
        layer.set_weights(weights)
    return layer


def to_numpy(t) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(t))


def state_numpy(layer) -> list[np.ndarray]:
    return [to_numpy(v.value) for v in layer.states]


def rate(fn, seconds: float, warm: int = 10) -> float:
    """Calls per second of ``fn`` (synchronised) over about ``seconds``."""
    for _ in range(warm):
        fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if n % 5 == 0:
            sync()
            if time.perf_counter() - t0 > seconds:
                break
    sync()
    return n / (time.perf_counter() - t0)


# ---- measurements ----------------------------------------------------------------------


def compare_unmasked(slots, chunk, features, units, seconds, rng) -> dict:
    """use_cudnn=True vs False, no mask (every slot has a full chunk)."""
    fast = make_lstm(slots, features, units, CUDNN)
    slow = make_lstm(slots, features, units, False, fast.get_weights())
    chunks = [rng.standard_normal((slots, chunk, features)).astype("float32") for _ in range(3)]
    max_out, max_state = 0.0, 0.0
    with no_grad():
        kernels = {}
        fast.reset_state()
        slow.reset_state()
        for x in chunks:  # same stream, three consecutive chunks: state carried across
            a = to_numpy(fast(x))
            kernels["use_cudnn=True"] = LOG.take()
            b = to_numpy(slow(x))
            kernels["use_cudnn=False"] = LOG.take()
            max_out = max(max_out, float(np.max(np.abs(a - b))))
            for sa, sb in zip(state_numpy(fast), state_numpy(slow), strict=True):
                max_state = max(max_state, float(np.max(np.abs(sa - sb))))
        xt = keras.ops.convert_to_tensor(chunks[0])
        r_fast = rate(lambda: fast(xt), seconds)
        LOG.take()
        r_slow = rate(lambda: slow(xt), seconds)
        LOG.take()
    steps = slots * chunk
    return {
        "case": "unmasked",
        "slots": slots,
        "chunk": chunk,
        "features": features,
        "units": units,
        "cudnn_timesteps_s": r_fast * steps,
        "plain_timesteps_s": r_slow * steps,
        "ratio": r_fast / r_slow,
        "max_abs_diff_out": max_out,
        "max_abs_diff_state": max_state,
        "kernel_cudnn": kernels["use_cudnn=True"],
        "kernel_plain": kernels["use_cudnn=False"],
    }


def mask_probe(slots, chunk, features, units, rng) -> list[dict]:
    """Which kernel runs (or which error) for the masks a serving step produces."""
    ref = make_lstm(slots, features, units, False)
    w = ref.get_weights()
    x = rng.standard_normal((slots, chunk, features)).astype("float32")
    lengths = rng.integers(1, chunk + 1, size=slots)
    right = np.arange(chunk)[None, :] < lengths[:, None]
    idle = right.copy()
    idle[: slots // 4] = False  # a quarter of the slots idle: fully masked rows
    holes = right.copy()
    holes[:, 0] = False  # not right-padded
    holes[:, -1] = True
    masks = {
        "right-padded, no idle rows": right,
        "right-padded + fully-masked rows": idle,
        "not right-padded": holes,
    }
    out = []
    with no_grad():
        for label, m in masks.items():
            ref.reset_state()
            expect = to_numpy(ref(x, mask=m))
            LOG.take()
            for setting in (True, "auto"):
                layer = make_lstm(slots, features, units, setting, w)
                rec = {"case": "mask", "mask": label, "use_cudnn": str(setting)}
                try:
                    got = to_numpy(layer(x, mask=m))
                    diff = np.abs(got - expect)[m]
                    rec.update(kernel=LOG.take(), max_abs_diff=float(diff.max()))
                except Exception as exc:  # noqa: BLE001 - we record what Keras refuses
                    msg = re.sub(r"\x1b\[[0-9;]*m|\s+", " ", str(exc)).strip()
                    rec.update(kernel=LOG.take(), error=f"{type(exc).__name__}: {msg}"[:200])
                out.append(rec)
    return out


def gather_scatter(slots, chunk, features, units, active, seconds, rng) -> dict:
    """Engine work-around: run only the active rows, unmasked, through cuDNN.

    Gathers ``active`` state rows, runs an ``active``-batch LSTM with cuDNN on them, and
    scatters the new state rows back; compared with the masked full-batch step (which
    Keras sends to its per-step cell loop) for outputs, states and throughput.
    """
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    masked = make_lstm(slots, features, units, "auto")
    sub = make_lstm(active, features, units, CUDNN, masked.get_weights())
    x = rng.standard_normal((slots, chunk, features)).astype("float32")
    rows = np.sort(rng.choice(slots, size=active, replace=False))
    m = np.zeros((slots, chunk), bool)
    m[rows] = True
    rows_t = torch.as_tensor(rows, device=dev)
    xt = torch.as_tensor(x, device=dev)
    mt = torch.as_tensor(m, device=dev)
    bank = [torch.zeros((slots, units), device=dev) for _ in range(2)]  # the slot rows

    def step_gather():
        for v, b in zip(sub.states, bank, strict=True):
            v.assign(b.index_select(0, rows_t))
        y = sub(xt.index_select(0, rows_t))
        for v, b in zip(sub.states, bank, strict=True):
            b.index_copy_(0, rows_t, v.value)
        return y

    with no_grad():
        masked.reset_state()
        expect = to_numpy(masked(xt, mask=mt))[rows]
        k_masked = LOG.take()
        got = to_numpy(step_gather())
        k_gather = LOG.take()
        diff = float(np.max(np.abs(got - expect)))
        sdiff = max(
            float(np.max(np.abs(to_numpy(b)[rows] - s[rows])))
            for b, s in zip(bank, state_numpy(masked), strict=True)
        )
        r_masked = rate(lambda: masked(xt, mask=mt), seconds)
        r_gather = rate(step_gather, seconds)
        LOG.take()
    return {
        "case": "active-rows",
        "slots": slots,
        "active": active,
        "chunk": chunk,
        "masked_timesteps_s": r_masked * active * chunk,
        "gather_cudnn_timesteps_s": r_gather * active * chunk,
        "ratio": r_gather / r_masked,
        "max_abs_diff_out": diff,
        "max_abs_diff_state": sdiff,
        "kernel_masked": k_masked,
        "kernel_gather": k_gather,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--chunks", type=int, nargs="+", default=[16, 128])
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--units", type=int, default=256)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--out", default=None, help="write the records as JSON here")
    p.add_argument(
        "--tf32",
        choices=["default", "off"],
        default="default",
        help="off: torch.backends.cudnn.allow_tf32=False (cuDNN defaults to TF32 on Ampere+, "
        "which breaks the 1e-5 streaming contract)",
    )
    a = p.parse_args(argv)
    tf32 = None
    if BACKEND == "torch":
        import torch

        if a.tf32 == "off":
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        tf32 = {
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        }
    rng = np.random.default_rng(0)
    header = {
        "case": "env",
        "backend": BACKEND,
        "keras": keras.__version__,
        "device": device_name(),
        "python": sys.version.split()[0],
        "tf32": tf32,
    }
    print(json.dumps(header), flush=True)
    records = [header]
    for chunk in a.chunks:
        rec = compare_unmasked(a.slots, chunk, a.features, a.units, a.seconds, rng)
        print(json.dumps(rec), flush=True)
        records.append(rec)
    for rec in mask_probe(a.slots, min(a.chunks), a.features, a.units, rng):
        print(json.dumps(rec), flush=True)
        records.append(rec)
    if BACKEND == "torch":
        rec = gather_scatter(
            a.slots, min(a.chunks), a.features, a.units, (3 * a.slots) // 4, a.seconds, rng
        )
        print(json.dumps(rec), flush=True)
        records.append(rec)
    print("\n| case | chunk | cuDNN ts/s | non-cuDNN ts/s | ratio | max diff | kernels |")
    print("|---|---|---|---|---|---|---|")
    for r in records:
        if r["case"] == "unmasked":
            print(
                f"| unmasked | {r['chunk']} | {r['cudnn_timesteps_s']:,.0f} | "
                f"{r['plain_timesteps_s']:,.0f} | {r['ratio']:.2f}x | "
                f"{r['max_abs_diff_out']:.2e} | {r['kernel_cudnn']} / {r['kernel_plain']} |"
            )
        elif r["case"] == "active-rows":
            print(
                f"| {r['active']}/{r['slots']} active, gather+cuDNN vs masked | {r['chunk']} | "
                f"{r['gather_cudnn_timesteps_s']:,.0f} | {r['masked_timesteps_s']:,.0f} | "
                f"{r['ratio']:.2f}x | {r['max_abs_diff_out']:.2e} | "
                f"{r['kernel_gather']} / {r['kernel_masked']} |"
            )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
