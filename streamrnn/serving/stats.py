"""A worker's typed counters: the ``counts`` and ``errors`` maps of its STATS reply, and the
Prometheus metrics that move with them.

Both worker threads count (the I/O thread: requests, BUSY, malformed messages, unsent
replies; the compute thread: everything applied), so :class:`WorkerStats` takes a lock.
Every counter is in STATS from the start (0), under its :class:`Count` value; requests are
counted per type as ``requests_<type>`` (one key per request type, BATCH envelopes
included). docs/protocol.md lists them all (tests/serving/test_protocol_doc.py checks it).

Example::

    stats = WorkerStats(Metrics("worker"))
    stats.add(Count.BUSY)
    stats.request(MessageType.PUSH, 3)
    stats.error(ErrorCode.SEQ_GAP)
    counts, errors = stats.snapshot()   # {"busy": 1, "requests_push": 3, ...}, {"SEQ_GAP": 1}
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from streamrnn.metrics import Metrics
from streamrnn.protocol import REQUEST_TYPES, ErrorCode, MessageType, error_code_name

__all__ = ["Count", "WorkerStats"]


class Count(enum.Enum):
    """The worker's counters; each value is its key in STATS' ``counts``."""

    APPLIED_CLOSE = "applied_close"
    APPLIED_GENERATE = "applied_generate"
    APPLIED_PUSH = "applied_push"
    APPLIED_RESET = "applied_reset"
    BATCHES = "batches"  # batched steps run
    BUSY = "busy"
    CHECKPOINT_FAILURES = "checkpoint_failures"
    CHECKPOINTS = "checkpoints"
    COALESCED_PUSH = "coalesced_push"  # PUSHes that shared a step with their stream's previous
    DUPLICATES_REPLAYED = "duplicates_replayed"
    EXPIRED_REPLIES = "expired_replies"
    EXPIRED_STREAMS = "expired_streams"
    GENERATE_CALLS = "generate_calls"
    MALFORMED = "malformed"
    REPLIES_DROPPED = "replies_dropped"  # the client's pipe was full
    REPLIES_UNROUTABLE = "replies_unroutable"  # the client was gone
    TIMESTEPS = "timesteps"

    @classmethod
    def applied(cls, msg_type: MessageType) -> Count:
        """The ``applied_<type>`` counter of a RESET, CLOSE, GENERATE or PUSH."""
        return cls(f"applied_{msg_type.name.lower()}")


#: the Prometheus metric each counter also moves
_METRIC: dict[Count, Callable[[Metrics, int], None]] = {
    Count.BUSY: lambda m, n: m.busy.inc(n),
    Count.EXPIRED_STREAMS: lambda m, n: m.expiries.inc(n),
    Count.CHECKPOINTS: lambda m, n: m.checkpoints.inc(n),
    Count.BATCHES: lambda m, n: m.steps.inc(n),
    Count.TIMESTEPS: lambda m, n: m.record_timesteps(n),
}


class WorkerStats:
    """Counters of one worker (thread-safe) and the Prometheus ``metrics`` behind them."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {c.value: 0 for c in Count}
        self._counts.update({f"requests_{t.name.lower()}": 0 for t in sorted(REQUEST_TYPES)})
        self._errors: dict[str, int] = {}
        self._swaps = {"in": 0, "out": 0}  # the engine's swap totals at the last refresh

    def _bump(self, table: dict[str, int], key: str, n: int) -> None:
        with self._lock:
            table[key] = table.get(key, 0) + n

    def add(self, count: Count, n: int = 1) -> None:
        """Count ``n`` events of ``count``."""
        self._bump(self._counts, count.value, n)
        metric = _METRIC.get(count)
        if metric is not None:
            metric(self.metrics, n)

    def request(self, msg_type: MessageType, n: int = 1) -> None:
        """Count ``n`` received requests of ``msg_type`` (``requests_<type>``)."""
        name = msg_type.name.lower()
        self._bump(self._counts, f"requests_{name}", n)
        self.metrics.requests.labels(type=name).inc(n)

    def error(self, code: ErrorCode | int) -> None:
        """Count one ERROR reply with ``code``."""
        name = error_code_name(int(code))
        self._bump(self._errors, name, 1)
        self.metrics.errors.labels(code=name).inc()

    def step(self, seconds: float, fill: float) -> None:
        """Observe one batched step: its duration and the fraction of slots it stepped."""
        self.metrics.step_latency.observe(seconds)
        self.metrics.batch_fill.observe(fill)
        self.add(Count.BATCHES)

    def chunk_done(self, received: float) -> None:
        """Observe one chunk's receive-to-reply time (``received``: its arrival)."""
        self.metrics.chunk_latency.observe(time.monotonic() - received)

    def snapshot(self) -> tuple[dict[str, int], dict[str, int]]:
        """Copies of ``(counts, errors)`` as STATS reports them."""
        with self._lock:
            return dict(self._counts), dict(self._errors)

    def engine_gauges(self, engine_stats: Mapping[str, Any], weights_version: int) -> None:
        """Refresh the stream/slot/swap/weights metrics from the engine's ``stats()``."""
        metrics = self.metrics
        metrics.streams.set(engine_stats["streams"])
        metrics.slots_in_use.set(engine_stats["slots"] - engine_stats["free_slots"])
        for direction in ("in", "out"):
            total = engine_stats.get(f"swaps_{direction}", 0)
            metrics.swaps.labels(direction=direction).inc(total - self._swaps[direction])
            self._swaps[direction] = total
        metrics.weights_version.set(weights_version)
