"""Exactly-once application of sequenced requests: per-stream sequence numbers + reply cache.

Pure Python (no TensorFlow, no sockets); owned by the worker's compute thread.

Every PUSH/RESET/CLOSE/GENERATE names a stream and a sequence number ``seq``. The worker
tracks the next expected number per stream (``next_seq``, starting at 0) and:

* ``seq == next_seq`` -> apply, then :meth:`SequenceTable.applied` caches the reply;
* ``seq < next_seq``  -> a duplicate (client retry): answer again from the cache, never
  re-apply; if the reply fell out of the cache (at most ``cache_size`` replies and a bound
  in bytes per stream and in all, :mod:`streamrnn.serving.reply_budget`; a reply bigger
  than a bound is never kept) -> ERROR ``SEQ_STALE``; a cached reply answers only a
  request of the type that made it (another type -> ERROR ``SEQ_STALE``);
* ``seq > next_seq``  -> ERROR ``SEQ_GAP`` naming ``next_seq``.

A request that fails (bad chunk, engine full, ...) does not consume its number. RESET is an
ordinary sequenced request (the counter keeps counting across resets). CLOSE forgets the
stream: the id may start over at seq 0; a retried CLOSE (and only a CLOSE) is still answered
from a small tombstone cache. An expired stream (idle too long) answers EXPIRED until it
starts over at 0. Each stream's owner (the client identity that created it, and the count of
open streams per identity: :attr:`SequenceTable.owners`, :mod:`streamrnn.serving.owners`)
lives and dies with its entry and is kept in its tombstone.

Example::

    table = SequenceTable()
    table.check("a", 0, MessageType.PUSH)     # -> Decision(APPLY)
    table.applied("a", 0, reply)              # next_seq("a") == 1
    table.check("a", 0, MessageType.PUSH)     # -> Decision(REPLAY, reply=reply)
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from streamrnn.protocol import REPLY_CACHE_SIZE, ErrorCode, MessageType
from streamrnn.serving.owners import OwnerBook
from streamrnn.serving.reply_budget import (
    DEFAULT_REPLY_CACHE_BYTES,
    DEFAULT_REPLY_CACHE_STREAM_BYTES,
    ReplyBudget,
    reply_nbytes,
)

__all__ = ["CachedReply", "Decision", "SequenceTable", "Verdict"]

#: A cached reply: (type, header without "rid", arrays).
CachedReply = tuple[MessageType, dict[str, Any], dict[str, Any]]


class Verdict(enum.Enum):
    APPLY = "apply"
    REPLAY = "replay"
    ERROR = "error"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one sequenced request."""

    verdict: Verdict
    expected: int = 0  # the stream's next expected seq (for ERROR/EXPIRED replies)
    reply: CachedReply | None = None  # REPLAY: the reply to send again
    code: ErrorCode | None = None  # ERROR
    message: str = ""


@dataclass
class _Stream:
    next_seq: int = 0
    replies: OrderedDict[int, CachedReply] = field(default_factory=OrderedDict)
    last_seen: float = field(default_factory=time.monotonic)
    generated: frozenset[int] = frozenset()  # cached seqs that were GENERATEs (not PUSHes)
    restored_below: int = 0  # cached OUTPUTs below this seq came from a checkpoint


@dataclass(frozen=True, slots=True)
class _Tombstone:
    expired: bool  # False: closed by CLOSE
    seq: int  # the CLOSE's seq, or the expired stream's next_seq
    reply: CachedReply | None  # the CLOSE's ACK
    owner: str | None = None  # the closed stream's owner (streamrnn.serving.owners)


class SequenceTable:
    """Per-stream expected sequence numbers, reply caches and tombstones."""

    def __init__(self, cache_size: int = REPLY_CACHE_SIZE, max_tombstones: int = 4096,
                 stream_bytes: int = DEFAULT_REPLY_CACHE_STREAM_BYTES,
                 total_bytes: int = DEFAULT_REPLY_CACHE_BYTES, per_identity: int = 0):
        self.cache_size = cache_size
        self.max_tombstones = max_tombstones
        #: bytes of the cached replies' arrays, bounded per stream and in all
        self.budget = ReplyBudget(stream_bytes, total_bytes)
        #: the streams' owners and open streams per client identity
        self.owners = OwnerBook(per_identity)
        self._streams: dict[str, _Stream] = {}
        self._tombstones: OrderedDict[str, _Tombstone] = OrderedDict()

    def __contains__(self, stream: object) -> bool:
        return stream in self._streams

    def __len__(self) -> int:
        return len(self._streams)

    def next_seq(self, stream: str) -> int:
        """The next seq the stream expects (0 for a stream this table does not hold, which
        includes closed and expired ones: they start over at 0)."""
        entry = self._streams.get(stream)
        return entry.next_seq if entry else 0

    def check(self, stream: str, seq: int, msg_type: MessageType) -> Decision:
        """Decide what to do with request ``seq`` of ``stream``; changes nothing."""
        entry = self._streams.get(stream)
        if entry is None:
            return self._check_unknown(stream, seq, msg_type)
        expected = entry.next_seq
        if seq == expected:
            return Decision(Verdict.APPLY, expected)
        if seq > expected:
            return Decision(Verdict.ERROR, expected, code=ErrorCode.SEQ_GAP,
                            message=f"stream {stream!r}: seq {seq} skips ahead; expected "
                                    f"{expected}")
        cached = entry.replies.get(seq)
        if cached is not None:
            made = _requests_of(entry, seq, cached[0])
            if msg_type in made:
                return Decision(Verdict.REPLAY, expected, reply=cached)
            # a cached reply answers only a request of the type that made it
            return Decision(Verdict.ERROR, expected, code=ErrorCode.SEQ_STALE,
                            message=f"stream {stream!r}: seq {seq} was a {made[0].name}, not "
                                    f"a {msg_type.name}; expected {expected}")
        return Decision(Verdict.ERROR, expected, code=ErrorCode.SEQ_STALE,
                        message=f"stream {stream!r}: seq {seq} was applied long ago and its "
                                f"reply is no longer cached; expected {expected}")

    def _check_unknown(self, stream: str, seq: int, msg_type: MessageType) -> Decision:
        tomb = self._tombstones.get(stream)
        if (tomb is not None and not tomb.expired and seq == tomb.seq
                and tomb.reply is not None and msg_type == MessageType.CLOSE):
            return Decision(Verdict.REPLAY, 0, reply=tomb.reply)
        if tomb is not None and tomb.expired and seq != 0:
            return Decision(Verdict.EXPIRED, 0, message=(
                f"stream {stream!r} expired after being idle (at seq {tomb.seq}); its state "
                "is gone: start over at seq 0"))
        if seq == 0 and msg_type in (MessageType.PUSH, MessageType.GENERATE):
            return Decision(Verdict.APPLY, 0)
        return Decision(Verdict.ERROR, 0, code=ErrorCode.UNKNOWN_STREAM,
                        message=f"unknown stream {stream!r} (a new stream starts with a PUSH "
                                f"at seq 0; got {msg_type.name} seq {seq})")

    def applied(self, stream: str, seq: int, reply: CachedReply,
                request: MessageType = MessageType.PUSH) -> None:
        """Record that ``request`` ``seq`` was applied and produced ``reply`` (a stream it
        creates belongs to the caller the owners book admitted)."""
        entry = self._streams.get(stream)
        if entry is None:
            self._tombstones.pop(stream, None)
            entry = self._streams[stream] = _Stream()
            self.owners.created(stream)
        entry.next_seq = seq + 1
        entry.last_seen = time.monotonic()
        self._cache(stream, entry, seq, reply)
        if request == MessageType.GENERATE:
            entry.generated = frozenset(s for s in (*entry.generated, seq)
                                        if s in entry.replies)

    def _cache(self, stream: str, entry: _Stream, seq: int, reply: CachedReply) -> None:
        """Keep ``reply`` for duplicates within the count and byte bounds (a reply too big
        for them is not kept: a duplicate of it gets SEQ_STALE)."""
        nbytes = reply_nbytes(reply[2])
        if not self.budget.fits(nbytes):
            return
        entry.replies[seq] = reply
        for old_stream, old_seq in self.budget.add(stream, seq, nbytes):
            self._streams[old_stream].replies.pop(old_seq, None)
        while len(entry.replies) > self.cache_size:
            old_seq, _ = entry.replies.popitem(last=False)
            self.budget.discard(stream, old_seq)

    def closed(self, stream: str, seq: int, reply: CachedReply) -> None:
        """Forget ``stream`` after its CLOSE ``seq`` was applied (keeps a tombstone)."""
        self._streams.pop(stream, None)
        self.budget.forget(stream)
        self._bury(stream, _Tombstone(False, seq, reply, self.owners.released(stream)))

    def expire_idle(self, max_idle_s: float, now: float | None = None) -> list[str]:
        """Forget streams idle for more than ``max_idle_s``; returns their ids."""
        now = time.monotonic() if now is None else now
        idle = [s for s, e in self._streams.items() if now - e.last_seen > max_idle_s]
        for stream in idle:
            entry = self._streams.pop(stream)
            self.budget.forget(stream)
            self._bury(stream, _Tombstone(True, entry.next_seq, None,
                                          self.owners.released(stream)))
        return idle

    def _bury(self, stream: str, tomb: _Tombstone) -> None:
        self._tombstones[stream] = tomb
        self._tombstones.move_to_end(stream)
        while len(self._tombstones) > self.max_tombstones:
            self._tombstones.popitem(last=False)

    # ---- durability (streamrnn.serving.durability writes these into checkpoints) -----------------

    def export(self) -> dict[str, tuple[int, list[tuple[int, CachedReply]]]]:
        """Every held stream's ``(next_seq, [(seq, cached reply), ...])``, oldest first."""
        return {s: (e.next_seq, list(e.replies.items())) for s, e in self._streams.items()}

    def export_closed(self) -> dict[str, tuple[int, CachedReply]]:
        """Streams closed by CLOSE that still answer a resent CLOSE: ``(seq, reply)``."""
        return {s: (t.seq, t.reply) for s, t in self._tombstones.items()
                if not t.expired and t.reply is not None}

    def restore(self, stream: str, next_seq: int,
                replies: list[tuple[int, CachedReply]] = (), owner: str | None = None) -> None:
        """Hold ``stream`` at ``next_seq`` with ``replies`` cached, belonging to ``owner``
        (from a checkpoint)."""
        self._tombstones.pop(stream, None)
        self.owners.restore(stream, owner)
        self.budget.forget(stream)
        entry = self._streams[stream] = _Stream(next_seq=next_seq, restored_below=next_seq)
        for seq, reply in replies[-self.cache_size:]:
            self._cache(stream, entry, seq, reply)

    def restore_closed(self, stream: str, seq: int, reply: CachedReply,
                       owner: str | None = None) -> None:
        """Remember that ``stream`` of ``owner`` was closed by CLOSE ``seq`` (from a
        checkpoint)."""
        if stream not in self._streams:
            self._bury(stream, _Tombstone(False, seq, reply, owner))

    def owner(self, stream: str) -> tuple[str | None, bool]:
        """``(owner, live)``: who owns ``stream`` (None: anyone), and whether it is held
        (False: closed, expired or unknown: its id may start over at seq 0)."""
        if stream in self._streams:
            return self.owners.owner(stream), True
        tomb = self._tombstones.get(stream)
        return (None if tomb is None else tomb.owner), False

    def export_owners(self) -> dict[str, str]:
        """``stream -> owner`` of the held streams and of the closed ones in
        :meth:`export_closed` that have an owner."""
        closed = {s: t.owner for s, t in self._tombstones.items()
                  if not t.expired and t.reply is not None and t.owner is not None}
        return {**closed, **self.owners.owners()}

    def forget(self, stream: str) -> None:
        """Drop ``stream`` without a tombstone (it moved to another worker)."""
        self._streams.pop(stream, None)
        self.owners.released(stream)
        self.budget.forget(stream)


def _requests_of(entry: _Stream, seq: int, reply_type: MessageType) -> tuple[MessageType, ...]:
    """The request types a cached reply of ``entry`` answers (a CLOSE's ACK is kept in a
    tombstone; an OUTPUT restored from a checkpoint answers a PUSH or a GENERATE)."""
    if reply_type == MessageType.ACK:
        return (MessageType.RESET,)
    if seq in entry.generated:
        return (MessageType.GENERATE,)
    if seq < entry.restored_below:
        return (MessageType.PUSH, MessageType.GENERATE)
    return (MessageType.PUSH,)
