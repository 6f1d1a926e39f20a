"""Soak: many streams through a durable worker that is SIGKILLed and restarted, and a client
that is thrown away and rebuilt, for a bounded time; every output is checked offline.

    python bench/soak.py --seconds 120

A stream's outputs (chunk by chunk, as received) must equal one offline call of the model
over its whole sequence. The worker checkpoints often; after a SIGKILL it restarts from its
checkpoint on the same endpoint and the client replays what the worker lost from its resend
buffer. After a client restart the new client asks the worker where each stream stands
(OPEN) and continues from there (outputs of chunks the dead client never received are
counted as ``unreceived``, not checked). Reports streams, chunks, restarts survived and
mismatches, which must be zero (exit status 1 otherwise). Writes a JSON summary with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TOL = 1e-5


def build_model(features: int, units: int, out: int):
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((None, features)),
                             keras.layers.LSTM(units, return_sequences=True),
                             keras.layers.GRU(units, return_sequences=True),
                             keras.layers.Dense(out)])


class SoakStream:
    def __init__(self, name: str, steps: int, features: int, rng: np.random.Generator):
        self.name = name
        self.x = rng.standard_normal((steps, features)).astype(np.float32)
        cuts = [0]
        while cuts[-1] < steps:
            cuts.append(min(steps, cuts[-1] + int(rng.integers(1, 33))))
        self.cuts = cuts
        self.pos = 0  # next chunk index to send (== the seq it gets)
        self.pending: dict[int, object] = {}  # chunk index -> Future
        self.outputs: dict[int, np.ndarray] = {}

    @property
    def chunks(self) -> int:
        return len(self.cuts) - 1

    def chunk(self, i: int) -> np.ndarray:
        return self.x[self.cuts[i]:self.cuts[i + 1]]

    @property
    def done(self) -> bool:
        return len(self.outputs) == self.chunks or (
            self.pos >= self.chunks and not self.pending)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="soak duration")
    parser.add_argument("--streams", type=int, default=24, help="concurrent streams")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--max-streams", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1500, help="timesteps per stream")
    parser.add_argument("--kill-every", type=float, default=25.0, help="SIGKILL period (s)")
    parser.add_argument("--client-restart-every", type=float, default=17.0)
    parser.add_argument("--window", type=int, default=4, help="chunks in flight per stream")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the JSON summary here")
    args = parser.parse_args(argv)

    from streamrnn.cli.process import WorkerProcess
    from streamrnn.client.client import Client
    from streamrnn.errors import StreamRNNError

    features, out_dim = 6, 4
    model = build_model(features, 24, out_dim)
    import tensorflow as tf

    # the offline reference: one call of the model over the whole sequence (as a graph:
    # eager RNN loops take seconds per stream)
    offline = tf.function(lambda x: model(x), reduce_retracing=True)
    tmp = Path(tempfile.mkdtemp(prefix="streamrnn-soak-"))
    model.save(tmp / "soak.keras")
    worker_args = ("--no-xla", "--max-bucket", "32", "--checkpoint-dir", str(tmp / "ckpt"),
                   "--checkpoint-every-steps", "20", "--checkpoint-every-s", "0.5",
                   "--max-streams", str(args.max_streams), "--max-queue", "512")
    worker = WorkerProcess.start(tmp / "soak.keras", args.slots, *worker_args,
                                 log_path=tmp / "worker-0.log")
    endpoint = worker.endpoint
    rng = np.random.default_rng(args.seed)
    counts: Counter[str] = Counter()
    client_counters: Counter[str] = Counter()
    max_diff = 0.0
    names = iter(f"soak-{i}" for i in range(10**9))
    live = [SoakStream(next(names), args.steps, features, rng) for _ in range(args.streams)]

    def new_client() -> Client:
        return Client(endpoint, timeout=1.0, retries=60, window=args.window)

    def verify(stream: SoakStream) -> None:
        nonlocal max_diff
        ref = np.asarray(offline(stream.x[None]))[0]
        for i, out in stream.outputs.items():
            diff = float(np.abs(out - ref[stream.cuts[i]:stream.cuts[i + 1]]).max())
            max_diff = max(max_diff, diff)
            counts["chunks_checked"] += 1
            if diff > TOL:
                counts["mismatches"] += 1
                print(f"MISMATCH {stream.name} chunk {i}: max diff {diff:.3g}", flush=True)
        sent = max([stream.pos, *stream.outputs]) if stream.outputs else stream.pos
        counts["unreceived"] += sum(1 for i in range(sent) if i not in stream.outputs)
        counts["streams_completed"] += 1

    def resync(client: Client, stream: SoakStream) -> None:
        """Continue from where the worker says the stream is (after a failure/restart)."""
        stream.pending.clear()
        while True:
            try:
                stream.pos = int(client.open(stream.name)["next_seq"])
                break
            except StreamRNNError as exc:  # the worker is restarting: ask again
                counts[f"open_retries_{type(exc).__name__}"] += 1
        counts["resyncs"] += 1

    client = new_client()
    start = time.monotonic()
    next_kill = start + args.kill_every
    next_client_restart = start + args.client_restart_every
    restart_index = 0
    print(f"soak: {args.seconds:.0f} s, {args.streams} streams x {args.steps} steps, "
          f"slots={args.slots}, max_streams={args.max_streams}, worker {endpoint}", flush=True)
    while time.monotonic() - start < args.seconds:
        now = time.monotonic()
        if now >= next_kill:
            worker.proc.kill()
            worker.proc.wait()
            restart_index += 1
            worker = WorkerProcess.start(tmp / "soak.keras", args.slots, *worker_args,
                                         bind=endpoint,
                                         log_path=tmp / f"worker-{restart_index}.log")
            counts["worker_kills"] += 1
            print(f"[{now - start:6.1f} s] worker SIGKILLed and restarted", flush=True)
            next_kill = time.monotonic() + args.kill_every
        if now >= next_client_restart:
            client_counters.update(client.counters)
            client.shutdown()  # in-flight requests are abandoned
            client = new_client()
            for stream in live:
                resync(client, stream)
            counts["client_restarts"] += 1
            print(f"[{now - start:6.1f} s] client restarted", flush=True)
            next_client_restart = time.monotonic() + args.client_restart_every
        progressed = False
        for k, stream in enumerate(live):
            while stream.pos < stream.chunks and len(stream.pending) < args.window:
                stream.pending[stream.pos] = client.push_async(stream.name,
                                                               stream.chunk(stream.pos))
                stream.pos += 1
            for i in sorted(stream.pending):
                future = stream.pending[i]
                if not future.done():
                    break
                del stream.pending[i]
                progressed = True
                try:
                    stream.outputs[i] = np.array(future.result())
                    counts["chunks_received"] += 1
                except StreamRNNError as exc:
                    counts[f"stream_errors_{type(exc).__name__}"] += 1
                    resync(client, stream)
                    break
            if stream.done:
                verify(stream)
                client.close_async(stream.name)  # frees its state; not waited for
                live[k] = SoakStream(next(names), args.steps, features, rng)
        if not progressed:
            time.sleep(0.002)
    client_counters.update(client.counters)
    client.shutdown()
    for stream in live:  # partially done streams: check what they received
        verify(stream)
        counts["streams_completed"] -= 1
        counts["streams_partial"] += 1
    code = worker.stop()
    counts["worker_exit_status"] = code
    summary = {"seconds": args.seconds, "streams_total": counts["streams_completed"]
               + counts["streams_partial"], **counts, "max_abs_diff": max_diff,
               "client": dict(client_counters)}
    print(json.dumps(summary, indent=2, sort_keys=True))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2, sort_keys=True))
    return 1 if counts["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
