"""The client's per-stream state machine: windows, go-back-N, replay, renumbering, resends.

Pure: no sockets, no threads, no clock. :class:`Streams` is fed what happened (requests
submitted, a decoded reply, a request that could not be encoded, the time passing) with
the current time as a number, and answers with :data:`Action` objects for the transport
to carry out, in order: :class:`~streamrnn.client.requests.Send` a request (its wire part
``(type, header, arrays)`` is built here, and encoded unless it is to travel in a BATCH)
or :class:`~streamrnn.client.requests.Resolve` a future. So the whole stream protocol of
docs/protocol.md (sections 4 to 5a) is testable in milliseconds without a worker.

Per stream, requests are numbered (``seq`` from 0, continuing the worker's numbering
learned with an OPEN) and at most ``window`` are in flight; OPEN and CLOSE travel alone.
A lost reply is resent after ``timeout`` (``retries`` times); a BUSY answer (and ERROR
UNAVAILABLE or NOT_HOLDER) is resent after an exponential backoff (for at most
``timeout``); a request that failed unapplied moves the
later ones down by one (renumbered and resent); a SEQ_GAP / UNKNOWN_STREAM naming an
earlier seq goes back to it (go-back-N) or, after a worker restart, replays the applied
requests kept since the worker's ``durable_seq``.

Example::

    streams = Streams("tcp://w:5555", timeout=1.0, retries=3, window=8, replay_buffer=64)
    request = Request(MessageType.PUSH, "s", {}, {"chunk": chunk}, Future())
    actions = streams.submit([request], now=0.0)    # [Send(OPEN)]: learn next_seq first
    actions = streams.on_reply(ack_of_open, now=0.01)   # [Resolve(OPEN), Send(PUSH seq 0)]
    actions = streams.tick(now=5.0)                  # deadlines: resend or fail
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from streamrnn import protocol as p
from streamrnn.client.requests import Action, Request, StreamState
from streamrnn.client.windows import Windows
from streamrnn.codec import Message
from streamrnn.errors import (
    RequestTimeoutError,
    StreamExpiredError,
    StreamRNNError,
    WorkerBusyError,
    remote_error,
)

# ERROR codes retried like BUSY (for at most ``timeout``): no worker can take the stream
# right now (a router with no live worker), or the worker asked does not hold it (a router's
# stale view while a stream moves)
_RETRY_ERRORS = (p.ErrorCode.UNAVAILABLE, p.ErrorCode.NOT_HOLDER)
# ERROR codes that say the worker's numbering of a stream differs from ours
_GAP_ERRORS = (p.ErrorCode.SEQ_GAP, p.ErrorCode.UNKNOWN_STREAM)  # expected < seq: go back
_SEQ_ERRORS = (p.ErrorCode.SEQ_GAP, p.ErrorCode.SEQ_STALE, p.ErrorCode.UNKNOWN_STREAM)


def busy_delay(retry_after_ms: Any, count: int, jitter: float) -> float:
    """Seconds to wait before resending after the ``count``-th BUSY in a row: the worker's
    ``retry_after_ms`` doubled per BUSY, capped at 0.25 s, times ``0.5 + jitter``
    (``jitter`` in ``[0, 1)``)."""
    base = max(retry_after_ms, 1) / 1000
    return min(0.25, base * 2 ** min(count, 8)) * (0.5 + jitter)


class Streams:
    """Every request of one client between submission and completion.

    Args:
        endpoint: named in timeout errors.
        timeout: seconds before a request is resent (and the longest BUSY backoff).
        retries: resends after a timeout before the stream fails.
        window: requests per stream in flight at once.
        replay_buffer: applied requests kept per stream beyond ``durable_seq``.
        counters: incremented by name (``resent``, ``busy``, ``go_back``, ...).
        batch: leave the requests that may travel in a BATCH unencoded for the transport
            to gather (once the worker takes BATCH envelopes); False: each alone.
        jitter: a number in ``[0, 1)`` per BUSY (default :func:`random.random`).

    Attributes:
        resend_due: the earliest time a scheduled resend is due (``inf``: none), so
            that the caller knows when to :meth:`tick` next (read-only).
        peer_batches: the worker said it takes BATCH envelopes (read-only).
    """

    def __init__(self, endpoint: str, timeout: float, retries: int, window: int,
                 replay_buffer: int, counters: Counter[str] | None = None, *,
                 batch: bool = True, jitter: Callable[[], float] = random.random):
        self.endpoint = endpoint
        self.timeout = timeout
        self.retries = retries
        self.counters: Counter[str] = Counter() if counters is None else counters
        self._jitter = jitter
        self.timeouts = 0  # requests timed out since take_timeouts (read by the transport)
        self._w = Windows(timeout, window, replay_buffer, self.counters, batch)
        self._on_kind = {p.MessageType.BUSY: self._on_busy,
                         p.MessageType.OUTPUT: self._on_output,
                         p.MessageType.ACK: self._on_ack,
                         p.MessageType.PONG: self._on_pong,
                         p.MessageType.EXPIRED: self._on_expired,
                         p.MessageType.ERROR: self._on_error}

    @property
    def resend_due(self) -> float:
        """The earliest time a scheduled resend is due (``inf``: none)."""
        return self._w.resend_due

    @property
    def peer_batches(self) -> bool:
        """The worker said it takes BATCH envelopes (``"batch": true`` in an ACK or PONG)."""
        return self._w.peer_batches

    def stream(self, name: str) -> StreamState | None:
        """The state of one stream (None: never used)."""
        return self._w.streams.get(name)

    # ---- events ------------------------------------------------------------------------

    def submit(self, requests: Iterable[Request], now: float) -> list[Action]:
        """New requests, in order: control ones (no stream) are sent at once, stream ones
        queued and sent as their windows allow (streams in order of first appearance)."""
        self._w.now = now
        self._w.add(requests)
        return self._w.take()

    def on_reply(self, msg: Message, now: float) -> list[Action]:
        """A decoded reply; one that matches no request in flight is counted and ignored."""
        self._w.now = now
        request = self._w.match(msg.header.get(p.F_REQUEST_ID))
        if request is None:
            self.counters["unmatched_replies"] += 1  # late duplicate or renumbered request
            return []
        worker = msg.header.get("worker")  # OPEN's ACK and PONG describe the worker
        if type(worker) is dict and worker.get("batch") is True:
            self._w.peer_batches = True
        handler = self._on_kind.get(msg.type)
        if handler is not None:
            handler(request, msg)
        return self._w.take()

    def on_unsendable(self, request: Request, exc: BaseException, now: float) -> list[Action]:
        """``request``'s part (sent in a BATCH, so not encoded here) could not be encoded
        (e.g. a dtype that cannot travel): it fails unapplied, so the later requests of its
        stream move down by one."""
        self._w.now = now
        self._w.finish(request, exc=exc, not_applied=True)
        return self._w.take()

    def tick(self, now: float) -> list[Action]:
        """Due resends, BUSY backoffs that are over, and deadlines (resend or fail)."""
        self._w.now = now
        for st in list(self._w.streams.values()):
            if st.resend_from is not None and now >= st.resend_at:
                self._w.resend(st)
            if st.inflight:
                self._check_deadline(st, st.inflight[0])
        for request in list(self._w.control.values()):
            self._check_deadline(None, request)
        self._w.resend_due = min((st.resend_at for st in self._w.streams.values()
                                  if st.resend_from is not None), default=math.inf)
        return self._w.take()

    def resend_all(self, now: float) -> list[Action]:
        """Every request in flight again, keeping its deadline (the transport moved to
        another endpoint, e.g. the next router): the worker answers a duplicate from its
        reply cache, a restarted one asks for a replay (SEQ_GAP / UNKNOWN_STREAM)."""
        self._w.now = now
        self.counters["resent_all"] += 1
        self._w.resend_all()
        self._w.resend_due = min((st.resend_at for st in self._w.streams.values()
                                  if st.resend_from is not None), default=math.inf)
        return self._w.take()

    def take_timeouts(self) -> int:
        """Requests that timed out (and were resent) since the last call."""
        count, self.timeouts = self.timeouts, 0
        return count

    def fail_all(self, exc: BaseException) -> list[Action]:
        """Fail every request (the client is shutting down)."""
        for st in self._w.streams.values():
            self._w.fail_stream(st, exc)
        for request in self._w.control.values():
            self._w.resolve(request, exc)
        self._w.control.clear()
        return self._w.take()

    # ---- replies -----------------------------------------------------------------------

    def _on_output(self, request: Request, msg: Message) -> None:
        self._note_durable(request, msg)
        self._w.finish(request, result=msg.arrays[p.A_OUTPUT])

    def _on_pong(self, request: Request, msg: Message) -> None:
        self._w.finish(request, result=msg.header)

    def _on_ack(self, request: Request, msg: Message) -> None:
        if request.kind == p.MessageType.STATS:
            self._w.finish(request, result=msg.header.get(p.F_STATS, {}))
            return
        self._note_durable(request, msg)
        st = self._w.streams.get(request.stream or "")
        if st is not None and request.kind == p.MessageType.OPEN:
            st.next_seq = int(msg.header.get(p.F_NEXT_SEQ, 0))
            st.done.clear()
            st.durable = min(st.durable, st.next_seq)
        elif st is not None and request.kind == p.MessageType.CLOSE:
            st.next_seq = 0  # the worker forgot the stream; the id starts over
            st.forget()
        self._w.finish(request, result=msg.header if request.kind == p.MessageType.OPEN else None)

    def _on_expired(self, request: Request, msg: Message) -> None:
        self.counters["expired"] += 1
        st = self._w.streams.get(request.stream or "")
        if st is not None:
            st.needs_sync = True  # the worker forgot the stream: learn next_seq again
            st.forget()
        self._w.finish(request, exc=StreamExpiredError(msg.header.get(p.F_MESSAGE, "expired")))

    def _note_durable(self, request: Request, msg: Message) -> None:
        st = self._w.streams.get(request.stream or "")
        if st is None:
            return
        durable = msg.header.get(p.F_DURABLE_SEQ)
        if request.seq is not None:
            # no durable_seq: the worker keeps no checkpoint, so there is nothing to replay
            limit = request.seq + 1
            durable = limit if durable is None else min(int(durable), limit)
        elif durable is None:
            return
        st.note_durable(durable)

    def _on_busy(self, request: Request, msg: Message) -> None:
        self.counters["busy"] += 1
        self._retry_later(request, msg, lambda: WorkerBusyError(
            f"worker answered BUSY for {self.timeout:.1f} s"))

    def _retry_later(self, request: Request, msg: Message,
                     error: Callable[[], BaseException]) -> None:
        """Resend ``request`` after a backoff (BUSY, UNAVAILABLE, NOT_HOLDER); fail it with
        ``error()`` once such answers lasted longer than ``timeout``."""
        now = self._w.now
        if request.busy_since is None:
            request.busy_since = now
        if now - request.busy_since > self.timeout:
            exc = error()
            if request.stream is None:
                self._w.finish(request, exc=exc)
            else:
                self._w.fail_stream(self._w.streams[request.stream], exc)
            return
        delay = busy_delay(msg.header.get(p.F_RETRY_AFTER_MS, 1), request.busy_count,
                           self._jitter())
        request.busy_count += 1
        if request.seq is None:  # PING/STATS/OPEN: resent alone by the timer
            request.busy_resend_at = now + delay
            return
        self._w.schedule_resend(self._w.streams[request.stream], request, now + delay)

    def _on_error(self, request: Request, msg: Message) -> None:
        code = msg.header.get(p.F_CODE, p.ErrorCode.INTERNAL)
        expected = msg.header.get(p.F_EXPECTED)
        if code in _RETRY_ERRORS:
            self.counters[f"retried_{p.ErrorCode(code).name.lower()}"] += 1
            self._retry_later(request, msg, lambda: remote_error(
                code, msg.header.get(p.F_MESSAGE, ""), expected))
            return
        st = self._w.streams.get(request.stream or "")
        if st is not None and code == p.ErrorCode.FORBIDDEN:
            # another client identity owns the stream: every request of it fails the same
            self._w.fail_stream(st, remote_error(code, msg.header.get(p.F_MESSAGE, "")))
            return
        if st is not None and request.seq is not None and expected is not None:
            if request.replay and expected > request.seq:
                # a replayed request the worker already has (e.g. SEQ_STALE): its output
                # was delivered before, so nothing is missing
                self._w.finish(request, result=None)
                return
            if self._went_back(st, request, code, expected):
                return
        if st is not None and request.replay:
            self._w.fail_stream(st, StreamRNNError(
                f"stream {request.stream!r}: replaying seq {request.seq} after a worker "
                f"restart failed: {msg.header.get(p.F_MESSAGE, '')}"))
            return
        exc = remote_error(code, msg.header.get(p.F_MESSAGE, ""), expected)
        not_applied = request.seq is not None and expected == request.seq
        if st is not None and code in _SEQ_ERRORS:
            st.needs_sync = True  # our numbering and the worker's disagree
        self._w.finish(request, exc=exc, not_applied=not_applied)

    def _went_back(self, st: StreamState, request: Request, code: Any, expected: int) -> bool:
        """SEQ_GAP / UNKNOWN_STREAM naming an earlier seq than ``request``'s: resend from
        there (go-back-N) or replay after a worker restart; False if neither can."""
        if code not in _GAP_ERRORS or expected >= request.seq:
            return False
        # An earlier request of ours was not applied (BUSY, lost): go back to it.
        target = next((r for r in st.inflight if r.seq == expected), None)
        if target is not None:
            self.counters["go_back"] += 1
            self._w.schedule_resend(st, target, self._w.now)
            return True
        # The worker restarted from a checkpoint (or a survivor adopted the stream) and
        # lost what it applied after it: replay from the resend buffer.
        return self._w.replay(st, expected)

    # ---- deadlines --------------------------------------------------------------------

    def _check_deadline(self, st: StreamState | None, request: Request) -> None:
        if request.busy_resend_at is not None:
            if self._w.now >= request.busy_resend_at:  # the backoff after a BUSY is over
                request.busy_resend_at = None
                self._w.send(request)
        elif self._w.now > request.deadline:
            self._on_timeout(st, request)

    def _on_timeout(self, st: StreamState | None, request: Request) -> None:
        request.timeouts += 1
        self.timeouts += 1
        if request.timeouts > self.retries:
            exc = RequestTimeoutError(
                f"no reply from {self.endpoint} for {request.kind.name} after "
                f"{self.retries + 1} tries of {self.timeout:.1f} s")
            if st is None:
                self._w.finish(request, exc=exc)
            else:
                self._w.fail_stream(st, exc)
            return
        self.counters["timeouts_retried"] += 1
        if st is None or request.seq is None:
            self._w.send(request)
        else:
            st.resend_from = None
            self._w.schedule_resend(st, request, 0.0)
            self._w.resend(st)


__all__ = ["Streams", "busy_delay"]
