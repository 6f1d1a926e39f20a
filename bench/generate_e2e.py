"""Generated tokens/s through a real worker: N client threads, each GENERATE-ing on its own
stream at the same time (the worker batches same-option GENERATEs of a round).

    python bench/generate_e2e.py [--streams 16] [--rounds 5] [--steps 64] [--xla]

Prints tokens/s and the worker's engine generate calls per GENERATE request.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

VOCAB, EMBED, UNITS = 64, 32, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--xla", action="store_true", help="XLA steps (default: graph mode)")
    args = parser.parse_args()

    import keras

    import streamrnn
    from streamrnn.cli.process import WorkerProcess

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((None,), dtype="int32"), keras.layers.Embedding(VOCAB, EMBED),
        keras.layers.LSTM(UNITS, return_sequences=True),
        keras.layers.Dense(VOCAB, activation="softmax"),
    ])
    tmp = Path(tempfile.mkdtemp(prefix="streamrnn-genbench-"))
    model.save(tmp / "m.keras")
    flags = () if args.xla else ("--no-xla",)
    with WorkerProcess.start(tmp / "m.keras", args.streams, *flags) as worker, \
            streamrnn.Client(worker.endpoint, timeout=300) as client:
        prompt = np.array([1, 2, 3], np.int32)
        names = [f"g{i}" for i in range(args.streams)]

        def one_round(barrier: threading.Barrier | None, stream: str, seed: int) -> None:
            if barrier is not None:
                barrier.wait()
            client.generate(stream, prompt, steps=args.steps, sample="top_k", top_k=8,
                            seed=seed)

        def run_round(r: int) -> None:
            barrier = threading.Barrier(len(names))
            threads = [threading.Thread(target=one_round, args=(barrier, s, r)) for s in names]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        run_round(0)  # compile
        before = client.stats()["counts"]
        began = time.perf_counter()
        for r in range(1, args.rounds + 1):
            run_round(r)
        elapsed = time.perf_counter() - began
        after = client.stats()["counts"]
    requests = after.get("applied_generate", 0) - before.get("applied_generate", 0)
    calls = after.get("generate_calls", 0) - before.get("generate_calls", 0)
    tokens = args.streams * args.rounds * args.steps
    print(f"{args.streams} streams x {args.rounds} rounds x {args.steps} steps: "
          f"{tokens / elapsed:,.0f} tokens/s ({elapsed:.2f} s); {requests} GENERATEs, "
          f"engine generate calls: {calls if 'generate_calls' in after else 'not counted'}")


if __name__ == "__main__":
    main()
