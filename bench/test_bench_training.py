"""Training throughput: free-running vs teacher-forced (timesteps/s of optimizer steps).

    pytest bench/test_bench_training.py -p no:cacheprovider --benchmark-only -s

Both modes run the same compiled graph (one ``tf.while_loop`` over time inside a
``tf.function`` with the gradient and the Adam update); they differ in the input each step
reads: the observation (teacher forcing) or the model's own previous output (free-running,
which also back-propagates through the fed-back prediction). ``test_free_vs_teacher_ratio``
alternates the two modes round by round so machine load hits both alike (graph mode and
XLA), prints the timesteps/s of each and their ratio, and writes them to ``$BENCH_OUT`` (default
``bench/results/training.json``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from streamrnn.training.config import TrainConfig
from streamrnn.training.trainer import FreeRunningTrainer

SLOTS, T, D, UNITS = 32, 64, 8, 64


def make(mode: str, cell: str = "lstm", jit: bool = False) -> tuple[FreeRunningTrainer, tuple]:
    keras.utils.set_random_seed(0)
    layer = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU}[cell]
    model = keras.Sequential([keras.Input((None, D)), layer(UNITS, return_sequences=True),
                              keras.layers.Dense(D)])
    trainer = FreeRunningTrainer(model, slots=SLOTS, config=TrainConfig(
        mode=mode, warmup=8, jit_compile=jit, schedule="linear", schedule_steps=10**9))
    rng = np.random.default_rng(0)
    seq = np.cumsum(rng.standard_normal((SLOTS, T + 1, D)), axis=1).astype(np.float32) * 0.1
    batch = (seq[:, :-1], seq[:, 1:])
    trainer.train_batch(*batch)  # trace outside the timing
    return trainer, batch


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("mode", ["teacher", "free", "scheduled"])
def test_train_step(benchmark, mode, cell):
    trainer, batch = make(mode, cell)
    benchmark.pedantic(trainer.train_batch, args=batch, rounds=15, warmup_rounds=2)
    benchmark.extra_info["timesteps_per_s"] = SLOTS * T / benchmark.stats.stats.mean
    benchmark.extra_info["shape"] = f"slots={SLOTS} T={T} D={D} units={UNITS} {cell}"


def _interleaved(trainers: dict[str, tuple], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {m: [] for m in trainers}
    for _ in range(rounds):
        for mode, (trainer, batch) in trainers.items():
            start = time.perf_counter()
            trainer.train_batch(*batch)
            times[mode].append(time.perf_counter() - start)
    return {m: SLOTS * T / float(np.median(t)) for m, t in times.items()}


def test_free_vs_teacher_ratio():
    results = {}
    for cell in ("lstm", "gru"):
        for jit in (False, True):
            rate = _interleaved({m: make(m, cell, jit) for m in ("teacher", "free")}, rounds=20)
            name = f"{cell}{'-xla' if jit else ''}"
            results[name] = {
                "teacher_timesteps_per_s": rate["teacher"],
                "free_timesteps_per_s": rate["free"],
                "free_over_teacher": rate["free"] / rate["teacher"],
            }
            print(f"\n{name}: slots={SLOTS} T={T} D={D} units={UNITS}: teacher-forced "
                  f"{rate['teacher']:,.0f} timesteps/s, free-running {rate['free']:,.0f} "
                  f"timesteps/s, ratio free/teacher {rate['free'] / rate['teacher']:.2f}")
            assert rate["free"] > 0 and rate["teacher"] > 0
    out = Path(os.environ.get("BENCH_OUT", Path(__file__).parent / "results" / "training.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"shape": {"slots": SLOTS, "T": T, "D": D, "units": UNITS},
                               "results": results}, indent=2))
