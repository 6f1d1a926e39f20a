"""LeaseKeeper: a worker's lease in the Redis store, renewed from a thread.

The keeper registers the worker (its name and a fresh incarnation token, uuid4 hex), then
renews every ``ttl/4`` with the info dict returned by ``info()`` (endpoint, CURVE key, load).
``valid_until`` is the local ``time.monotonic()`` at the START of the last successful renew
plus the ttl: the server's lease cannot outlive it, so :meth:`LeaseKeeper.valid` is a local
check the compute thread may call on every round. A renew that is refused (the lease expired
or another incarnation took the name), or that succeeds only after ``valid_until`` passed,
or no successful renew before ``valid_until``, loses the lease for good: ``on_lost(reason)``
is called once and the keeper stops renewing; the worker must fence itself.

Example::

    keeper = LeaseKeeper(store, "w1", info=lambda: {"endpoint": "tcp://10.0.0.5:5555"},
                         ttl_ms=2000, on_lost=lambda why: log.error("lease lost: %s", why))
    keeper.start()              # raises NameTakenError if a live "w1" exists
    keeper.valid()              # True while the lease is known to hold
    keeper.stop()               # drops the lease (a clean stop)
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from streamrnn.errors import NameTakenError, StoreError

__all__ = ["DEFAULT_TTL_MS", "LeaseKeeper"]

log = logging.getLogger(__name__)

DEFAULT_TTL_MS = 2000


class LeaseKeeper:
    """Holds and renews worker ``name``'s lease in ``store`` (module docstring: the rules).

    Args:
        store: a :class:`~streamrnn.cluster.redis_store.RedisStore` (anything with its
            ``register``/``renew``/``drop_lease``).
        name: the worker name (unique among live workers).
        info: returns the info dict published on every renew
            (:data:`~streamrnn.cluster.redis_records.INFO_FIELDS`).
        ttl_ms: the lease ttl; renewed every ``ttl_ms / 4``.
        on_lost: called once, from the keeper thread, with the reason when the lease is lost.
        token: the incarnation token (default: a fresh uuid4 hex).
        register_wait_s: how long :meth:`start` retries while the name is still held by a
            lease of another token (a restarted worker's previous incarnation whose lease has
            not expired yet); default twice the ttl.
    """

    def __init__(self, store: Any, name: str, info: Callable[[], dict],
                 ttl_ms: int = DEFAULT_TTL_MS, on_lost: Callable[[str], None] | None = None,
                 token: str | None = None, register_wait_s: float | None = None) -> None:
        if ttl_ms < 40:
            raise ValueError(f"ttl_ms must be at least 40, got {ttl_ms}")
        self.store = store
        self.name = name
        self.info = info
        self.ttl_ms = int(ttl_ms)
        self.on_lost = on_lost
        self.token = token or uuid.uuid4().hex
        self.register_wait_s = 2 * ttl_ms / 1000 if register_wait_s is None else register_wait_s
        self.valid_until = 0.0
        self.lost: str | None = None
        self.renewals = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{name}", daemon=True)

    @property
    def interval_s(self) -> float:
        """Seconds between renews (ttl / 4)."""
        return self.ttl_ms / 4000

    def valid(self) -> bool:
        """True while the lease is known to hold (local clock; no Redis call)."""
        return self.lost is None and time.monotonic() < self.valid_until

    def start(self) -> LeaseKeeper:
        """Registers (retrying a taken name for ``register_wait_s``), starts renewing."""
        deadline = time.monotonic() + self.register_wait_s
        while True:
            began = time.monotonic()
            try:
                self.store.register(self.name, self.token, self.ttl_ms, self.info())
                break
            except NameTakenError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(min(self.interval_s, max(0.0, deadline - time.monotonic())))
        self.valid_until = began + self.ttl_ms / 1000
        self._thread.start()
        return self

    def stop(self, drop: bool = True) -> None:
        """Stops renewing and (``drop``) deletes the lease so that others adopt at once."""
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        if drop and self.lost is None:
            try:
                self.store.drop_lease(self.name, self.token)
            except StoreError as exc:
                log.warning("could not drop the lease of %s: %s", self.name, exc)

    def _renew_once(self) -> None:
        began = time.monotonic()
        try:
            ok = self.store.renew(self.name, self.token, self.ttl_ms, self.info())
        except Exception as exc:  # StoreError, or info() failing: retried until expiry
            if time.monotonic() >= self.valid_until:
                self._lose(f"no renew before the lease expired (last error: {exc})")
            else:
                log.warning("lease renew of %s failed, retrying: %s", self.name, exc)
            return
        if not ok:
            self._lose("the store refused the renew (lease expired or the name was taken)")
        elif time.monotonic() >= self.valid_until:
            self._lose("the renew came after the lease had expired")
        else:
            self.valid_until = began + self.ttl_ms / 1000
            self.renewals += 1

    def _loop(self) -> None:
        next_at = self.valid_until - self.ttl_ms / 1000 + self.interval_s
        while self.lost is None:
            if self._stopping.wait(max(0.0, next_at - time.monotonic())):
                return
            next_at = time.monotonic() + self.interval_s
            self._renew_once()
            if self.lost is None and time.monotonic() >= self.valid_until:
                self._lose("no renew before the lease expired")

    def _lose(self, reason: str) -> None:
        self.lost = reason
        log.error("worker %s lost its lease: %s", self.name, reason)
        if self.on_lost is not None:
            try:
                self.on_lost(reason)
            except Exception:  # the keeper thread must end cleanly either way
                log.exception("on_lost callback failed")
