"""The claim-notice subscription behind :meth:`RedisStore.watch
<streamrnn.cluster.redis_store.RedisStore.watch>`.

The claim script publishes ``<epoch> <worker> <stream>`` on the store's ``claims`` channel;
a :class:`ClaimWatcher` thread calls ``on_claim(stream, worker, epoch)`` for each, and
subscribes again after a Redis failure (notices sent meanwhile are lost).

Example::

    stop = ClaimWatcher(store, lambda s, w, e: print(s, w, e)).start()
    store.claim("s1", "w1", token, 0)  # the thread prints: s1 w1 1
    stop()
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisClusterException, RedisError

from streamrnn.errors import StoreError

__all__ = ["ClaimWatcher", "parse_notice"]

log = logging.getLogger(__name__)


def parse_notice(data: bytes | str) -> tuple[str, str, int] | None:
    """``(stream, worker, epoch)`` from a claim notice, or None when malformed.

    Example:

    >>> parse_notice(b"3 w1 my stream")
    ('my stream', 'w1', 3)
    """
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
    parts = text.split(" ", 2)
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1]:
        return None
    return parts[2], parts[1], int(parts[0])


class ClaimWatcher:
    """Delivers the claim notices of ``store`` to ``on_claim`` from a daemon thread.

    :meth:`start` subscribes (and waits for the confirmation) before it returns, so a claim
    made afterwards is seen; it returns :meth:`stop`. An exception in ``on_claim`` is logged
    and the notices go on.

    Args:
        store: a :class:`~streamrnn.cluster.redis_store.RedisStore`.
        on_claim: ``on_claim(stream, worker, epoch)``.
        poll_s: how long one read waits (the stop latency).
    """

    def __init__(self, store: Any, on_claim: Callable[[str, str, int], None],
                 poll_s: float = 0.2) -> None:
        self.store = store
        self.on_claim = on_claim
        self.poll_s = poll_s
        self.stopping = threading.Event()
        self.pubsub: Any = None
        self.thread = threading.Thread(target=self._loop, name="redis-claims", daemon=True)

    def start(self) -> Callable[[], None]:
        """Subscribes, starts the thread, returns :meth:`stop`."""
        try:
            self._subscribe()
        except BaseException:
            self._close()
            raise
        self.thread.start()
        return self.stop

    def stop(self) -> None:
        """Stops the thread (idempotent) and closes the subscription."""
        self.stopping.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=5 + self.poll_s)

    def _subscribe(self) -> None:
        self.pubsub = self.store.client.pubsub()
        self.pubsub.subscribe(self.store.keys.claims)
        for _ in range(50):  # wait for the confirmation: then no later notice is missed
            msg = self.pubsub.get_message(timeout=0.1)
            if msg is not None and msg["type"] == "subscribe":
                return
        raise StoreError(f"redis store {self.store.where}: no SUBSCRIBE confirmation")

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                if self.pubsub is None:
                    self._subscribe()
                msg = self.pubsub.get_message(timeout=self.poll_s)
            except (RedisError, RedisClusterException, StoreError, OSError) as exc:
                log.warning("claim notices from %s interrupted (%s); subscribing again",
                            self.store.where, exc)
                self._close()
                self.stopping.wait(0.5)
                continue
            if msg is not None and msg["type"] == "message":
                self._deliver(msg["data"])
        self._close()

    def _close(self) -> None:
        if self.pubsub is not None:
            try:
                self.pubsub.close()
            except (RedisError, RedisClusterException, OSError):
                pass
            self.pubsub = None

    def _deliver(self, data: bytes) -> None:
        notice = parse_notice(data)
        if notice is None:
            log.warning("ignored a malformed claim notice %r", data[:100])
            return
        try:
            self.on_claim(*notice)
        except Exception:  # one bad callback must not end the notices
            log.exception("claim notice callback failed")
