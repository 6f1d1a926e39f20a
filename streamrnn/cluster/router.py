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

Worker link messages are two frames, ``[kind, msgpack map]`` (kinds in :data:`HEARTBEAT`,
:data:`ADOPT`, :data:`ADOPTED`, :data:`FENCED`).

Example::

    router = Router(RouterConfig(bind="tcp://127.0.0.1:5555",
                                 workers_bind="tcp://127.0.0.1:5556"))
    router.start(); ...; router.stop(); router.join()
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq

from streamrnn.cluster.link import ADOPT, ADOPTED, FENCED, HEARTBEAT
from streamrnn.codec import Message, decode_batch, decode_request, encode, is_batch
from streamrnn.errors import CheckpointError, ProtocolError
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
from streamrnn.serving.checkpoint import load_checkpoint
from streamrnn.serving.sockets import bind_client_socket

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


@dataclass
class _Worker:
    name: str
    identity: bytes  # on the worker socket
    endpoint: str
    checkpoint: str | None
    socket: zmq.Socket
    capacity_left: int = 0
    streams: int = 0
    admitted: int = 0  # streams admitted since its last heartbeat
    last_seen: float = field(default_factory=time.monotonic)
    describe: dict[str, Any] = field(default_factory=dict)
    alive: bool = True


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
        self._workers: dict[str, _Worker] = {}
        self._by_identity: dict[bytes, str] = {}
        self._fenced: set[bytes] = set()
        self._assigned: dict[str, str] = {}  # stream -> worker name (sticky)
        self._moving: dict[str, int] = {}  # stream -> ADOPT id it waits for
        self._adoptions: dict[int, dict[str, Any]] = {}
        self._pending: dict[int, _Pending] = {}
        self._rids = itertools.count(1)
        self._adopt_ids = itertools.count(1)
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
        back = self._ctx.socket(zmq.ROUTER)
        back.setsockopt(zmq.ROUTER_MANDATORY, 1)
        back.setsockopt(zmq.LINGER, 0)
        back.bind(self.config.workers_bind)
        self.endpoint = front.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.workers_endpoint = back.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._thread = threading.Thread(target=self._loop, args=(front, back),
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
        return {
            "uptime_s": round(time.monotonic() - self._started, 3),
            "counts": dict(self.counts),
            "streams": len(self._assigned),
            "moving": len(self._moving),
            "workers": {w.name: {"alive": w.alive, "endpoint": w.endpoint,
                                 "streams": w.streams, "capacity_left": w.capacity_left,
                                 "assigned": sum(1 for n in self._assigned.values()
                                                 if n == w.name)}
                        for w in self._workers.values()},
        }

    # ---- loop --------------------------------------------------------------------------

    def _loop(self, front: zmq.Socket, back: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        poller.register(back, zmq.POLLIN)
        self._poller = poller
        next_check = time.monotonic()
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(50))
                if back in events:
                    self._drain(back, lambda f: self._on_worker_link(back, f))
                if front in events:
                    self._drain(front, lambda f: self._on_client(front, f))
                for worker in list(self._workers.values()):
                    if worker.alive and worker.socket in events:
                        self._drain(worker.socket, lambda f: self._on_worker_reply(front, f))
                now = time.monotonic()
                if now >= next_check:
                    self._check_liveness(front, back, now)
                    next_check = now + min(0.1, self.config.dead_after_s / 4)
        except Exception:  # pragma: no cover - a bug; keep the process from hanging
            log.exception("router loop failed")
            raise
        finally:
            for worker in self._workers.values():
                worker.socket.close(linger=0)
            front.close()
            back.close()
            if self._auth is not None:
                self._auth.stop()

    @staticmethod
    def _drain(sock: zmq.Socket, handle: Any) -> None:
        for _ in range(1000):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handle(frames)

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
        if stream in self._moving:
            self._busy(front, identity, echo, rid)
            return
        name = self._assigned.get(stream)
        if name is None:
            name = self._admit(stream)
            if name is None:
                live = [w for w in self._workers.values() if w.alive]
                code = ErrorCode.ENGINE_FULL if live else ErrorCode.UNAVAILABLE
                text = (f"no worker has room for stream {stream!r} ({len(live)} live workers, "
                        "all full)" if live else
                        f"no live worker behind this router can take stream {stream!r}")
                self.counts[f"refused_{code.name.lower()}"] += 1
                self._reply(front, identity, MessageType.ERROR,
                            {**echo, F_CODE: int(code), F_MESSAGE: text}, rid)
                return
        worker = self._workers[name]
        if not worker.alive:  # its streams wait for a survivor or for it to come back
            self._busy(front, identity, echo, rid)
            return
        own_rid = next(self._rids)
        self._pending[own_rid] = _Pending(identity, rid, stream, name, msg.type)
        header = dict(msg.header)
        header[F_REQUEST_ID] = own_rid
        out = [type_frame, msgpack.packb(header, use_bin_type=True), *array_frames]
        try:
            worker.socket.send_multipart(out, zmq.NOBLOCK, copy=False)
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
        live = [w for w in self._workers.values() if w.alive]
        info = dict(live[0].describe) if live else {}
        info["router"] = {"workers": len(live)}
        self._reply(front, identity, MessageType.PONG, {
            F_VERSIONS: list(SUPPORTED_VERSIONS), "version": chosen, "worker": info}, rid)

    def _admit(self, stream: str) -> str | None:
        """The live worker with the most room for a new stream (sticky from now on)."""
        best = None
        for worker in self._workers.values():
            room = worker.capacity_left - worker.admitted
            if worker.alive and room > 0 and (best is None or room > best[0]):
                best = (room, worker)
        if best is None:
            return None
        worker = best[1]
        worker.admitted += 1
        self._assigned[stream] = worker.name
        self.counts["admitted"] += 1
        return worker.name

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
            self._assigned.pop(pending.stream, None)  # the worker forgot it
        if pending.rid is None:
            header.pop(F_REQUEST_ID, None)
        else:
            header[F_REQUEST_ID] = pending.rid
        self._send_client(front, [pending.identity, frames[0],
                                  msgpack.packb(header, use_bin_type=True), *frames[2:]])

    def _on_worker_link(self, back: zmq.Socket, frames: list) -> None:
        if len(frames) != 3:
            self.counts["bad_worker_link"] += 1
            return
        identity, kind = frames[0].bytes, frames[1].bytes
        try:
            body = msgpack.unpackb(frames[2].bytes, raw=False)
        except Exception:  # noqa: BLE001
            self.counts["bad_worker_link"] += 1
            return
        if kind == HEARTBEAT:
            self._on_heartbeat(back, identity, body)
        elif kind == ADOPTED:
            self._on_adopted(body)

    def _on_heartbeat(self, back: zmq.Socket, identity: bytes, body: dict[str, Any]) -> None:
        if identity in self._fenced:
            self._send_link(back, identity, FENCED, {"reason": "declared dead by the router"})
            return
        name = str(body["name"])
        worker = self._workers.get(name)
        if worker is not None and worker.identity != identity:
            if worker.alive:  # two live workers with one name: keep the first
                log.error("worker name %r registered twice (%s and %s); refusing the second",
                          name, worker.endpoint, body.get("endpoint"))
                self._send_link(back, identity, FENCED, {"reason": f"name {name!r} is taken"})
                return
            worker.socket.close(linger=0)
            worker = None  # a restarted worker under the same name
        if worker is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.setsockopt(zmq.RCVHWM, 100_000)
            sock.connect(str(body["endpoint"]))
            self._poller.register(sock, zmq.POLLIN)
            worker = _Worker(name, identity, str(body["endpoint"]), body.get("checkpoint"),
                             sock)
            self._workers[name] = worker
            self._by_identity[identity] = name
            log.info("worker %s registered (%s)", name, worker.endpoint)
            self.counts["registrations"] += 1
        worker.last_seen = time.monotonic()
        worker.capacity_left = int(body.get("capacity_left", 0))
        worker.streams = int(body.get("streams", 0))
        worker.describe = body.get("describe", worker.describe)
        worker.admitted = 0

    def _send_link(self, back: zmq.Socket, identity: bytes, kind: bytes,
                   body: dict[str, Any]) -> bool:
        try:
            back.send_multipart([identity, kind, msgpack.packb(body, use_bin_type=True)],
                                zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            log.warning("cannot reach worker link %r: %s", identity, exc)
            return False

    # ---- failover ----------------------------------------------------------------------

    def _check_liveness(self, front: zmq.Socket, back: zmq.Socket, now: float) -> None:
        for worker in list(self._workers.values()):
            if worker.alive and now - worker.last_seen > self.config.dead_after_s:
                self._declare_dead(front, back, worker)
        for adopt_id, adoption in list(self._adoptions.items()):
            if now - adoption["sent"] > self.config.adopt_timeout_s:
                log.error("adoption %d by %s timed out; its streams start over", adopt_id,
                          adoption["worker"])
                self._on_adopted({"id": adopt_id, "streams": [], "error": "timed out"})
        # orphans of a dead worker with no survivor: give them to a survivor once one exists
        for stream, name in list(self._assigned.items()):
            worker = self._workers.get(name)
            if worker is not None and not worker.alive and stream not in self._moving and any(
                    w.alive for w in self._workers.values()):
                self._failover_streams(back, worker)
                break

    def _declare_dead(self, front: zmq.Socket, back: zmq.Socket, worker: _Worker) -> None:
        log.warning("worker %s (%s) missed its heartbeats for %.1f s: declared dead",
                    worker.name, worker.endpoint, self.config.dead_after_s)
        self.counts["workers_died"] += 1
        worker.alive = False
        self._fenced.add(worker.identity)
        self._poller.unregister(worker.socket)
        worker.socket.close(linger=0)
        for own_rid, pending in list(self._pending.items()):
            if pending.worker == worker.name:  # never answered: let the client resend
                del self._pending[own_rid]
                echo = {F_STREAM: pending.stream} if pending.stream is not None else {}
                self._busy(front, pending.identity, echo, pending.rid)
        self._failover_streams(back, worker)

    def _failover_streams(self, back: zmq.Socket, dead: _Worker) -> None:
        streams = [s for s, n in self._assigned.items() if n == dead.name]
        survivors = [w for w in self._workers.values() if w.alive]
        if not survivors:
            log.error("no live worker to take over %d streams of %s; they wait for it",
                      len(streams), dead.name)
            return
        records: set[str] = set()
        if dead.checkpoint and Path(dead.checkpoint).exists():
            try:
                records = set(load_checkpoint(dead.checkpoint).streams)
            except CheckpointError as exc:
                log.error("cannot fail over from %s: %s; its streams start over", dead.name, exc)
        plan: dict[str, list[str]] = {}
        for stream in sorted(set(streams) | records):
            self._assigned.pop(stream, None)
            if stream not in records:
                continue  # never checkpointed: admitted afresh, the client replays it all
            target = self._admit(stream)
            if target is None:
                log.error("no room for stream %r of %s on any survivor", stream, dead.name)
                continue
            plan.setdefault(target, []).append(stream)
        for target, names in plan.items():
            adopt_id = next(self._adopt_ids)
            self._adoptions[adopt_id] = {"worker": target, "streams": names,
                                         "dead": dead.name, "sent": time.monotonic()}
            for stream in names:
                self._moving[stream] = adopt_id
            self._send_link(back, self._workers[target].identity, ADOPT,
                            {"id": adopt_id, "path": dead.checkpoint, "streams": names})
            log.info("asked %s to adopt %d streams of %s", target, len(names), dead.name)
        self.counts["failovers"] += 1
        if not plan:
            self._retire_checkpoint(dead)

    def _on_adopted(self, body: dict[str, Any]) -> None:
        adoption = self._adoptions.pop(int(body.get("id", -1)), None)
        if adoption is None:
            return
        adopted = set(body.get("streams") or [])
        if body.get("error"):
            log.error("worker %s could not adopt streams: %s", adoption["worker"],
                      body["error"])
        for stream in adoption["streams"]:
            self._moving.pop(stream, None)
            if stream not in adopted:
                # not taken over: a later request is admitted afresh (client replays)
                self._assigned.pop(stream, None)
        self.counts["streams_adopted"] += len(adopted)
        dead = adoption["dead"]
        if not any(a["dead"] == dead for a in self._adoptions.values()):
            self._retire_checkpoint(self._workers[dead])

    def _retire_checkpoint(self, dead: _Worker) -> None:
        if dead.checkpoint and Path(dead.checkpoint).exists():
            aside = f"{dead.checkpoint}.adopted-{int(time.time())}"
            os.replace(dead.checkpoint, aside)
            log.info("moved %s aside to %s (its streams live elsewhere now)", dead.checkpoint,
                     aside)


__all__ = ["ADOPT", "ADOPTED", "FENCED", "HEARTBEAT", "Router", "RouterConfig"]
