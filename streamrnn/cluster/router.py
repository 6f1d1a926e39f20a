"""Router: one client endpoint in front of many stream workers, with sticky admission and
failover from a shared checkpoint directory.

Clients talk to the router exactly as to a worker (docs/protocol.md). Workers register by
heartbeat (``streamrnn worker --register tcp://router:port``, see
:mod:`streamrnn.cluster.registration`): every ``heartbeat_s`` each worker sends its name, client
endpoint, checkpoint file and load to the router's *worker* socket.

* **Admission.** The first request of a stream (OPEN or PUSH) picks the live worker with the
  most room (``capacity_left`` from its heartbeat, minus streams admitted since); the
  stream then always goes there (sticky) until CLOSE or expiry. No worker with room: ERROR
  ``UNAVAILABLE`` (no worker at all) or ``ENGINE_FULL``; never a silent drop.
* **Forwarding.** The router keeps one DEALER per worker and rewrites ``rid`` (its own ids
  map back to the client's identity and ``rid``); arrays are forwarded as they came. A
  BATCH envelope is split into its parts, each routed on its own (replies go back plain).
* **Failover.** A worker silent for ``dead_after_s`` is declared dead. Its requests still
  waiting are answered BUSY (the client resends). Its streams are split among the
  survivors, which adopt them from the dead worker's checkpoint file (ADOPT; until done,
  requests of those streams are answered BUSY). Streams that were not in the file start
  over on a survivor, and clients replay them from their resend buffers (the worker answers
  ``SEQ_GAP``/``UNKNOWN_STREAM`` with the seq it resumed at). The file is then renamed
  ``<name>.ckpt.adopted-<time>`` so a restarted worker of that name does not resurrect
  them; a worker that comes back after being declared dead is fenced (told to exit).
  With no survivor, the streams wait (BUSY) for their worker to come back.

The decisions (who gets a new stream, who is dead, where a dead worker's streams go) are
made over plain data by :class:`~streamrnn.cluster.membership.Membership`; the worker side
(link socket, one DEALER per worker, ADOPT/FENCED, checkpoint files) is
:class:`~streamrnn.cluster.backend.WorkerBackend`; this module is the client side and the
loop. Link message kinds: :mod:`streamrnn.cluster.link`.

Example::

    router = Router(RouterConfig(bind="tcp://127.0.0.1:5555",
                                 workers_bind="tcp://127.0.0.1:5556"))
    router.start(); ...; router.stop(); router.join()
"""

from __future__ import annotations

import errno
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

from streamrnn.cluster.backend import WorkerBackend
from streamrnn.cluster.membership import Membership
from streamrnn.codec import Message, decode_batch, decode_request, encode, is_batch
from streamrnn.errors import ProtocolError
from streamrnn.protocol import (
    F_CODE,
    F_MESSAGE,
    F_PARTS,
    F_REQUEST_ID,
    F_RETRY_AFTER_MS,
    F_SEQ,
    F_STATS,
    F_STREAM,
    F_VERSIONS,
    MAX_FRAME_BYTES,
    SUPPORTED_VERSIONS,
    ErrorCode,
    MessageType,
    negotiate_version,
)
from streamrnn.serving.sockets import bind_client_socket

__all__ = ["Router", "RouterConfig"]

log = logging.getLogger("streamrnn.router")


@dataclass
class RouterConfig:
    bind: str = "tcp://127.0.0.1:5555"  # clients
    workers_bind: str = "tcp://127.0.0.1:5556"  # worker heartbeats
    heartbeat_s: float = 0.25  # expected heartbeat interval (told to nobody; for defaults)
    dead_after_s: float = 1.0  # silence after which a worker is declared dead
    busy_retry_after_ms: int = 20
    adopt_timeout_s: float = 30.0
    max_frame_bytes: int = MAX_FRAME_BYTES
    curve_secret_key: str | None = None  # CURVE server key file for the client socket
    curve_allow: str | None = None  # client public keys (file or directory)


@dataclass(slots=True)
class _Pending:
    identity: bytes
    rid: int | None
    stream: str | None
    worker: str
    kind: MessageType


class Router:
    """Routes client requests to registered workers (see the module docs)."""

    def __init__(self, config: RouterConfig, context: zmq.Context | None = None):
        self.config = config
        self._ctx = context or zmq.Context.instance()
        self.membership = Membership()
        self._backend: WorkerBackend | None = None
        self._pending: dict[int, _Pending] = {}
        self._rids = itertools.count(1)
        self.counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._auth: Any = None
        self.endpoint: str | None = None
        self.workers_endpoint: str | None = None
        self._started = time.monotonic()

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> tuple[str, str]:
        """Bind both sockets and start the routing thread; returns (client, worker) endpoints."""
        front, self._auth = bind_client_socket(
            self._ctx, self.config.bind, self.config.max_frame_bytes, linger_ms=1000,
            curve_secret_key=self.config.curve_secret_key, curve_allow=self.config.curve_allow)
        backend = self._backend = WorkerBackend(
            self._ctx, self.config.workers_bind, self.membership, self.counts,
            dead_after_s=self.config.dead_after_s, adopt_timeout_s=self.config.adopt_timeout_s)
        self.endpoint = front.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.workers_endpoint = backend.endpoint
        self._thread = threading.Thread(target=self._loop, args=(front, backend),
                                        name="streamrnn-router", daemon=True)
        self._thread.start()
        return self.endpoint, self.workers_endpoint

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is None or not self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        return {"uptime_s": round(time.monotonic() - self._started, 3),
                "counts": dict(self.counts), **self.membership.stats()}

    # ---- loop --------------------------------------------------------------------------

    def _loop(self, front: zmq.Socket, backend: WorkerBackend) -> None:
        poller = backend.poller
        poller.register(front, zmq.POLLIN)
        next_check = time.monotonic()
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(50))
                if backend.link in events:
                    _drain(backend.link, backend.on_link)
                if front in events:
                    _drain(front, lambda f: self._on_client(front, f))
                for sock in backend.readable(events):
                    _drain(sock, lambda f: self._on_worker_reply(front, f))
                now = time.monotonic()
                if now >= next_check:
                    backend.check(now, on_dead=lambda name: self._unanswered(front, name))
                    next_check = now + min(0.1, self.config.dead_after_s / 4)
        except Exception:  # pragma: no cover - a bug; keep the process from hanging
            log.exception("router loop failed")
            raise
        finally:
            backend.close()
            front.close()
            if self._auth is not None:
                self._auth.stop()

    # ---- clients -----------------------------------------------------------------------

    def _reply(self, front: zmq.Socket, identity: bytes, msg_type: MessageType,
               header: dict[str, Any], rid: int | None) -> None:
        if rid is not None:
            header = {**header, F_REQUEST_ID: rid}
        self._send_client(front, [identity, *encode(msg_type, header)])

    def _send_client(self, front: zmq.Socket, frames: list) -> None:
        try:
            front.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # ROUTER_MANDATORY: the client is gone or full
            self.counts["replies_unroutable" if exc.errno == errno.EHOSTUNREACH
                        else "replies_dropped"] += 1

    def _on_client(self, front: zmq.Socket, frames: list) -> None:
        identity = frames[0].bytes
        if is_batch(frames[1:]):
            self._on_batch(front, identity, frames[1:])
            return
        try:
            msg = decode_request(frames[1:])
        except ProtocolError as exc:
            self._malformed(front, identity, exc)
            return
        self._on_message(front, identity, msg, frames[1], frames[3:])

    def _malformed(self, front: zmq.Socket, identity: bytes, exc: ProtocolError) -> None:
        self.counts["malformed"] += 1
        header = {**exc.context, F_CODE: int(exc.code), F_MESSAGE: str(exc)}
        if exc.code == ErrorCode.UNSUPPORTED_VERSION:
            header[F_VERSIONS] = list(SUPPORTED_VERSIONS)
        self._send_client(front, [identity, *encode(MessageType.ERROR, header)])

    def _on_batch(self, front: zmq.Socket, identity: bytes, body: list) -> None:
        """A BATCH envelope: each part is routed as a request of its own (its stream may
        live on any worker); the client gets the parts' replies one by one."""
        try:
            header, parts = decode_batch(body)
        except ProtocolError as exc:
            self._malformed(front, identity, exc)
            return
        self.counts["requests_batch"] += 1
        payload = body[2].buffer
        for (type_byte, _, regions), part in zip(header[F_PARTS], parts, strict=True):
            if isinstance(part, ProtocolError):
                self._malformed(front, identity, part)
            else:
                self._on_message(front, identity, part, bytes((type_byte,)),
                                 [payload[o:o + n] for o, n in regions])

    def _on_message(self, front: zmq.Socket, identity: bytes, msg: Message, type_frame: Any,
                    array_frames: list) -> None:
        """Answer or forward one decoded request; ``array_frames`` are its arrays as they
        came (forwarded without copies)."""
        rid = msg.header.get(F_REQUEST_ID)
        self.counts[f"requests_{msg.type.name.lower()}"] += 1
        if msg.type == MessageType.PING:
            self._on_ping(front, identity, msg, rid)
            return
        if msg.type == MessageType.STATS:
            self._reply(front, identity, MessageType.ACK, {F_STATS: {"router": self.stats()}},
                        rid)
            return
        stream = msg.header[F_STREAM]
        echo = {k: msg.header[k] for k in (F_STREAM, F_SEQ) if k in msg.header}
        placement = self.membership.place(stream)
        if placement.admitted:
            self.counts["admitted"] += 1
        if placement.refusal is not None:
            code, text = placement.refusal
            self.counts[f"refused_{code.name.lower()}"] += 1
            self._reply(front, identity, MessageType.ERROR,
                        {**echo, F_CODE: int(code), F_MESSAGE: text}, rid)
            return
        if placement.busy:  # moving, or its worker is dead and no survivor took it yet
            self._busy(front, identity, echo, rid)
            return
        own_rid = next(self._rids)
        self._pending[own_rid] = _Pending(identity, rid, stream, placement.worker, msg.type)
        header = dict(msg.header)
        header[F_REQUEST_ID] = own_rid
        out = [type_frame, msgpack.packb(header, use_bin_type=True), *array_frames]
        try:
            self._backend.send(placement.worker, out)
        except zmq.Again:
            del self._pending[own_rid]
            self._busy(front, identity, echo, rid)
            return
        self.counts["forwarded"] += 1

    def _busy(self, front: zmq.Socket, identity: bytes, echo: dict[str, Any],
              rid: int | None) -> None:
        self.counts["busy"] += 1
        self._reply(front, identity, MessageType.BUSY,
                    {**echo, F_RETRY_AFTER_MS: self.config.busy_retry_after_ms}, rid)

    def _on_ping(self, front: zmq.Socket, identity: bytes, msg: Message,
                 rid: int | None) -> None:
        offered = msg.header.get(F_VERSIONS) or [msg.header["v"]]
        chosen = negotiate_version(offered)
        if chosen is None:
            self._reply(front, identity, MessageType.ERROR, {
                F_CODE: int(ErrorCode.UNSUPPORTED_VERSION),
                F_MESSAGE: f"no common protocol version: offered {offered}",
                F_VERSIONS: list(SUPPORTED_VERSIONS)}, rid)
            return
        live = self.membership.live()
        info = dict(live[0].describe) if live else {}
        info["router"] = {"workers": len(live)}
        self._reply(front, identity, MessageType.PONG, {
            F_VERSIONS: list(SUPPORTED_VERSIONS), "version": chosen, "worker": info}, rid)

    # ---- workers -----------------------------------------------------------------------

    def _on_worker_reply(self, front: zmq.Socket, frames: list) -> None:
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
        forgotten = msg_type == bytes((MessageType.EXPIRED,)) or (
            pending.kind == MessageType.CLOSE and msg_type == bytes((MessageType.ACK,)))
        if forgotten and pending.stream is not None:
            self.membership.forget(pending.stream)
        if pending.rid is None:
            header.pop(F_REQUEST_ID, None)
        else:
            header[F_REQUEST_ID] = pending.rid
        self._send_client(front, [pending.identity, frames[0],
                                  msgpack.packb(header, use_bin_type=True), *frames[2:]])

    def _unanswered(self, front: zmq.Socket, name: str) -> None:
        """Worker ``name`` died: its requests never answered get BUSY (the client resends)."""
        for own_rid, pending in list(self._pending.items()):
            if pending.worker == name:
                del self._pending[own_rid]
                echo = {F_STREAM: pending.stream} if pending.stream is not None else {}
                self._busy(front, pending.identity, echo, pending.rid)


def _drain(sock: zmq.Socket, handle: Callable[[list], None]) -> None:
    """Handle up to 1000 waiting messages of ``sock`` (then let the others have a turn)."""
    for _ in range(1000):
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        handle(frames)
