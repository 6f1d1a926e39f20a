"""Router: one client endpoint in front of many stream workers. Stateless and replicated:
run as many as you like on one Redis (``--store redis://...``), a Client may be given all
of them and moves on when one dies.

Clients talk to a router exactly as to a worker (docs/protocol.md). Workers do not talk to
the router: each holds a lease in Redis (``streamrnn worker --store redis://...``) that
publishes its client endpoint, CURVE public key and load, and it claims the streams it
serves (a compare-and-set on the stream's holder with a growing epoch).

* **Holders from Redis** (:class:`~streamrnn.cluster.holders.HolderView`): the live
  workers are read every 0.25 s; a stream's worker is cached, filled on a miss from its
  holder in Redis, updated by claim notices, and dropped on a NOT_HOLDER reply, on CLOSE /
  EXPIRED, or when its worker's lease disappears. A stream with no live holder goes to the
  least-loaded live worker (:mod:`~streamrnn.cluster.placement`), which claims it and
  restores its checkpoint from Redis. No live worker: ERROR ``UNAVAILABLE``.
* **Forwarding**: one DEALER per live worker (:class:`~streamrnn.cluster.worker_links.
  WorkerLinks`, CURVE when ``curve_client_key`` is set); the router rewrites ``rid`` and
  forwards the arrays as they came. A BATCH envelope is split into its parts, each routed on
  its own (their holders read from Redis in one pipeline).
* **Vouched client key**: every forwarded request carries ``client_key``, the client's CURVE
  public key as the client socket authenticated it (none without CURVE there); a
  ``client_key`` the client sent itself is always dropped. Workers that list this router in
  ``--curve-routers`` take it as the request's identity (stream owners, per-identity quota).
* **NOT_HOLDER**: a worker that does not hold the stream refuses it; the router drops its
  cache entry, asks Redis again and forwards the same frames again (at most
  ``not_holder_retries`` times), else answers BUSY (the client resends).
* **A worker's lease disappears**: its requests still waiting are answered BUSY (the client
  resends; the stream's next request goes to whoever claims it). Late replies for requests
  the router no longer waits for are dropped and counted (``late_worker_replies``).
* **Robustness**: an exception while handling one message is counted
  (``handler_errors``) and logged, and the loop goes on; if the routing thread dies anyway,
  :attr:`Router.failed` is set and ``streamrnn router`` exits non-zero.

STATS (``{"router": ...}``) gives the counters, the cached streams and each live worker's
name and load; never an endpoint.

Example::

    router = Router(RouterConfig(bind="tcp://127.0.0.1:5555",
                                 store="redis://127.0.0.1:6379/0"))
    endpoint = router.start(); ...; router.stop(); router.join()
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from streamrnn.cluster.front import Front, echo
from streamrnn.cluster.holders import HolderView, Unroutable
from streamrnn.cluster.worker_links import WorkerLinks
from streamrnn.codec import Message, decode_batch, decode_request, is_batch
from streamrnn.errors import ProtocolError
from streamrnn.protocol import (
    F_CLIENT_KEY,
    F_CODE,
    F_MESSAGE,
    F_PARTS,
    F_REQUEST_ID,
    F_STATS,
    F_STREAM,
    MAX_FRAME_BYTES,
    ErrorCode,
    MessageType,
)
from streamrnn.serving.sockets import bind_client_socket, curve_user

__all__ = ["Router", "RouterConfig"]

log = logging.getLogger("streamrnn.router")

_NOT_HOLDER = int(ErrorCode.NOT_HOLDER)
_ENGINE_FULL = int(ErrorCode.ENGINE_FULL)
_ERROR = bytes((MessageType.ERROR,))
_EXPIRED = bytes((MessageType.EXPIRED,))
_ACK = bytes((MessageType.ACK,))


@dataclass
class RouterConfig:
    bind: str = "tcp://127.0.0.1:5555"  # clients
    store: str | None = None  # redis://... (required unless a store object is given)
    refresh_s: float = 0.25  # how often the live workers are read from Redis
    busy_retry_after_ms: int = 20
    not_holder_retries: int = 2  # re-resolve and forward again after NOT_HOLDER
    pending_timeout_s: float = 60.0  # forget a forwarded request never answered
    max_frame_bytes: int = MAX_FRAME_BYTES
    curve_secret_key: str | None = None  # CURVE server key file for the client socket
    curve_allow: str | None = None  # client public keys (file or directory)
    curve_client_key: str | None = None  # CURVE key pair toward the workers (.key_secret)


@dataclass(slots=True)
class _Pending:
    """A forwarded request: who asked, and its frames, to forward again after NOT_HOLDER."""

    identity: bytes
    rid: int | None
    stream: str
    kind: MessageType
    header: dict[str, Any]
    type_frame: Any
    arrays: list
    worker: str = ""
    tries: int = 0
    sent: float = 0.0


class Router:
    """Routes client requests to the workers that hold their streams (see the module docs).

    Args:
        config: the settings.
        store: a :class:`~streamrnn.cluster.redis_store.RedisStore` (default: one from
            ``config.store``).
    """

    def __init__(self, config: RouterConfig, store: Any = None,
                 context: zmq.Context | None = None):
        if store is None:
            if not config.store:
                raise ValueError("the router needs a store: --store redis://host:port/0 "
                                 "(workers publish their leases and streams there)")
            from streamrnn.cluster.redis_store import RedisStore

            store = RedisStore.from_url(config.store)
        self.config = config
        self.store = store
        self._ctx = context or zmq.Context.instance()
        self.counts: Counter[str] = Counter()
        self._poller = zmq.Poller()
        self.links = WorkerLinks(self._ctx, self._poller, config.curve_client_key)
        self.holders = HolderView(store, self.counts, config.refresh_s,
                                   usable=self.links.usable)
        self._pending: dict[int, _Pending] = {}
        self._rids = itertools.count(1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.front: Front | None = None
        self._auth: Any = None
        self.endpoint: str | None = None
        self.failed: BaseException | None = None  # why the routing thread died
        self._started = time.monotonic()

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> str:
        """Bind the client socket, read Redis, start the routing thread; returns the
        client endpoint."""
        sock, self._auth = bind_client_socket(
            self._ctx, self.config.bind, self.config.max_frame_bytes, linger_ms=1000,
            curve_secret_key=self.config.curve_secret_key, curve_allow=self.config.curve_allow)
        self.front = Front(sock, self.counts, self.config.busy_retry_after_ms)
        self.endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.holders.start()
        self._thread = threading.Thread(target=self._loop, name="streamrnn-router",
                                        daemon=True)
        self._thread.start()
        return self.endpoint

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is None or not self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        view = self.holders
        return {"uptime_s": round(time.monotonic() - self._started, 3),
                "counts": dict(self.counts), "streams": view.cached,
                "pending": len(self._pending),
                "workers": {name: {"alive": True, "streams": int(info.streams),
                                   "capacity_left": int(info.capacity_left),
                                   "assigned": view.assigned_to(name)}
                            for name, info in list(view.live.items())}}

    # ---- loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        front = self.front.sock
        self._poller.register(front, zmq.POLLIN)
        next_sweep = time.monotonic() + 1.0
        try:
            self._sync()
            while not self._stop.is_set():
                events = dict(self._poller.poll(20))
                if front in events:
                    _drain(front, self._guarded(self._on_client))
                for sock in self.links.readable(events):
                    _drain(sock, self._guarded(self._on_worker_reply))
                self._sync()
                if time.monotonic() >= next_sweep:
                    self._sweep()
                    next_sweep = time.monotonic() + 1.0
        except BaseException as exc:  # noqa: BLE001 - recorded: the process exits non-zero
            self.failed = exc
            log.exception("router loop failed; the router stops")
        finally:
            self.holders.stop()
            self.links.close()
            front.close()
            if self._auth is not None:
                self._auth.stop()

    def _guarded(self, handle: Callable[[list], None]) -> Callable[[list], None]:
        """``handle`` with its exceptions counted and logged (one bad message never stops
        the routing thread)."""

        def guarded(frames: list) -> None:
            try:
                handle(frames)
            except Exception:  # noqa: BLE001 - counted, logged, and the loop goes on
                self.counts["handler_errors"] += 1
                n = self.counts["handler_errors"]
                if n & (n - 1) == 0:  # 1, 2, 4, 8, ...: a flood does not flood the log
                    log.exception("error handling a message (%d so far)", n)

        return guarded

    def _sync(self) -> None:
        """Apply Redis updates: connect new workers; BUSY the requests of vanished ones."""
        left = self.holders.poll()
        self.links.sync(self.holders.live)
        if left:
            gone = set(left)
            self.counts["workers_left"] += len(gone)
            log.warning("worker(s) %s left (lease gone); their streams move on their next "
                        "request", sorted(gone))
            for own_rid, pending in list(self._pending.items()):
                if pending.worker in gone:
                    del self._pending[own_rid]
                    self.front.busy(pending.identity, pending.header, pending.rid)

    def _sweep(self) -> None:
        """Forget forwarded requests never answered (the client resent them long ago)."""
        limit = time.monotonic() - self.config.pending_timeout_s
        for own_rid in [r for r, p in self._pending.items() if p.sent < limit]:
            del self._pending[own_rid]
            self.counts["pending_expired"] += 1

    # ---- clients -----------------------------------------------------------------------

    def _on_client(self, frames: list) -> None:
        identity = frames[0].bytes
        # the client's CURVE public key (z85), vouched for to the workers (None: no CURVE)
        key = curve_user(frames[0]) if self._auth is not None else None
        if is_batch(frames[1:]):
            self._on_batch(identity, frames[1:], key)
            return
        try:
            msg = decode_request(frames[1:])
        except ProtocolError as exc:
            self.front.malformed(identity, exc)
            return
        self._on_message(identity, msg, frames[1], frames[3:], key)

    def _on_batch(self, identity: bytes, body: list, key: str | None) -> None:
        """A BATCH envelope: each part is routed as a request of its own (its stream may
        live on any worker); the client gets the parts' replies one by one."""
        try:
            header, parts = decode_batch(body)
        except ProtocolError as exc:
            self.front.malformed(identity, exc)
            return
        self.counts["requests_batch"] += 1
        try:
            self.holders.prefetch(p.header[F_STREAM] for p in parts
                                    if isinstance(p, Message) and F_STREAM in p.header)
        except Exception as exc:  # noqa: BLE001 - each part then asks on its own
            self.counts["store_errors"] += 1
            log.warning("cannot read holders from the store: %s", exc)
        payload = body[2].buffer
        for (type_byte, _, regions), part in zip(header[F_PARTS], parts, strict=True):
            if isinstance(part, ProtocolError):
                self.front.malformed(identity, part)
            else:
                self._on_message(identity, part, bytes((type_byte,)),
                                 [payload[o:o + n] for o, n in regions], key)

    def _on_message(self, identity: bytes, msg: Message, type_frame: Any,
                    array_frames: list, key: str | None = None) -> None:
        """Answer or forward one decoded request; ``array_frames`` are its arrays as they
        came (forwarded without copies); ``key``: the client's CURVE key, vouched for in
        ``client_key`` (what the client put there itself is dropped)."""
        rid = msg.header.get(F_REQUEST_ID)
        self.counts[f"requests_{msg.type.name.lower()}"] += 1
        if msg.type == MessageType.PING:
            self.front.pong(identity, msg, rid, self.holders.live)
            return
        if msg.type == MessageType.STATS:
            self.front.reply(identity, MessageType.ACK, {F_STATS: {"router": self.stats()}}, rid)
            return
        header = dict(msg.header)
        header.pop(F_REQUEST_ID, None)
        header.pop(F_CLIENT_KEY, None)  # a client never speaks for a key
        if key is not None:
            header[F_CLIENT_KEY] = key
        self._forward(_Pending(identity, rid, header[F_STREAM], msg.type, header, type_frame,
                               array_frames))

    def _forward(self, pending: _Pending) -> None:
        """Send ``pending`` to its stream's worker, or answer ERROR / BUSY."""
        try:
            worker = self.holders.route(pending.stream)
        except Unroutable as exc:
            self.counts[f"refused_{exc.code.name.lower()}"] += 1
            self.front.reply(pending.identity, MessageType.ERROR,
                        {**echo(pending.header), F_CODE: int(exc.code), F_MESSAGE: str(exc)},
                        pending.rid)
            return
        except Exception as exc:  # noqa: BLE001 - the store is unreachable: try again later
            self.counts["store_errors"] += 1
            log.warning("cannot read the holder of %r from the store: %s", pending.stream, exc)
            self.front.busy(pending.identity, pending.header, pending.rid)
            return
        own_rid = next(self._rids)
        out = [pending.type_frame,
               msgpack.packb({**pending.header, F_REQUEST_ID: own_rid}, use_bin_type=True),
               *pending.arrays]
        try:
            self.links.send(worker, out)
        except (zmq.Again, KeyError):  # its queue is full, or not connected (yet)
            self.holders.forget(pending.stream)
            self.front.busy(pending.identity, pending.header, pending.rid)
            return
        pending.worker, pending.sent = worker, time.monotonic()
        self._pending[own_rid] = pending
        self.counts["forwarded"] += 1

    # ---- workers -----------------------------------------------------------------------

    def _on_worker_reply(self, frames: list) -> None:
        try:
            header = msgpack.unpackb(frames[1].bytes, raw=False)
            pending = self._pending.pop(header.get(F_REQUEST_ID), None)
        except Exception:  # noqa: BLE001 - a worker bug; nothing to route it to
            self.counts["bad_worker_replies"] += 1
            return
        if pending is None:
            self.counts["late_worker_replies"] += 1
            return
        msg_type = frames[0].bytes[:1]
        if msg_type == _ERROR and header.get(F_CODE) == _NOT_HOLDER:
            self._not_holder(pending)
            return
        if (msg_type == _EXPIRED or (pending.kind == MessageType.CLOSE and msg_type == _ACK)
                or (msg_type == _ERROR and header.get(F_CODE) == _ENGINE_FULL)):
            # the worker forgot the stream, or never took it (full): place it afresh
            self.holders.forget(pending.stream)
        if pending.rid is None:
            header.pop(F_REQUEST_ID, None)
        else:
            header[F_REQUEST_ID] = pending.rid
        self.front.send([pending.identity, frames[0],
                           msgpack.packb(header, use_bin_type=True), *frames[2:]])

    def _not_holder(self, pending: _Pending) -> None:
        """The worker does not hold the stream (another claimed it, or ours is stale): ask
        Redis again and forward the same frames (bounded), else BUSY."""
        self.counts["not_holder"] += 1
        self.holders.forget(pending.stream)
        self.holders.refresh_soon()
        pending.tries += 1
        if pending.tries > self.config.not_holder_retries:
            self.front.busy(pending.identity, pending.header, pending.rid)
            return
        self.counts["reforwarded"] += 1
        self._forward(pending)


def _drain(sock: zmq.Socket, handle: Callable[[list], None]) -> None:
    """Handle up to 1000 waiting messages of ``sock`` (then let the others have a turn)."""
    for _ in range(1000):
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        handle(frames)
