"""A deterministic training job used by the resume tests (run in-process or as a subprocess).

``python -m tests.helpers.training_job CKPT_PATH STEPS [--every K]`` trains a small GRU decoder in
free-running mode on 4 streams whose chunk at step i is a pure function of (stream, i),
resuming from ``CKPT_PATH`` if it exists, saving a checkpoint every K steps (and printing
``checkpoint <step>`` after each), and stops after ``STEPS`` optimizer steps.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from streamrnn.training.config import TrainConfig  # noqa: E402
from streamrnn.training.trainer import FreeRunningTrainer  # noqa: E402

STREAMS = ("s0", "s1", "s2", "s3")
CHUNK = 24


def build_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((None, 2)), keras.layers.GRU(12, return_sequences=True),
        keras.layers.Dense(2),
    ])


def make_trainer(seed: int = 0) -> FreeRunningTrainer:
    config = TrainConfig(mode="scheduled", schedule="linear", schedule_steps=20, warmup=4,
                         learning_rate=3e-3, seed=seed)
    return FreeRunningTrainer(build_model(seed), slots=4, config=config)


def chunk_at(stream: int, step: int) -> np.ndarray:
    """Chunk ``step`` of stream ``stream``: a noisy two-tone signal, ``(CHUNK, 2)``."""
    t = np.arange(step * CHUNK, (step + 1) * CHUNK)
    rng = np.random.default_rng(1000 * stream + step)
    base = np.stack([np.sin(0.3 * t + stream), np.cos(0.17 * t + 2 * stream)], axis=1)
    return (base + 0.05 * rng.standard_normal(base.shape)).astype(np.float32)


def train(trainer: FreeRunningTrainer, until: int, ckpt: str | None = None, every: int = 0,
          verbose: bool = False) -> None:
    """Train from ``trainer.step`` up to ``until`` steps (stream 3 skips odd steps)."""
    while trainer.step < until:
        i = trainer.step
        chunks = {s: chunk_at(k, i) for k, s in enumerate(STREAMS) if not (k == 3 and i % 2)}
        trainer.train_streams(chunks)
        if ckpt and every and trainer.step % every == 0:
            trainer.save_checkpoint(ckpt)
            if verbose:
                print(f"checkpoint {trainer.step}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt")
    parser.add_argument("steps", type=int)
    parser.add_argument("--every", type=int, default=5)
    args = parser.parse_args(argv)
    trainer = make_trainer()
    resumed = trainer.load_checkpoint(args.ckpt)
    print(f"start step={trainer.step} resumed={resumed}", flush=True)
    train(trainer, args.steps, args.ckpt, args.every, verbose=True)
    print(f"done step={trainer.step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
