"""Where a worker keeps its streams durable, and which streams it may serve: :class:`StreamStore`.

The worker's compute thread is given one store (or none: not durable) and calls it between
steps only. Two backends meet the protocol:

* the checkpoint directory (:class:`~streamrnn.serving.durability.WorkerCheckpointer`, one
  file per worker, ``--checkpoint-dir``): a single-machine worker that holds every stream
  it is sent, whose lease never lapses;
* Redis (``streamrnn.cluster.redis_checkpoints.RedisStreamStore``, ``--store redis://``):
  a stream is served only by the worker that holds its lease-backed claim; each stream has
  its own checkpoint, written with the claim's epoch, so the late write of a worker that
  lost its lease (a "zombie") is refused.

What the compute thread does with a store, each round:

1. ``lease_valid()`` is False: the worker *fences* itself (answers nothing more for the
   streams it held, drops their slots, stops; ``streamrnn worker`` exits with status 3);
2. the round's streams that are not ``holds(stream)`` are acquired in one
   ``acquire(streams, engine, table)`` call: each stream claimed with a checkpoint is
   restored into the engine and the sequence table (state rows, ``next_seq``, reply cache,
   pin); the requests of a stream not acquired are answered ERROR ``NOT_HOLDER``;
3. after the round, when ``due()`` (or a CLOSE waits for it): ``save(engine, table)``;
   ``durable[stream]`` is then the ``next_seq`` below which the stream's requests are in
   the store (replies carry it as ``durable_seq``).

Example::

    store: StreamStore = WorkerCheckpointer("/var/lib/streamrnn", name="w1")
    store.restore(engine, table)                     # on start
    held = store.acquire(["a", "b"], engine, table)  # {"a", "b"}: a file store holds all
    if store.due():
        store.save(engine, table)                    # -> {"a": 4, "b": 7}
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from streamrnn.serving.sequencing import SequenceTable

__all__ = ["StreamStore", "WriteCadence"]


@runtime_checkable
class StreamStore(Protocol):
    """A worker's durable store of stream checkpoints plus the streams it may serve.

    ``engine`` arguments are :class:`~streamrnn.serving.durability.DurableEngine` s (an
    Engine, or a WeightsFollower around one).
    """

    #: where the checkpoints go, for logs and STATS (a file path, or a Redis URL + name)
    where: str
    #: stream -> next_seq in the newest write (everything below it is durable)
    durable: dict[str, int]
    #: writes so far, and the last write's size in bytes and duration in seconds
    written: int
    last_bytes: int
    last_seconds: float

    def count_step(self, n: int = 1) -> None:
        """Count ``n`` batched engine steps (for a write every N steps)."""

    def due(self, now: float | None = None) -> bool:
        """True when a periodic write should happen now (and something changed)."""

    def save(self, engine: Any, table: SequenceTable) -> dict[str, int]:
        """Write the streams' checkpoints (between steps); returns :attr:`durable`."""

    def restore(self, engine: Any, table: SequenceTable) -> int:
        """On start: load what this worker may resume; returns the streams restored."""

    def lease_valid(self) -> bool:
        """False once this worker may no longer serve the streams it held (fence)."""

    def holds(self, stream: str) -> bool:
        """Whether this worker may serve ``stream`` now without acquiring it."""

    def acquire(self, streams: Iterable[str], engine: Any, table: SequenceTable) -> set[str]:
        """Claim ``streams`` (restoring each one's checkpoint); returns those now held."""

    def report(self) -> dict[str, Any]:
        """Backend figures for STATS' ``checkpoint`` map (may be empty)."""

    def close(self) -> None:
        """After the last :meth:`save` of a graceful stop: let the streams go."""


class WriteCadence:
    """When a store's periodic write is due (its :meth:`count_step` and :meth:`due`): after
    ``every_steps`` batched steps or ``every_s`` seconds (0: not by that), once a step ran
    since the last write."""

    every_steps: int
    every_s: float

    def _start_cadence(self, every_steps: int, every_s: float) -> None:
        if every_steps < 0 or every_s < 0:
            raise ValueError("checkpoint intervals must be >= 0")
        self.every_steps = every_steps
        self.every_s = every_s
        self._steps_since = 0
        self._last_write = time.monotonic()

    def count_step(self, n: int = 1) -> None:
        """Count ``n`` batched engine steps."""
        self._steps_since += n

    def due(self, now: float | None = None) -> bool:
        """True when a periodic write should happen now (and a step ran since the last)."""
        if self._steps_since == 0:
            return False
        if self.every_steps and self._steps_since >= self.every_steps:
            return True
        now = time.monotonic() if now is None else now
        return bool(self.every_s) and now - self._last_write >= self.every_s

    def _wrote(self) -> float:
        """Start counting again after a write; returns the time (``time.monotonic()``)."""
        self._steps_since = 0
        self._last_write = time.monotonic()
        return self._last_write
