"""What the client's state machine keeps and answers: requests, stream state, actions.

Pure data (no sockets, no threads). A :class:`Request` lives from submission until its
future is resolved; a :class:`StreamState` holds one stream's requests by stage (waiting,
in flight, applied and kept for replay). :class:`~streamrnn.client.streams.Streams`
answers every event with :data:`Action` objects, which the transport carries out in order:

* ``Send(request, part, frames)``: send the encoded ``frames`` alone, or (``frames`` None)
  gather ``part = (type, header, arrays)`` with the others of this turn into BATCH
  envelopes;
* ``Resolve(future, result, error)``: set the future's result or exception, unless it is
  done already (cancelled, or resolved before a replay).

Example::

    request = Request(MessageType.PUSH, "s", {}, {"chunk": chunk}, Future())
    Resolve(request.future, result=outputs).apply()   # request.future.result() is outputs
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamrnn.codec import Part
from streamrnn.protocol import MessageType


@dataclass(eq=False, slots=True)
class Request:
    """One request of a client: its content, numbering, deadline and retry state."""

    kind: MessageType
    stream: str | None
    fields: dict[str, Any]
    arrays: dict[str, np.ndarray]
    future: Future
    seq: int | None = None
    rid: int = -1
    deadline: float = math.inf
    timeouts: int = 0
    busy_since: float | None = None
    busy_count: int = 0
    busy_resend_at: float | None = None  # control requests: resend after a BUSY backoff
    replay: bool = False  # re-sent from the resend buffer after a worker restart


@dataclass(eq=False)
class StreamState:
    """One stream's requests and numbering on the client side."""

    next_seq: int = 0
    inflight: deque[Request] = field(default_factory=deque)  # sent, in seq order
    waiting: deque[Request] = field(default_factory=deque)  # not sent yet
    resend_from: int | None = None  # go-back-N: resend in-flight requests from this seq...
    resend_at: float = 0.0  # ...at this time
    # Ask the worker for next_seq (OPEN) before sending: true for a stream this client has
    # not used yet, so that it continues the worker's numbering instead of replaying seq 0.
    needs_sync: bool = True
    # Resend buffer: applied requests at or above the worker's durable point (durable_seq in
    # its replies), in seq order, to replay if the worker restarts from its checkpoint.
    done: deque[Request] = field(default_factory=deque)
    durable: int = 0

    def forget(self) -> None:
        """The worker forgot the stream (closed, expired): nothing to replay."""
        self.done.clear()
        self.durable = 0

    def note_durable(self, durable: Any) -> None:
        """The worker has everything below seq ``durable`` on disk."""
        if durable > self.durable:
            self.durable = int(durable)
            while self.done and self.done[0].seq < self.durable:
                self.done.popleft()

    def remember(self, request: Request, limit: int) -> int:
        """Keep an applied request for replay (at most ``limit``); how many were dropped."""
        self.done.append(request)
        if len(self.done) > 1 and self.done[-2].seq > request.seq:
            self.done = deque(sorted(self.done, key=lambda r: r.seq))
        dropped = 0
        while len(self.done) > limit:
            self.done.popleft()
            dropped += 1
        return dropped

    def take_replay(self, start: int) -> list[Request] | None:
        """Move the kept requests ``start ..`` (up to the first in flight) back in front of
        the in-flight ones; None (and nothing moved) if some of them are not kept."""
        first_inflight = min((r.seq for r in self.inflight if r.seq is not None),
                             default=self.next_seq)
        ghosts = [r for r in self.done if start <= r.seq < first_inflight]
        if [r.seq for r in ghosts] != list(range(start, first_inflight)):
            return None
        for request in ghosts:
            self.done.remove(request)
        self.inflight.extendleft(reversed(ghosts))
        return ghosts

    def schedule_resend(self, seq: int, at: float) -> bool:
        """Resend the in-flight requests from ``seq`` at ``at`` (an earlier seq widens a
        scheduled resend, keeping its time); True if none was scheduled before."""
        if self.resend_from is None:
            self.resend_from, self.resend_at = seq, at
            return True
        self.resend_from = min(self.resend_from, seq)
        return False

    def drop(self) -> list[Request]:
        """Everything queued or in flight, removed; the next request re-syncs with OPEN."""
        requests = list(self.inflight) + list(self.waiting)
        self.inflight.clear()
        self.waiting.clear()
        self.resend_from = None
        self.needs_sync = True
        self.done.clear()
        return requests


@dataclass(frozen=True, eq=False)
class Send:
    """Send ``request`` as it is numbered now: ``frames`` (the encoded ``part``) alone, or,
    when ``frames`` is None, ``part`` in a BATCH envelope with others."""

    request: Request
    part: Part
    frames: list | None = None


@dataclass(frozen=True, eq=False)
class Resolve:
    """Complete ``future`` with ``result``, or with ``error`` when it is not None."""

    future: Future
    result: Any = None
    error: BaseException | None = None

    def apply(self) -> None:
        """Set the result or exception, unless the future is done already."""
        try:  # (one lock round instead of done() and then set_result())
            if self.error is None:
                self.future.set_result(self.result)
            else:
                self.future.set_exception(self.error)
        except InvalidStateError:
            pass  # done already: cancelled, or resolved before a replay


Action = Send | Resolve

__all__ = ["Action", "Request", "Resolve", "Send", "StreamState"]
