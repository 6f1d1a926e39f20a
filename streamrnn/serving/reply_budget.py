"""Bytes of a worker's reply cache: a bound per stream and one per worker (pure Python).

The :class:`~streamrnn.serving.sequencing.SequenceTable` keeps each stream's last replies
(at most ``REPLY_CACHE_SIZE``) to answer resent requests. Their arrays (a PUSH's
``(T, output_dim)`` float32 output) can be large: 32 replies of 65,536 steps would hold
gigabytes per stream, and every checkpoint writes them. :class:`ReplyBudget` counts the
bytes of the cached arrays and says which replies to drop:

* a reply bigger than either bound is answered but not cached (:meth:`ReplyBudget.fits`):
  a resend of it gets ``SEQ_STALE`` (with ``expected``), like a reply that fell out of the
  cache;
* past ``stream_bytes`` for one stream, that stream's oldest replies go first;
* past ``total_bytes`` for the worker, the oldest replies of any stream go first.

Replies without arrays (ACKs) cost nothing here (the count bound limits them).

Example::

    budget = ReplyBudget(stream_bytes=2 << 20, total_bytes=32 << 20)
    if budget.fits(out.nbytes):
        evicted = budget.add("a", 7, out.nbytes)   # [(stream, seq), ...] to drop from caches
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

__all__ = [
    "DEFAULT_REPLY_CACHE_BYTES",
    "DEFAULT_REPLY_CACHE_STREAM_BYTES",
    "ReplyBudget",
    "reply_nbytes",
]

#: Default bound of one stream's cached reply arrays (2 MiB: one 65,536-step chunk's
#: output of 8 float32 values per step, or 32 replies of 16 KiB).
DEFAULT_REPLY_CACHE_STREAM_BYTES = 2 * 1024 * 1024
#: Default bound of all the cached reply arrays of a worker (64 MiB).
DEFAULT_REPLY_CACHE_BYTES = 64 * 1024 * 1024


def reply_nbytes(arrays: Mapping[str, Any] | None) -> int:
    """Bytes of a reply's arrays (0 without arrays)."""
    return sum(int(getattr(a, "nbytes", 0)) for a in arrays.values()) if arrays else 0


class ReplyBudget:
    """Byte accounting of cached replies, per stream and per worker.

    Args:
        stream_bytes: at most this many bytes of cached arrays per stream.
        total_bytes: at most this many bytes of cached arrays in all.
    """

    def __init__(self, stream_bytes: int = DEFAULT_REPLY_CACHE_STREAM_BYTES,
                 total_bytes: int = DEFAULT_REPLY_CACHE_BYTES):
        if stream_bytes < 0 or total_bytes < 0:
            raise ValueError("reply cache bounds must be >= 0")
        self.stream_bytes = stream_bytes
        self.total_bytes = total_bytes
        self.total = 0  # bytes cached now
        self._age: OrderedDict[tuple[str, int], int] = OrderedDict()  # oldest first
        self._streams: dict[str, OrderedDict[int, int]] = {}  # stream -> seq -> bytes
        self._stream_totals: dict[str, int] = {}

    def fits(self, nbytes: int) -> bool:
        """Whether a reply of ``nbytes`` may be cached at all."""
        return nbytes <= self.stream_bytes and nbytes <= self.total_bytes

    def add(self, stream: str, seq: int, nbytes: int) -> list[tuple[str, int]]:
        """Count a newly cached reply (``fits(nbytes)`` must hold); returns the cached
        replies ``(stream, seq)`` to drop so both bounds hold again."""
        if nbytes <= 0:
            return []
        self._age[(stream, seq)] = nbytes
        self._streams.setdefault(stream, OrderedDict())[seq] = nbytes
        self._stream_totals[stream] = self._stream_totals.get(stream, 0) + nbytes
        self.total += nbytes
        evicted: list[tuple[str, int]] = []
        own = self._streams[stream]
        while self._stream_totals[stream] > self.stream_bytes:
            old = next(iter(own))
            self.discard(stream, old)
            evicted.append((stream, old))
        while self.total > self.total_bytes:
            old_stream, old_seq = next(iter(self._age))
            self.discard(old_stream, old_seq)
            evicted.append((old_stream, old_seq))
        return evicted

    def discard(self, stream: str, seq: int) -> None:
        """Stop counting one cached reply (dropped from its stream's cache)."""
        nbytes = self._age.pop((stream, seq), None)
        if nbytes is None:
            return
        own = self._streams[stream]
        del own[seq]
        self.total -= nbytes
        self._stream_totals[stream] -= nbytes
        if not own:
            del self._streams[stream], self._stream_totals[stream]

    def forget(self, stream: str) -> None:
        """Stop counting every cached reply of ``stream`` (closed, expired, moved)."""
        for seq in list(self._streams.get(stream, ())):
            self.discard(stream, seq)
