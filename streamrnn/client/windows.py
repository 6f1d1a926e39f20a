"""Every stream's send window: numbering, in-flight requests, completion and resends.

Pure (no sockets, no threads, no clock): the mechanics under the client's state machine
(:class:`~streamrnn.client.streams.Streams`, which decides what each reply and deadline
means). :class:`Windows` numbers each stream's requests (``seq``, and a fresh ``rid`` per
send), keeps at most ``window`` in flight with OPEN and CLOSE alone, and records what to
do as :data:`~streamrnn.client.requests.Action` objects (:meth:`Windows.take` hands them
over): a request that failed unapplied moves the later ones down by one, a resend goes back
to a seq (go-back-N), a replay puts the applied requests kept since ``durable_seq`` back in
front of the in-flight ones.

Example::

    windows = Windows(timeout=1.0, window=2, replay_buffer=64, counters=Counter())
    windows.add([push_a, push_b, push_c])   # OPEN first: the stream's numbering is unknown
    windows.take()                          # [Send(OPEN)]
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any

from streamrnn import protocol as p
from streamrnn.client.requests import Action, Request, Resolve, Send, StreamState
from streamrnn.codec import Part, encode
from streamrnn.errors import ProtocolError

log = logging.getLogger("streamrnn.client")

# sent alone: nothing else of the same stream is in flight with them
_BARRIERS = (p.MessageType.OPEN, p.MessageType.CLOSE)


class Windows:
    """The requests of one client by stream and by rid, and the actions they need.

    Args:
        timeout: seconds from a send to the request's deadline.
        window: requests per stream in flight at once.
        replay_buffer: applied requests kept per stream beyond ``durable_seq``.
        counters: incremented by name (``resent``, ``renumbered``, ``replayed``, ...).
        batch: leave the requests that may travel in a BATCH envelope unencoded (once
            :attr:`peer_batches`), for the transport to gather; False: encode every one.

    Attributes:
        now: the current time, set by the caller before each event.
        peer_batches: the worker said it takes BATCH envelopes (``"batch": true``).
        resend_due: the earliest time a scheduled resend is due (``inf``: none).
        streams: each stream's :class:`~streamrnn.client.requests.StreamState` by name.
        control: PING / STATS requests in flight by rid.
    """

    def __init__(self, timeout: float, window: int, replay_buffer: int,
                 counters: Counter[str], batch: bool = True):
        self.timeout = timeout
        self.window = window
        self.replay_buffer = replay_buffer
        self.counters = counters
        self.batch = batch
        self.peer_batches = False
        self.now = 0.0
        self.resend_due = math.inf
        self.streams: dict[str, StreamState] = {}
        self.control: dict[int, Request] = {}
        self._by_rid: dict[int, Request] = {}  # stream requests in flight
        self._rids = itertools.count(1)
        self._actions: list[Action] = []

    def add(self, requests: Iterable[Request]) -> None:
        """New requests, in order: control ones (no stream) are sent at once, stream ones
        queued and sent as their windows allow (streams in order of first appearance)."""
        touched: dict[str, None] = {}  # insertion-ordered: streams are sent in that order
        for request in requests:
            if request.stream is None:
                request.rid = next(self._rids)
                self.control[request.rid] = request
                self.send(request)
            else:
                st = self.streams.get(request.stream)
                if st is None:  # (setdefault would build a StreamState per request)
                    st = self.streams[request.stream] = StreamState()
                st.waiting.append(request)
                touched[request.stream] = None
        for stream in touched:
            self.pump(self.streams[stream])

    def match(self, rid: Any) -> Request | None:
        """The request in flight with this rid (None: a late duplicate or an old rid)."""
        return self._by_rid.get(rid) or self.control.get(rid)

    def resolve(self, request: Request, exc: BaseException) -> None:
        """Fail one request's future (nothing else changes)."""
        self._actions.append(Resolve(request.future, error=exc))

    def pump(self, st: StreamState) -> None:
        """Send waiting requests of one stream while its window and barriers allow."""
        if st.resend_from is not None:
            return  # resend first, then new requests, to keep the stream's order
        while st.waiting:
            if st.inflight and st.inflight[-1].kind in _BARRIERS:
                return
            if st.needs_sync:
                if st.inflight:
                    return
                st.needs_sync = False
                if st.waiting[0].kind != p.MessageType.OPEN:
                    st.waiting.appendleft(_open_for(st.waiting[0]))
            request = st.waiting[0]
            if (request.kind in _BARRIERS and st.inflight) or len(st.inflight) >= self.window:
                return
            st.waiting.popleft()
            if request.kind in p.SEQUENCED_TYPES:
                request.seq = st.next_seq
                st.next_seq += 1
            self._number(request)
            st.inflight.append(request)
            self.send(request)

    def _number(self, request: Request) -> None:
        """A fresh rid: replies to an earlier send are then ignored."""
        self._by_rid.pop(request.rid, None)
        request.rid = next(self._rids)
        self._by_rid[request.rid] = request

    def send(self, request: Request) -> None:
        """Send ``request`` as numbered now; its deadline is ``timeout`` from now. Alone, it
        is encoded here: one that cannot be (e.g. a dtype that cannot travel) fails at once,
        unapplied."""
        header: dict[str, Any] = {"v": p.PROTOCOL_VERSION, p.F_REQUEST_ID: request.rid,
                                  **request.fields}
        if request.stream is not None:
            header[p.F_STREAM] = request.stream
        if request.seq is not None:
            header[p.F_SEQ] = request.seq
        request.deadline = self.now + self.timeout
        part: Part = (request.kind, header, request.arrays)
        if self.batch and self.peer_batches and request.kind in p.BATCH_PART_TYPES:
            self._actions.append(Send(request, part))  # sent in a BATCH at the end of the turn
            return
        try:
            frames = encode(*part)
        except ProtocolError as exc:
            self.finish(request, exc=exc, not_applied=True)
            return
        self._actions.append(Send(request, part, frames))

    def finish(self, request: Request, result: Any = None, exc: BaseException | None = None,
               not_applied: bool = False) -> None:
        """Complete ``request``: an applied one is kept for replay (above ``durable_seq``),
        one that failed ``not_applied`` moves the later ones down; then send what the
        stream's window now allows."""
        self._by_rid.pop(request.rid, None)
        self.control.pop(request.rid, None)
        st = self.streams.get(request.stream) if request.stream is not None else None
        if st is not None:
            if request in st.inflight:
                st.inflight.remove(request)
            if not_applied and request.seq is not None:
                self._renumber_after(st, request.seq)
            elif exc is None and request.seq is not None and request.seq >= st.durable:
                # kept for replay until the worker reports it durable
                dropped = st.remember(request, self.replay_buffer)
                if dropped:
                    self.counters["replay_dropped"] += dropped
        self._actions.append(Resolve(request.future, result, exc))
        if st is not None:
            self.pump(st)

    def replay(self, st: StreamState, start: int) -> bool:
        """Resend the buffered requests ``start ..`` before the in-flight ones; False if the
        buffer does not hold all of them."""
        ghosts = st.take_replay(start)
        if ghosts is None:
            return False
        for request in ghosts:
            request.replay = True
            request.timeouts = 0
            self._number(request)
        self.counters["replayed"] += len(ghosts)
        log.info("stream %r: worker resumed at seq %d; replaying %d requests", ghosts[0].stream
                 if ghosts else "", start, len(ghosts))
        st.resend_from = None
        self.schedule_resend(st, st.inflight[0], self.now)
        return True

    def _renumber_after(self, st: StreamState, seq: int) -> None:
        """Request ``seq`` failed unapplied: later in-flight ones move down by one."""
        later = [r for r in st.inflight if r.seq is not None and r.seq > seq]
        st.next_seq -= 1
        if st.resend_from is not None and st.resend_from > seq:
            st.resend_from -= 1
        if not later:
            return
        self.counters["renumbered"] += len(later)
        for request in later:
            request.seq -= 1
            self._number(request)  # replies to the old numbering are ignored
        self.schedule_resend(st, later[0], self.now)

    def schedule_resend(self, st: StreamState, first: Request, at: float) -> None:
        """Resend ``st``'s in-flight requests from ``first`` on at time ``at``."""
        if st.schedule_resend(first.seq, at):
            self.resend_due = min(self.resend_due, at)

    def resend(self, st: StreamState) -> None:
        """The scheduled resend of ``st``, now; then new requests as the window allows."""
        start, st.resend_from = st.resend_from, None
        for request in list(st.inflight):
            if request.seq is not None and request.seq >= start:
                self.counters["resent"] += 1
                # a fresh rid: late replies to the earlier send (e.g. SEQ_GAP from before a
                # go-back) are then ignored instead of triggering another go-back
                self._number(request)
                self.send(request)
        self.pump(st)

    def resend_all(self) -> None:
        """Send every request in flight again (the transport moved to another endpoint):
        stream requests with fresh rids, all keeping their deadlines, so moving on does
        not extend how long a request may take."""
        for st in self.streams.values():
            st.resend_from = None
            for request in st.inflight:
                deadline = request.deadline
                self._number(request)
                self.send(request)
                request.deadline = deadline
        for request in list(self.control.values()):
            deadline = request.deadline
            self.send(request)
            request.deadline = deadline

    def fail_stream(self, st: StreamState, exc: BaseException) -> None:
        """Fail everything queued for a stream; the next request re-syncs with OPEN."""
        for request in st.drop():
            self._by_rid.pop(request.rid, None)
            self._actions.append(Resolve(request.future, error=exc))

    def take(self) -> list[Action]:
        """The actions recorded since the last call, in order."""
        actions, self._actions = self._actions, []
        return actions


def _open_for(request: Request) -> Request:
    """The OPEN that syncs ``request``'s stream first (with its owner token, if any)."""
    token = request.fields.get(p.F_TOKEN)
    return Request(p.MessageType.OPEN, request.stream, {} if token is None else
                   {p.F_TOKEN: token}, {}, Future())


__all__ = ["Windows"]
