"""What a worker's two threads share: the :class:`WorkQueue` of requests, the :class:`Outbox`
(replies plus their wake-up pipe), gathered with the counters and the stop signals in
:class:`Channels`.

The I/O thread hands the compute thread the requests of a message (all the parts of a BATCH
envelope) in one :meth:`WorkQueue.put_many`: one lock and one wake-up per message instead of
one per request (``queue.Queue.put`` + ``get`` cost about 4 us of CPU per request).

The compute thread :meth:`~Outbox.put` s replies; the I/O thread, woken by a frame on an
inproc PUSH/PULL pair, :meth:`~Outbox.drain` s them and encodes and sends them while the
compute thread runs the next step. At most one wake-up frame is on the pipe per drain.
Each end of the pipe has one owner (zmq sockets are not thread-safe): the PUSH end is the
compute thread's (``put``, ``finish``), the PULL end the I/O thread's (``reader``,
``drain``, ``close_reader``).

Nothing else passes between the threads: the I/O thread never touches the engine (it only
calls the engine's ``validate``, which reads fixed facts of the model), the compute thread
never touches a socket but the outbox's PUSH end.

Example::

    requests = WorkQueue(maxsize=4096)
    room = requests.room()                   # I/O thread: how many it may add now
    requests.put_many(works[:room])          # the rest are answered BUSY
    batch = requests.take(limit=4096, timeout=0.05)   # compute thread: [] after the timeout

    outbox = Outbox()
    outbox.open(zmq.Context.instance())      # before the threads start
    # compute thread
    outbox.put(Reply(identity, MessageType.ACK, {"stream": "a"}, None, batched=False))
    outbox.finish()                          # after its last reply
    # I/O thread (poll outbox.reader for POLLIN)
    replies, done = outbox.drain()
"""

from __future__ import annotations

import itertools
import sys
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import zmq

from streamrnn.codec import Message
from streamrnn.protocol import F_REQUEST_ID, F_SEQ, F_STREAM, MessageType
from streamrnn.serving.batching import Work
from streamrnn.serving.busy import BusyLatch
from streamrnn.serving.stats import WorkerStats

__all__ = ["Channels", "Outbox", "Reply", "WorkQueue", "echo"]

_ids = itertools.count()
_STOP_FRAME = b""  # the compute thread is done (after its last replies)
_WAKE_FRAME = b"r"  # replies are waiting


class Reply(NamedTuple):
    """One encoded-to-be reply: to whom, what, and whether it goes in a BATCH_REPLY."""

    identity: bytes
    type: MessageType
    header: dict[str, Any]
    arrays: Mapping[str, np.ndarray] | None
    batched: bool


def echo(msg: Message) -> dict[str, Any]:
    """The matching fields of a request (rid, stream, seq), to copy into its reply."""
    return {k: msg.header[k] for k in (F_REQUEST_ID, F_STREAM, F_SEQ) if k in msg.header}


class WorkQueue:
    """Requests from the I/O thread (the only producer) to the compute thread (the only
    consumer), in order; bounded: ``maxsize`` waiting at most (``<= 0``: unbounded)."""

    def __init__(self, maxsize: int = 0):
        self.maxsize = maxsize
        self.added = 0  # requests ever queued (written by the producer only)
        self.taken = 0  # requests ever taken (written by the consumer only)
        self._items: deque[Work] = deque()
        self._ready = threading.Condition(threading.Lock())

    def room(self) -> int:
        """How many requests may be added now (only grows until the producer adds more)."""
        if self.maxsize <= 0:
            return sys.maxsize
        return max(0, self.maxsize - len(self._items))

    def put_many(self, works: list[Work]) -> None:
        """Append ``works`` (at most :meth:`room` of them) and wake the consumer."""
        if works:
            with self._ready:
                self._items.extend(works)
                self.added += len(works)
                self._ready.notify()

    def take(self, limit: int, timeout: float = 0.0) -> list[Work]:
        """Up to ``limit`` requests, oldest first; waits up to ``timeout`` seconds for the
        first one (``[]`` when none came)."""
        with self._ready:
            if not self._items and timeout > 0:
                self._ready.wait(timeout)
            items = self._items
            count = min(limit, len(items))
            self.taken += count
            return [items.popleft() for _ in range(count)]

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items


class Outbox:
    """Replies from the compute thread to the I/O thread (see the module docstring)."""

    def __init__(self) -> None:
        self.reader: zmq.Socket | None = None  # PULL: the I/O thread polls it
        self._writer: zmq.Socket | None = None  # PUSH: the compute thread's
        self._replies: deque[Reply] = deque()
        self._signalled = False

    def open(self, ctx: zmq.Context) -> zmq.Socket:
        """Bind the pipe's PULL end and connect its PUSH end (before either thread runs);
        returns the PULL end."""
        address = f"inproc://streamrnn-replies-{next(_ids)}"
        self.reader = ctx.socket(zmq.PULL)
        self.reader.bind(address)
        self._writer = ctx.socket(zmq.PUSH)
        self._writer.setsockopt(zmq.SNDHWM, 0)  # never block or drop between our own threads
        self._writer.connect(address)
        return self.reader

    # ---- compute thread ----------------------------------------------------------------

    def put(self, reply: Reply) -> None:
        """Queue ``reply``; wake the I/O thread unless a wake-up is already pending."""
        self._replies.append(reply)
        if not self._signalled:
            self._signalled = True
            assert self._writer is not None, "Outbox.open() first"
            self._writer.send(_WAKE_FRAME)

    def finish(self) -> None:
        """Tell the I/O thread that no reply follows, and close the PUSH end."""
        assert self._writer is not None, "Outbox.open() first"
        self._writer.send(_STOP_FRAME)
        self._writer.close(linger=-1)

    # ---- I/O thread --------------------------------------------------------------------

    def drain(self) -> tuple[list[Reply], bool]:
        """Every queued reply, and True once the compute thread has finished."""
        assert self.reader is not None, "Outbox.open() first"
        done = False
        while True:
            try:
                frame = self.reader.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            done = done or frame == _STOP_FRAME
        self._signalled = False  # before draining: a reply added later wakes us again
        replies: list[Reply] = []
        while True:
            try:
                replies.append(self._replies.popleft())
            except IndexError:
                return replies, done

    def close_reader(self) -> None:
        """Close the PULL end (the I/O thread, when it ends)."""
        assert self.reader is not None, "Outbox.open() first"
        self.reader.close()


@dataclass(frozen=True)
class Channels:
    """Everything the I/O and compute threads share: requests in (bounded: full -> BUSY),
    replies out, the (locked) counters, and the stop signals."""

    requests: WorkQueue
    outbox: Outbox
    stats: WorkerStats
    #: streams answered BUSY (the I/O thread's; STATS reads its size)
    busy: BusyLatch = field(default_factory=BusyLatch)
    #: set by StreamWorker.stop(): the I/O thread stops reading requests
    stop_requested: threading.Event = field(default_factory=threading.Event)
    #: set by the I/O thread once it reads no more: the compute thread drains and ends
    reading_stopped: threading.Event = field(default_factory=threading.Event)
