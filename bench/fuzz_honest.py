"""Honest streams for bench/fuzz_hostile.py: a Client that owns its streams (a token) and
pushes them while the attackers run, every output checked against one offline call.

Each stream has a fixed input sequence ``(steps, features)`` cut into random chunks of 1-16
steps; at its end the stream's outputs are compared with the model applied once to the
whole sequence (max abs difference), the stream is RESET by its owner and starts again.
A client error (a timeout, an ERROR) is counted and the stream is reset and restarted.

Example::

    honest = HonestTraffic(endpoint, model, streams=6, steps=300, seed=0)
    honest.start_streams(); honest.start(); ...; summary = honest.stop()
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import numpy as np

__all__ = ["HONEST_TOKEN", "HonestTraffic"]

HONEST_TOKEN = "honest-owner-token-7f3a"


class _Stream:
    def __init__(self, name: str, x: np.ndarray, ref: np.ndarray, rng: np.random.Generator):
        self.name, self.x, self.ref = name, x, ref
        cuts = [0]
        while cuts[-1] < len(x):
            cuts.append(min(len(x), cuts[-1] + int(rng.integers(1, 17))))
        self.cuts = cuts
        self.pos = 0
        self.outputs: list[np.ndarray] = []


class HonestTraffic(threading.Thread):
    """A thread pushing ``streams`` honest streams round-robin through one Client."""

    def __init__(self, endpoint: str, model: Any, streams: int, steps: int, seed: int,
                 features: int):
        super().__init__(name="honest-traffic", daemon=True)
        import tensorflow as tf

        from streamrnn.client import Client

        rng = np.random.default_rng(seed + 1)
        offline = tf.function(lambda x: model(x), reduce_retracing=True)
        self.streams = []
        for i in range(streams):
            x = rng.standard_normal((steps, features)).astype(np.float32)
            ref = np.asarray(offline(x[None]))[0]
            self.streams.append(_Stream(f"honest-{seed}-{i}", x, ref, rng))
        self.client = Client(endpoint, timeout=10.0, retries=30, window=4, token=HONEST_TOKEN)
        self.counts: Counter[str] = Counter()
        self.max_diff = 0.0
        self._halt = threading.Event()

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.streams]

    def start_streams(self) -> None:
        """Push every stream's first chunk (the streams exist, owned, before any attack)."""
        for stream in self.streams:
            self._step(stream)

    def run(self) -> None:
        while not self._halt.is_set():
            for stream in self.streams:
                if self._halt.is_set():
                    break
                self._step(stream)

    def _step(self, stream: _Stream) -> None:
        from streamrnn.errors import StreamRNNError

        a, b = stream.cuts[stream.pos], stream.cuts[stream.pos + 1]
        try:
            stream.outputs.append(np.asarray(self.client.push(stream.name, stream.x[a:b])))
            self.counts["chunks"] += 1
            stream.pos += 1
            if stream.pos == len(stream.cuts) - 1:
                self._verify(stream)
                self.client.reset(stream.name)
                self._restart(stream)
        except StreamRNNError as exc:
            self.counts[f"error_{type(exc).__name__}"] += 1
            self._check_partial(stream)
            try:
                self.client.reset(stream.name)
            except StreamRNNError as again:
                self.counts[f"reset_error_{type(again).__name__}"] += 1
            self._restart(stream)

    def _verify(self, stream: _Stream) -> None:
        got = np.concatenate(stream.outputs)
        diff = float(np.abs(got - stream.ref[: len(got)]).max())
        self.max_diff = max(self.max_diff, diff)
        self.counts["streams_verified"] += 1
        if diff > 1e-5:
            self.counts["mismatches"] += 1

    def _check_partial(self, stream: _Stream) -> None:
        if stream.outputs:
            self._verify(stream)
            self.counts["streams_verified"] -= 1
            self.counts["partial_verified"] += 1

    @staticmethod
    def _restart(stream: _Stream) -> None:
        stream.pos, stream.outputs = 0, []

    def stop(self) -> dict[str, Any]:
        """Stop the thread, check what each stream received so far, close the client."""
        self._halt.set()
        self.join(timeout=60)
        for stream in self.streams:
            self._check_partial(stream)
        counters = dict(self.client.counters)
        self.client.shutdown()
        return {**self.counts, "max_abs_diff": self.max_diff, "client": counters}
