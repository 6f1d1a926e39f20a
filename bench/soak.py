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

``--cluster`` soaks a cluster on a real redis-server instead (bench/soak_cluster.py): two
routers and three workers with ``--store``, a trainer on the durable training log, and
workers, routers and the trainer SIGKILLed at random and restarted:

    python bench/soak.py --cluster --seconds 120
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from streamrnn.client import Client

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__all__ = ["Soak", "SoakStream", "StreamSoak", "build_model", "main"]

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


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="soak duration")
    parser.add_argument("--streams", type=int, default=24, help="concurrent streams")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--max-streams", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1500, help="timesteps per stream")
    parser.add_argument("--kill-every", type=float, default=None,
                        help="SIGKILL period (s); --cluster: mean gap between kills "
                             "(default 25 s, --cluster 10 s)")
    parser.add_argument("--client-restart-every", type=float, default=17.0)
    parser.add_argument("--window", type=int, default=4, help="chunks in flight per stream")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the JSON summary here")
    cluster = parser.add_argument_group("cluster mode (bench/soak_cluster.py)")
    cluster.add_argument("--cluster", action="store_true",
                         help="soak routers, workers and a trainer on a real redis-server")
    cluster.add_argument("--workers", type=int, default=3)
    cluster.add_argument("--routers", type=int, default=2)
    cluster.add_argument("--kill", default="worker,router,trainer",
                         help="kinds of process to SIGKILL (comma-separated)")
    cluster.add_argument("--trainer", action=argparse.BooleanOptionalAction, default=True,
                         help="run a trainer fed by a second client")
    cluster.add_argument("--train-streams", type=int, default=3)
    cluster.add_argument("--train-every", type=float, default=0.5,
                         help="seconds between rounds of training chunks")
    args = parser.parse_args(argv)
    if args.kill_every is None:
        args.kill_every = 10.0 if args.cluster else 25.0
    return args


class StreamSoak:
    """``args.streams`` live streams pumped through ``self.client`` (set by a subclass), each
    checked against one offline call of the soak model when it finishes, then closed and
    replaced by a new one. A subclass says what a failed chunk means (:meth:`failed`)."""

    FEATURES, OUT_DIM = 6, 4

    def __init__(self, args: argparse.Namespace, prefix: str):
        import tensorflow as tf

        self.args = args
        model = build_model(self.FEATURES, 24, self.OUT_DIM)
        # the offline reference: one call of the model over the whole sequence (as a graph:
        # eager RNN loops take seconds per stream)
        self.offline = tf.function(lambda x: model(x), reduce_retracing=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        self.model_path = self.tmp / "soak.keras"
        model.save(self.model_path)
        self.rng = np.random.default_rng(args.seed)
        self.counts: Counter[str] = Counter()
        self.client_counters: Counter[str] = Counter()
        self.max_diff = 0.0
        self.names = iter(f"soak-{i}" for i in range(10**9))
        self.live = [self._new_stream() for _ in range(args.streams)]
        self.client = None
        self.draining = False  # True: send nothing more, only collect

    def _new_stream(self) -> SoakStream:
        return SoakStream(next(self.names), self.args.steps, self.FEATURES, self.rng)

    def verify(self, stream: SoakStream) -> None:
        """Check every output ``stream`` received against the offline call."""
        ref = np.asarray(self.offline(stream.x[None]))[0]
        for i, out in stream.outputs.items():
            want = ref[stream.cuts[i]:stream.cuts[i + 1]]
            diff = float(np.abs(out - want).max()) if out.shape == want.shape else np.inf
            self.max_diff = max(self.max_diff, diff)
            self.counts["chunks_checked"] += 1
            if diff > TOL:
                self.counts["mismatches"] += 1
                print(f"MISMATCH {stream.name} chunk {i}: max diff {diff:.3g}", flush=True)
        sent = max([stream.pos, *stream.outputs]) if stream.outputs else stream.pos
        self.counts["unreceived"] += sum(1 for i in range(sent) if i not in stream.outputs)
        self.counts["streams_completed"] += 1

    def client_of(self, stream: SoakStream) -> Client:
        """The Client that carries ``stream``."""
        return self.client

    def submit(self, stream: SoakStream, i: int) -> Future:
        """Send chunk ``i`` of ``stream``; returns its Future."""
        return self.client_of(stream).push_async(stream.name, stream.chunk(i))

    def failed(self, stream: SoakStream, exc: Exception) -> None:
        """A chunk of ``stream`` failed with ``exc`` (the chunks after it may be pending)."""
        raise NotImplementedError

    def pump(self, k: int) -> bool:
        """Top up stream ``k``'s window and collect its finished chunks in order; a finished
        stream is verified and replaced. True if any chunk finished."""
        from streamrnn.errors import StreamRNNError

        stream, progressed = self.live[k], False
        while (not self.draining and stream.pos < stream.chunks
               and len(stream.pending) < self.args.window):
            stream.pending[stream.pos] = self.submit(stream, stream.pos)
            stream.pos += 1
        for i in sorted(stream.pending):
            future = stream.pending[i]
            if not future.done():
                break
            del stream.pending[i]
            progressed = True
            try:
                stream.outputs[i] = np.array(future.result())
                self.counts["chunks_received"] += 1
            except StreamRNNError as exc:
                self.counts[f"stream_errors_{type(exc).__name__}"] += 1
                self.failed(stream, exc)
                break
        if stream.done and not self.draining:
            self.verify(stream)
            self.client_of(stream).close_async(stream.name)  # frees its state; not waited
            self.live[k] = self._new_stream()
        return progressed


class Soak(StreamSoak):
    """One soak run: a durable worker, one client, ``args.streams`` live streams."""

    def __init__(self, args: argparse.Namespace):
        from streamrnn.cli.process import WorkerProcess

        super().__init__(args, "streamrnn-soak-")
        self.worker_args = (
            "--no-xla", "--max-bucket", "32", "--checkpoint-dir", str(self.tmp / "ckpt"),
            "--checkpoint-every-steps", "20", "--checkpoint-every-s", "0.5",
            "--max-streams", str(args.max_streams), "--max-queue", "512")
        self.worker = WorkerProcess.start(self.model_path, args.slots,
                                          *self.worker_args, log_path=self.tmp / "worker-0.log")
        self.endpoint = self.worker.endpoint
        self.client = self._new_client()
        self.restarts = 0

    def _new_client(self) -> Client:
        from streamrnn.client import Client

        return Client(self.endpoint, timeout=1.0, retries=60, window=self.args.window)

    def failed(self, stream: SoakStream, exc: Exception) -> None:
        self.resync(stream)

    def resync(self, stream: SoakStream) -> None:
        """Continue from where the worker says the stream is (after a failure/restart)."""
        from streamrnn.errors import StreamRNNError

        stream.pending.clear()
        while True:
            try:
                stream.pos = int(self.client.open(stream.name)["next_seq"])
                break
            except StreamRNNError as exc:  # the worker is restarting: ask again
                self.counts[f"open_retries_{type(exc).__name__}"] += 1
        self.counts["resyncs"] += 1

    def kill_worker(self) -> None:
        """SIGKILL the worker and restart it from its checkpoint on the same endpoint."""
        from streamrnn.cli.process import WorkerProcess

        self.worker.proc.kill()
        self.worker.proc.wait()
        self.restarts += 1
        self.worker = WorkerProcess.start(self.model_path, self.args.slots,
                                          *self.worker_args, bind=self.endpoint,
                                          log_path=self.tmp / f"worker-{self.restarts}.log")
        self.counts["worker_kills"] += 1

    def restart_client(self) -> None:
        """Throw the client away (abandoning in-flight requests) and resync every stream."""
        self.client_counters.update(self.client.counters)
        self.client.shutdown()
        self.client = self._new_client()
        for stream in self.live:
            self.resync(stream)
        self.counts["client_restarts"] += 1

    def run(self) -> dict:
        args = self.args
        start = time.monotonic()
        next_kill = start + args.kill_every
        next_client_restart = start + args.client_restart_every
        print(f"soak: {args.seconds:.0f} s, {args.streams} streams x {args.steps} steps, "
              f"slots={args.slots}, max_streams={args.max_streams}, worker {self.endpoint}",
              flush=True)
        while (now := time.monotonic()) - start < args.seconds:
            if now >= next_kill:
                self.kill_worker()
                print(f"[{now - start:6.1f} s] worker SIGKILLed and restarted", flush=True)
                next_kill = time.monotonic() + args.kill_every
            if now >= next_client_restart:
                self.restart_client()
                print(f"[{now - start:6.1f} s] client restarted", flush=True)
                next_client_restart = time.monotonic() + args.client_restart_every
            progressed = [self.pump(k) for k in range(len(self.live))]
            if not any(progressed):
                time.sleep(0.002)
        return self.finish()

    def finish(self) -> dict:
        """Stop everything, check the partly done streams, and summarise."""
        self.client_counters.update(self.client.counters)
        self.client.shutdown()
        for stream in self.live:  # partially done streams: check what they received
            self.verify(stream)
            self.counts["streams_completed"] -= 1
            self.counts["streams_partial"] += 1
        self.counts["worker_exit_status"] = self.worker.stop()
        return {"seconds": self.args.seconds,
                "streams_total": self.counts["streams_completed"]
                + self.counts["streams_partial"], "mismatches": self.counts["mismatches"],
                **self.counts, "max_abs_diff": self.max_diff,
                "client": dict(self.client_counters)}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.cluster:
        from bench.soak_cluster import ClusterSoak

        summary = ClusterSoak(args).run()
    else:
        summary = Soak(args).run()
    print(json.dumps(summary, indent=2, sort_keys=True))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2, sort_keys=True))
    return 1 if summary.get("mismatches") or summary.get("problems") else 0


if __name__ == "__main__":
    sys.exit(main())
