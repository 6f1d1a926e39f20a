"""The compute thread's side of replying: request ids, ``durable_seq`` and held CLOSE ACKs.

Every reply the compute thread makes goes through one :class:`Responder`, which echoes the
request's ``rid``, adds ``durable_seq`` to the OUTPUT/ACK of a durable worker (the stream's
next seq in the newest checkpoint file), and puts the reply in the :class:`Outbox`.

A durable worker ACKs a CLOSE only once the close is on disk (a restart must not resurrect
the stream under an id the client may already reuse from seq 0): those ACKs are *held*
(:meth:`Responder.hold`) until the next successful checkpoint (:meth:`Responder.release`).

A worker whose store lease lapsed sends nothing more: each reply first checks
``store.lease_valid()``; once it is False (or after :meth:`Responder.fence`) every reply is
dropped and :attr:`Responder.fenced` tells the compute thread to fence the worker.

Example::

    responder = Responder(outbox, stats, store=None)
    responder.send(work, MessageType.ACK, {"stream": "a", "seq": 3, "next_seq": 4})
    responder.error(work, ErrorCode.SEQ_GAP, "seq 7 skips ahead", expected=4)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from streamrnn.protocol import (
    F_CODE,
    F_DURABLE_SEQ,
    F_EXPECTED,
    F_MESSAGE,
    F_REQUEST_ID,
    F_STREAM,
    ErrorCode,
    MessageType,
)
from streamrnn.serving.batching import Work
from streamrnn.serving.outbox import Outbox, Reply, echo
from streamrnn.serving.sequencing import CachedReply
from streamrnn.serving.stats import WorkerStats
from streamrnn.serving.store import StreamStore

__all__ = ["Responder"]

_DURABLE_REPLIES = (MessageType.OUTPUT, MessageType.ACK)  # carry durable_seq when durable


class Responder:
    """Formats the compute thread's replies and queues them in the outbox."""

    def __init__(self, outbox: Outbox, stats: WorkerStats,
                 store: StreamStore | None):
        self._outbox = outbox
        self._stats = stats
        self._store = store
        self._held: list[tuple[Work, CachedReply]] = []  # CLOSE ACKs waiting for a checkpoint
        #: the store's lease lapsed: no reply goes out any more
        self.fenced = False

    def send(self, work: Work, msg_type: MessageType, header: dict[str, Any],
             arrays: Mapping[str, np.ndarray] | None = None) -> None:
        """Reply to ``work``."""
        store = self._store
        if store is not None and (self.fenced or not store.lease_valid()):
            self.fenced = True  # a reply after the lease lapsed could contradict the new holder
            return
        if work.rid is not None:
            header = {**header, F_REQUEST_ID: work.rid}
        if store is not None and msg_type in _DURABLE_REPLIES and F_STREAM in header:
            header = {**header, F_DURABLE_SEQ: store.durable.get(header[F_STREAM], 0)}
        self._outbox.put(Reply(work.identity, msg_type, header, arrays, work.batched))

    def error(self, work: Work, code: ErrorCode | int, message: str,
              expected: int | None = None) -> None:
        """Answer ``work`` with ERROR ``code`` (and the stream's expected seq, if given)."""
        self._stats.error(code)
        header = echo(work.msg)
        header.update({F_CODE: int(code), F_MESSAGE: message})
        if expected is not None:
            header[F_EXPECTED] = expected
        self.send(work, MessageType.ERROR, header)

    # ---- held CLOSE ACKs ---------------------------------------------------------------

    def hold(self, work: Work, reply: CachedReply) -> None:
        """Keep ``reply`` (a CLOSE's ACK) until :meth:`release`."""
        self._held.append((work, reply))

    @property
    def holding(self) -> bool:
        """Whether some ACK waits for a checkpoint."""
        return bool(self._held)

    def close_pending(self, stream: str) -> bool:
        """True while ``stream``'s CLOSE is applied but not yet in a checkpoint."""
        return any(w.stream == stream and w.type == MessageType.CLOSE for w, _ in self._held)

    def fence(self) -> None:
        """Send nothing more, and forget the held ACKs."""
        self.fenced = True
        self._held = []

    def release(self) -> None:
        """Send the held ACKs (after a successful checkpoint)."""
        held, self._held = self._held, []
        for work, reply in held:
            self.send(work, *reply)
