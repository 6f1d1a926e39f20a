"""A router's view of who holds which stream, read from Redis (no sockets).

* **Live workers**: a background thread reads :meth:`RedisStore.live_workers` every
  ``refresh_s`` (0.25 s) and hands the result to the routing thread; a worker whose lease
  expired (or that restarted under a new incarnation token) leaves the view.
* **Stream -> worker cache**: filled on a miss from :meth:`RedisStore.holders` (one pipelined
  read for all the streams of a BATCH) plus :class:`~streamrnn.cluster.placement.Placement`
  (a stream with no live holder goes to the least-loaded live worker, which claims it);
  updated by the claim script's ``srnn:claims`` notices (:meth:`RedisStore.watch`); dropped
  on a NOT_HOLDER reply (:meth:`HolderView.forget`), a CLOSE / EXPIRED, or when the worker's
  lease disappears. A stale entry is harmless: the worker answers NOT_HOLDER and the router
  asks Redis again.

Everything but the refresh thread and the notice callback runs on the routing thread; those
two only put updates on a queue that :meth:`HolderView.poll` applies.

Example::

    own = HolderView(store, counts)
    own.start()
    left = own.poll()                  # on the routing thread: names that left the view
    worker = own.route("s1")           # a live worker name, or raises Unroutable
    own.stop()
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from streamrnn.cluster.placement import Load, Placement
from streamrnn.errors import StreamRNNError
from streamrnn.protocol import ErrorCode

__all__ = ["HolderView", "Unroutable"]

log = logging.getLogger("streamrnn.router")


class Unroutable(StreamRNNError):
    """A request of this stream cannot be forwarded now (``code``: UNAVAILABLE)."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code


class HolderView:
    """Live workers and the stream -> worker cache of one router (see the module docs).

    Args:
        store: a :class:`~streamrnn.cluster.redis_store.RedisStore` (or anything with
            ``live_workers``, ``holders`` and ``watch``).
        counts: the router's counters (``store_errors``, ``claim_notices``, ...).
        refresh_s: how often the live workers are read.
        usable: which workers this router can talk to (e.g. CURVE keys); default: all.
        max_cached: streams in the cache at most (beyond: it is emptied and refilled).
    """

    def __init__(self, store: Any, counts: Counter[str], refresh_s: float = 0.25,
                 usable: Any = None, placement: Placement | None = None,
                 max_cached: int = 1_000_000):
        self.store = store
        self.max_cached = max_cached
        self.counts = counts
        self.refresh_s = refresh_s
        self.usable = usable or (lambda info: True)
        self.placement = placement or Placement()
        self.live: dict[str, Any] = {}  # name -> WorkerInfo (usable ones only)
        self._loads: dict[str, Load] = {}
        self._where: dict[str, str] = {}  # stream -> worker name
        self._streams_of: dict[str, set[str]] = {}  # worker name -> cached streams
        self._updates: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._thread = threading.Thread(target=self._refresh_loop, daemon=True,
                                        name="streamrnn-router-refresh")
        self._stop_watch: Any = None

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe to claim notices, read the live workers once, start refreshing."""
        self._stop_watch = self.store.watch(self._on_claim)
        self._read_live()
        self.poll()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        if self._stop_watch is not None:
            self._stop_watch()
        if self._thread.is_alive():
            self._thread.join(5)

    def refresh_soon(self) -> None:
        """Read the live workers now instead of at the next period (e.g. after NOT_HOLDER)."""
        self._kick.set()

    # ---- background thread and notice callback ----------------------------------------------

    def _refresh_loop(self) -> None:
        while not self._stop.is_set():
            self._kick.wait(self.refresh_s)
            self._kick.clear()
            if not self._stop.is_set():
                self._read_live()

    def _read_live(self) -> None:
        try:
            self._updates.put(("live", self.store.live_workers()))
        except Exception as exc:  # noqa: BLE001 - Redis down: keep the last view, say so
            self.counts["store_errors"] += 1
            log.warning("cannot read live workers from the store: %s", exc)

    def _on_claim(self, stream: str, worker: str, epoch: int) -> None:
        self._updates.put(("claim", stream, worker, epoch))

    # ---- routing thread ----------------------------------------------------------------

    def poll(self) -> list[str]:
        """Apply the updates that arrived; returns the names that left the live view (their
        cache entries are dropped; the caller closes their sockets and answers their
        pending requests)."""
        left: list[str] = []
        while True:
            try:
                update = self._updates.get_nowait()
            except queue.Empty:
                return left
            if update[0] == "live":
                left.extend(self._set_live(update[1]))
            else:
                self.counts["claim_notices"] += 1
                _, stream, worker, _epoch = update
                self._drop(stream)
                if worker in self.live:
                    self._cache(stream, worker)

    def _set_live(self, workers: dict[str, Any]) -> list[str]:
        fresh = {name: info for name, info in workers.items() if self.usable(info)}
        left = [name for name, info in self.live.items()
                if name not in fresh or fresh[name].token != info.token]
        for name in left:
            for stream in self._streams_of.pop(name, ()):
                self._where.pop(stream, None)
            self.placement.forget_worker(name)
        self.live = fresh
        self._loads = {name: Load(info.token, int(info.capacity_left), int(info.streams))
                       for name, info in fresh.items()}
        return left

    def route(self, stream: str) -> str:
        """The live worker a request of ``stream`` goes to (cached, or read from Redis and
        placed); raises :class:`Unroutable` (no live worker) or the store's error."""
        worker = self._where.get(stream)
        if worker is not None:
            return worker
        self.counts["holder_lookups"] += 1
        return self._decide(stream, self.store.holder(stream))

    def prefetch(self, streams: Iterable[str]) -> None:
        """Resolve the uncached ones of ``streams`` with one pipelined read (a BATCH's)."""
        misses = list(dict.fromkeys(s for s in streams if s not in self._where))
        if len(misses) < 2:
            return
        self.counts["holder_lookups"] += len(misses)
        for stream, holding in self.store.holders(misses).items():
            try:
                self._decide(stream, holding)
            except Unroutable:
                pass  # answered when the part itself is routed

    def _decide(self, stream: str, holding: Any) -> str:
        decision = self.placement.decide(stream, holding, self._loads, time.monotonic())
        if decision.refusal is not None:
            raise Unroutable(*decision.refusal)
        if decision.placed:
            self.counts["placed"] += 1
        self._cache(stream, decision.worker)
        return decision.worker

    def _cache(self, stream: str, worker: str) -> None:
        if len(self._where) >= self.max_cached and stream not in self._where:
            # bounded memory (e.g. streams abandoned without CLOSE): start over, refilled
            # from Redis on demand
            self.counts["cache_cleared"] += 1
            self._where.clear()
            self._streams_of.clear()
        self._where[stream] = worker
        self._streams_of.setdefault(worker, set()).add(stream)

    def _drop(self, stream: str) -> None:
        worker = self._where.pop(stream, None)
        if worker is not None:
            self._streams_of.get(worker, set()).discard(stream)

    def forget(self, stream: str) -> None:
        """Drop ``stream``'s cache entry (NOT_HOLDER, CLOSE, EXPIRED): next time ask Redis."""
        self._drop(stream)

    def assigned_to(self, worker: str) -> int:
        """Streams this router has cached on ``worker``."""
        return len(self._streams_of.get(worker, ()))

    @property
    def cached(self) -> int:
        """Streams in the cache."""
        return len(self._where)
