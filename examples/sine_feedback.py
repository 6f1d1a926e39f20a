"""Continue a sine-like signal by feeding each prediction back as the next input.

Trains a small LSTM to predict ``x[t+1]`` from ``x[..t]`` on a quasi-periodic signal (two
incommensurate sines), then, for 16 streams at different phases, primes each with 60 true
values and lets :meth:`streamrnn.Engine.generate_many` run 100 steps closed-loop (the
regression rule: ``output_dim == input_dim``, the prediction is the next input). Prints the
RMSE of the free-running continuation against the true signal, next to two baselines.

    python examples/sine_feedback.py [--epochs 20]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import streamrnn  # noqa: E402

PRIME, HORIZON = 60, 100


def signal(t: np.ndarray) -> np.ndarray:
    return (np.sin(0.11 * t) + 0.5 * np.sin(0.29 * t + 1.0)).astype(np.float32)


def build_model(units: int = 32) -> keras.Model:
    return keras.Sequential([
        keras.Input((None, 1)),
        keras.layers.LSTM(units, return_sequences=True),
        keras.layers.Dense(1),
    ], name="sine")


def run(epochs: int = 20, streams: int = 16, seed: int = 0, verbose: int = 0):
    """Train, then continue ``streams`` held-out segments; returns (rmse, baselines, engine)."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    starts = rng.uniform(0, 5000, 1024)
    windows = np.stack([signal(s + np.arange(201)) for s in starts])[..., None]
    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(windows[:, :-1], windows[:, 1:], batch_size=32, epochs=epochs, verbose=verbose)

    engine = streamrnn.Engine.from_keras(model, slots=streams)
    offsets = 10_000 + 1000 * np.arange(streams)  # never seen in training
    truth = {f"s{i}": signal(o + np.arange(PRIME + HORIZON))[:, None]
             for i, o in enumerate(offsets)}
    out = engine.generate_many({s: x[:PRIME] for s, x in truth.items()}, steps=HORIZON)
    future = np.stack([truth[s][PRIME:] for s in truth])
    pred = np.stack([out[s] for s in truth])
    rmse = float(np.sqrt(np.mean((pred - future) ** 2)))
    last_value = float(np.sqrt(np.mean((future - np.stack(
        [truth[s][PRIME - 1] for s in truth])[:, None]) ** 2)))
    zeros = float(np.sqrt(np.mean(future**2)))
    return rmse, {"repeat last value": last_value, "predict zero": zeros}, engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    t0 = time.perf_counter()
    rmse, baselines, _ = run(args.epochs, verbose=2)
    print(f"closed-loop continuation, {HORIZON} steps x 16 streams: RMSE {rmse:.4f} "
          f"(signal amplitude ~1.5)")
    for name, value in baselines.items():
        print(f"  baseline {name}: RMSE {value:.4f}")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
