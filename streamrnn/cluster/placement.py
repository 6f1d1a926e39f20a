"""Where a router sends a stream's request (pure: plain data in, a decision out; no sockets,
no Redis, no TensorFlow).

A router knows the live workers (from their Redis leases: name, incarnation ``token`` and
load) and, for a stream, its :class:`~streamrnn.cluster.redis_store.Holding` (the worker
that claimed it, with that worker's token when it claimed) or ``None`` (never claimed).

* **The holder is alive** (its name is live with the same token): the request goes there.
* **No live holder** (never claimed, released, or the holder's lease is gone or belongs to a
  newer incarnation of that name): the stream goes to the least-loaded live worker, the one
  with the most room (``capacity_left`` minus the streams this router placed on it within the
  last ``horizon_s``, since its published load does not count them yet); ties go to fewer
  streams, then to the name. That worker claims the stream (and restores its checkpoint).
* **No live worker**: ``UNAVAILABLE``.

Example::

    live = {"w1": Load(token="a", capacity_left=4, streams=0),
            "w2": Load(token="b", capacity_left=9, streams=3)}
    p = Placement(horizon_s=1.0)
    p.decide("s1", None, live, now=0.0)                  # Decision(worker="w2", placed=True)
    p.decide("s2", Holding("w1", "a", 3), live, now=0.0)  # Decision(worker="w1")
    p.decide("s3", None, {}, now=0.0).refusal              # (UNAVAILABLE, "no live worker ...")
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from streamrnn.protocol import ErrorCode

__all__ = ["Decision", "Load", "Placement", "holding_alive"]


@dataclass(frozen=True)
class Load:
    """A live worker as placement sees it: its lease token and its published load."""

    token: str
    capacity_left: int
    streams: int


@dataclass(frozen=True)
class Decision:
    """Forward to ``worker`` (``placed``: a new placement, the worker will claim the stream),
    or refuse with ``refusal`` = (code, message)."""

    worker: str | None = None
    placed: bool = False
    refusal: tuple[ErrorCode, str] | None = None


class Placement:
    """Holder-or-least-loaded decisions (see the module docs).

    Args:
        horizon_s: how long a placement counts against a worker's published room (a
            worker publishes its load with every lease renewal).
    """

    def __init__(self, horizon_s: float = 1.0):
        self.horizon_s = horizon_s
        self._placed: dict[str, deque[float]] = {}  # worker -> times of recent placements

    def decide(self, stream: str, holding: Any, live: Mapping[str, Load],
               now: float) -> Decision:
        """Where a request of ``stream`` goes; ``holding`` has ``worker`` and ``token``
        attributes (a :class:`~streamrnn.cluster.redis_store.Holding`) or is None."""
        if holding is not None and holding_alive(holding, live):
            return Decision(worker=holding.worker)
        worker = self.least_loaded(live, now)
        if worker is None:
            return Decision(refusal=(ErrorCode.UNAVAILABLE,
                                     f"no live worker behind this router can take stream "
                                     f"{stream!r}"))
        self._placed.setdefault(worker, deque()).append(now)
        return Decision(worker=worker, placed=True)

    def least_loaded(self, live: Mapping[str, Load], now: float) -> str | None:
        """The live worker with the most room at ``now`` (None: no live worker)."""
        best: tuple[int, int, str] | None = None
        for name, load in live.items():
            key = (-(load.capacity_left - self.recent(name, now)), load.streams, name)
            if best is None or key < best:
                best = key
        return None if best is None else best[2]

    def recent(self, worker: str, now: float) -> int:
        """Streams placed on ``worker`` within the last ``horizon_s`` before ``now``."""
        times = self._placed.get(worker)
        if not times:
            return 0
        while times and now - times[0] > self.horizon_s:
            times.popleft()
        return len(times)

    def forget_worker(self, worker: str) -> None:
        """``worker`` left: drop its placement history."""
        self._placed.pop(worker, None)


def holding_alive(holding: Any, live: Mapping[str, Load]) -> bool:
    """Whether ``holding``'s worker holds a live lease with the token it claimed under."""
    load = live.get(holding.worker) if holding.worker else None
    return load is not None and load.token == holding.token
