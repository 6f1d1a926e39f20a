"""Helpers shared by the durability and router tests (a plain module, not a test module).

A small 2-layer LSTM saved once per test module (:func:`saved_model`), worker flags for a
quick start, random chunking, and :class:`Driver`: client threads that push many streams'
chunks pipelined in random interleaving and keep each stream's outputs in order.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import keras
import numpy as np
import pytest

import streamrnn
from tests.helpers.modelzoo import ModelSpec, build_model

SPEC = ModelSpec("lstm", layers=2, units=16, features=5, out=3)
FAST = ("--no-xla", "--max-bucket", "16")  # quick start: few, cheap traces


def saved_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[keras.Model, Path]:
    """``(model, path)``: the SPEC model (seed 4) and where it is saved as ``.keras``
    (the test modules' module-scoped ``model_file`` fixtures)."""
    model = build_model(SPEC, seed=4)
    path = tmp_path_factory.mktemp("durable") / "lstm.keras"
    model.save(path)
    return model, path


def chunked(x: np.ndarray, rng: np.random.Generator, most: int = 12) -> list[np.ndarray]:
    """``x`` cut into consecutive chunks of 1..``most`` steps."""
    cuts = [0]
    while cuts[-1] < len(x):
        cuts.append(min(len(x), cuts[-1] + int(rng.integers(1, most + 1))))
    return [x[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


class Driver:
    """``threads`` client threads, each with its own Client, pushing their streams' chunks
    in random interleaving, pipelined (4 per stream); each stream's outputs kept in order."""

    def __init__(self, endpoint: str, streams: dict[str, list[np.ndarray]], threads: int,
                 **client_kwargs):
        self.streams = streams
        self.outputs: dict[str, list[np.ndarray]] = {s: [] for s in streams}
        self.times: dict[str, list[float]] = {s: [] for s in streams}  # monotonic, per output
        self.errors: list[BaseException] = []
        self.received = 0
        self.counters: Counter[str] = Counter()
        self._lock = threading.Lock()
        names = sorted(streams)
        self.threads = [threading.Thread(target=self._run, args=(endpoint, names[i::threads],
                                                                 client_kwargs))
                        for i in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, endpoint: str, mine: list[str], client_kwargs: dict) -> None:
        try:
            with streamrnn.Client(endpoint, **client_kwargs) as client:
                rng = np.random.default_rng(len(self.outputs) + sum(map(len, mine)))
                pos = dict.fromkeys(mine, 0)
                pending: dict[str, list] = {s: [] for s in mine}
                while any(pos[s] < len(self.streams[s]) or pending[s] for s in mine):
                    s = mine[int(rng.integers(len(mine)))]
                    if pos[s] < len(self.streams[s]) and len(pending[s]) < 4:
                        pending[s].append(client.push_async(s, self.streams[s][pos[s]]))
                        pos[s] += 1
                    elif pending[s]:
                        self.outputs[s].append(pending[s].pop(0).result())
                        self.times[s].append(time.monotonic())
                        with self._lock:
                            self.received += 1
                with self._lock:
                    self.counters.update(client.counters)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self.threads), "client threads hung"
        assert not self.errors, self.errors
