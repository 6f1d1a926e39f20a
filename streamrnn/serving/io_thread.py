"""A worker's I/O thread: the only owner of its ROUTER socket and of the outbox's PULL end.

It receives and decodes requests (a BATCH envelope into its parts, each then treated as a
request of its own), checks PUSH chunks (the engine's ``validate``, which reads only fixed
facts of the model, so it may run here while the compiled step runs without the GIL),
answers PING and malformed messages itself, and puts the rest on the bounded work queue
(full -> BUSY), all the requests of one message (a BATCH's parts) at once. Woken by the
outbox, it encodes and sends every reply of the compute thread; the replies to BATCH parts
leave in one BATCH_REPLY per client.

Once a request of a stream was answered BUSY, later ones of that stream are answered BUSY
too until the client resends from the first, or until the queue has drained past that BUSY
(the *busy latch*, :mod:`streamrnn.serving.busy`: bounded, and it only shapes replies; the
compute thread's sequence check is what keeps requests in order).

Each request carries its client's CURVE key (``Work.user``): the sender's own, or, from a
trusted router (``routers``), the key that router vouches for
(:func:`~streamrnn.serving.owners.vouched_user`).

Example::

    io = IOThread(router, channels, engine.validate, describe, busy_retry_after_ms=5)
    io.start()
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from streamrnn.codec import (
    Message,
    Part,
    batches_of,
    decode_batch,
    decode_request,
    encode,
    encode_batch,
    is_batch,
)
from streamrnn.errors import InvalidInputError, ProtocolError
from streamrnn.protocol import (
    A_CHUNK,
    F_CODE,
    F_MESSAGE,
    F_RETRY_AFTER_MS,
    F_SEQ,
    F_STREAM,
    F_VERSIONS,
    MAX_GENERATE_STEPS,
    SEQUENCED_TYPES,
    SUPPORTED_VERSIONS,
    ErrorCode,
    MessageType,
    negotiate_version,
)
from streamrnn.serving.batching import Work
from streamrnn.serving.outbox import Channels, echo
from streamrnn.serving.owners import vouched_user
from streamrnn.serving.quotas import over_limits
from streamrnn.serving.sockets import curve_user
from streamrnn.serving.stats import Count
from streamrnn.wirecheck import echo_context

__all__ = ["IOThread"]

log = logging.getLogger("streamrnn.worker")

_READ_BURST = 1000  # requests read per wake-up, so replies are not starved


class IOThread(threading.Thread):
    """Moves frames between the ROUTER socket, the work queue and the outbox."""

    def __init__(self, router: zmq.Socket, channels: Channels,
                 validate: Callable[[Any], np.ndarray], describe: Callable[[], dict[str, Any]],
                 busy_retry_after_ms: int, auth: Any = None,
                 max_generate_steps: int = MAX_GENERATE_STEPS,
                 routers: frozenset[str] = frozenset()):
        super().__init__(name="streamrnn-io", daemon=True)
        self._max_generate_steps = max_generate_steps
        self._router = router
        self._channels = channels
        self._outbox = channels.outbox
        self._requests = channels.requests
        self._stats = channels.stats
        self._validate = validate
        self._describe = describe
        self._retry_after_ms = busy_retry_after_ms
        self._auth = auth  # the ZAP authenticator thread when CURVE is on
        self._routers = routers  # z85 keys of the routers whose client_key is believed
        self._busy_latch = channels.busy  # stream -> lowest seq answered BUSY

    def run(self) -> None:
        router, reader = self._router, self._outbox.reader
        assert reader is not None, "Outbox.open() before the I/O thread starts"
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(reader, zmq.POLLIN)
        reading = True
        try:
            while True:
                if reading and self._channels.stop_requested.is_set():
                    poller.unregister(router)
                    reading = False
                    self._channels.reading_stopped.set()
                events = dict(poller.poll(50))
                if reader in events and self._forward_replies():
                    break
                if reading and router in events:
                    self._read_requests()
        except Exception:  # pragma: no cover - a bug; keep the process from hanging
            log.exception("I/O thread failed")
            self._channels.reading_stopped.set()
            raise
        finally:
            router.close()
            self._outbox.close_reader()
            if self._auth is not None:
                self._auth.stop()

    def _read_requests(self) -> None:
        for _ in range(_READ_BURST):
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._on_request(frames)

    # ---- replies -----------------------------------------------------------------------

    def _forward_replies(self) -> bool:
        """Encode and send every reply in the outbox; True when the compute thread is done."""
        replies, done = self._outbox.drain()
        # replies to requests that came in envelopes leave in one BATCH_REPLY per client
        batched: dict[bytes, list[Part]] = {}
        for reply in replies:
            if reply.batched:
                batched.setdefault(reply.identity, []).append(
                    (reply.type, reply.header, reply.arrays))
            else:
                self._route([reply.identity, *encode(reply.type, reply.header, reply.arrays)])
        for identity, parts in batched.items():
            self._reply_batch(identity, parts)
        return done

    def _reply_batch(self, identity: bytes, parts: list[Part]) -> None:
        for group in batches_of(parts):
            if len(group) == 1:
                self._route([identity, *encode(*group[0])])
            else:
                self._route([identity, *encode_batch(MessageType.BATCH_REPLY, group)])

    def _route(self, frames: list) -> None:
        try:
            self._router.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            # ROUTER_MANDATORY: the peer is gone (EHOSTUNREACH) or its pipe is full
            # (EAGAIN). The client retries and gets the reply from the cache.
            unroutable = exc.errno == errno.EHOSTUNREACH
            count = Count.REPLIES_UNROUTABLE if unroutable else Count.REPLIES_DROPPED
            self._stats.add(count)
            log.debug("reply not sent (%s): %s", count.value, exc)

    def _reply_now(self, identity: bytes, msg_type: MessageType,
                   header: dict[str, Any]) -> None:
        self._route([identity, *encode(msg_type, header)])

    # ---- requests ----------------------------------------------------------------------

    def _on_request(self, frames: list) -> None:
        received = time.monotonic()
        identity = frames[0].bytes
        # with CURVE, the sender's public key (z85): the ZAP User-Id (serving.owners)
        user = curve_user(frames[0]) if self._auth is not None else None
        body = frames[1:]
        if is_batch(body):
            self._on_batch(identity, body, received, user)
            return
        try:
            msg = decode_request(body, check_steps=False)  # over_limits() checks them
        except ProtocolError as exc:
            self._reply_now(identity, MessageType.ERROR, self._malformed(exc))
            return
        self._stats.request(msg.type)
        if msg.type == MessageType.PING:
            self._on_ping(identity, msg)
            return
        accepted: list[Work] = []
        user = vouched_user(user, msg.header, self._routers)
        busy = self._enqueue(Work(identity, msg, received, user=user), accepted,
                             self._requests.room())
        self._requests.put_many(accepted)
        if busy is not None:
            self._reply_now(identity, MessageType.BUSY, busy)

    def _on_batch(self, identity: bytes, body: list, received: float,
                  user: str | None) -> None:
        """A BATCH envelope: each part is queued like a request of its own; the parts
        answered here (malformed, BUSY) go back together in one BATCH_REPLY."""
        try:
            _, parts = decode_batch(body, check_steps=False)
        except ProtocolError as exc:
            self._reply_now(identity, MessageType.ERROR, self._malformed(exc))
            return
        counts: dict[MessageType, int] = {MessageType.BATCH: 1}
        replies: list[Part] = []
        accepted: list[Work] = []  # queued together: one lock and one wake-up
        room = self._requests.room()
        for part in parts:
            if isinstance(part, ProtocolError):
                replies.append((MessageType.ERROR, self._malformed(part), None))
                continue
            counts[part.type] = counts.get(part.type, 0) + 1
            busy = self._enqueue(Work(identity, part, received, batched=True,
                                      user=vouched_user(user, part.header, self._routers)),
                                 accepted, room)
            if busy is not None:
                replies.append((MessageType.BUSY, busy, None))
        self._requests.put_many(accepted)
        for msg_type, n in counts.items():
            self._stats.request(msg_type, n)
        if replies:
            self._reply_batch(identity, replies)

    def _malformed(self, exc: ProtocolError) -> dict[str, Any]:
        """Count a request that could not be decoded; the header of its ERROR reply."""
        self._stats.add(Count.MALFORMED)
        self._stats.error(exc.code)
        log.debug("malformed request: %s", exc)
        header = {**exc.context, F_CODE: int(exc.code), F_MESSAGE: str(exc)}
        if exc.code == ErrorCode.UNSUPPORTED_VERSION:
            header[F_VERSIONS] = list(SUPPORTED_VERSIONS)
        return header

    def _enqueue(self, work: Work, accepted: list[Work], room: int) -> dict[str, Any] | None:
        """Accept a decoded request for the compute thread (into ``accepted``, which the
        caller queues once its message is read; ``room``: what the queue took then); the
        header of a BUSY reply if the queue is full (or the stream is latched busy), else
        None."""
        msg = work.msg
        sequenced = msg.type in SEQUENCED_TYPES
        stream = msg.header.get(F_STREAM)
        requests = self._requests
        latched = self._busy_latch.get(stream, requests.taken) if sequenced else None
        if latched is None or msg.header[F_SEQ] <= latched:
            # chunk/prompt length and GENERATE steps: answered after the sequence check
            work.invalid = over_limits(msg, self._max_generate_steps)
            if msg.type == MessageType.PUSH and work.invalid is None:
                # here, not on the compute thread: it overlaps with the running step
                self._validate_chunk(work)
            if len(accepted) < room:
                accepted.append(work)
                if latched is not None:
                    self._busy_latch.clear(stream)
                return None
            if sequenced:
                # valid until every request accepted before this BUSY was taken
                self._busy_latch.set(stream, msg.header[F_SEQ],
                                     requests.added + len(accepted))
        self._stats.add(Count.BUSY)
        header = echo(msg)
        header[F_RETRY_AFTER_MS] = self._retry_after_ms
        return header

    def _validate_chunk(self, work: Work) -> None:
        """Check a PUSH's chunk: sets ``work.chunk`` or ``work.invalid``."""
        try:
            work.chunk = self._validate(work.msg.arrays[A_CHUNK])
        except InvalidInputError as exc:
            work.invalid = exc
        except Exception as exc:  # a bug in a check: answer this request, keep serving
            log.exception("checking the chunk of stream %r failed", work.stream)
            work.invalid = InvalidInputError(f"chunk could not be checked: "
                                             f"{type(exc).__name__}: {exc}", ErrorCode.INTERNAL)

    def _on_ping(self, identity: bytes, msg: Message) -> None:
        offered = msg.header.get(F_VERSIONS) or [msg.header["v"]]
        chosen = negotiate_version(offered)
        if chosen is None:
            self._stats.error(ErrorCode.UNSUPPORTED_VERSION)
            self._reply_now(identity, MessageType.ERROR, {
                **echo_context(msg.header), F_CODE: int(ErrorCode.UNSUPPORTED_VERSION),
                F_MESSAGE: f"no common protocol version: offered {offered}, supported "
                           f"{list(SUPPORTED_VERSIONS)}",
                F_VERSIONS: list(SUPPORTED_VERSIONS),
            })
            return
        self._reply_now(identity, MessageType.PONG, {
            **echo_context(msg.header), F_VERSIONS: list(SUPPORTED_VERSIONS),
            "version": chosen,
            "worker": self._describe(),
        })

