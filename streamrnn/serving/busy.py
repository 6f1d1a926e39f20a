"""The I/O thread's *busy latch*: after a stream's request was answered BUSY, its later
requests are answered BUSY too, until the client resends from the first one, or until the
work queue has drained past the BUSY (pure: no sockets, no TensorFlow).

The latch only shapes replies: a request accepted past it would be answered ``SEQ_GAP``
(naming the BUSY one) by the compute thread's sequence check, which alone guarantees that
nothing is applied out of order. So an entry may be dropped at any time, and it is:

* when a request of the stream with ``seq <= latched`` is accepted (the client went back);
* once the compute thread has taken every request that was queued when the BUSY was given
  (the queue drained past it): a latch set by someone else's envelope (a BATCH ending in
  ``[RESET, victim, seq 0]``) cannot outlive the queue that caused it;
* beyond ``capacity`` entries, oldest first (memory stays bounded whatever the ids).

Counts are those of :class:`~streamrnn.serving.outbox.WorkQueue`: ``added`` (requests ever
queued) and ``taken`` (ever taken by the compute thread); both only grow.

Example::

    latch = BusyLatch(capacity=8192)
    latch.set("a", seq=5, queued=120)    # BUSY for a/5 while 120 requests were ever queued
    latch.get("a", taken=100)            # 5: the queue has not drained past it yet
    latch.get("a", taken=120)            # None: every request ahead of the BUSY was taken
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["BusyLatch"]


class BusyLatch:
    """Streams answered BUSY: ``stream -> (lowest seq answered BUSY, queue mark)``.

    Args:
        capacity: at most this many entries (the oldest is dropped first).
    """

    def __init__(self, capacity: int = 8192):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        # insertion order = mark order (marks never fall), so stale entries are at the front
        self._entries: OrderedDict[str, tuple[int, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, stream: str, taken: int) -> int | None:
        """The seq ``stream`` is latched at, or None (``taken``: requests the compute thread
        has taken so far; entries it has drained past are dropped first)."""
        self.prune(taken)
        entry = self._entries.get(stream)
        return None if entry is None else entry[0]

    def set(self, stream: str, seq: int, queued: int) -> None:
        """Latch ``stream`` at ``seq`` (a BUSY answer), valid until the compute thread has
        taken ``queued`` requests in all (every request accepted before this BUSY)."""
        self._entries.pop(stream, None)
        self._entries[stream] = (seq, queued)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def clear(self, stream: str) -> None:
        """Drop ``stream``'s entry (the client went back to its latched seq)."""
        self._entries.pop(stream, None)

    def prune(self, taken: int) -> None:
        """Drop the entries whose queue mark the compute thread has reached."""
        entries = self._entries
        while entries:
            stream, (_, mark) = next(iter(entries.items()))
            if mark > taken:
                return
            del entries[stream]
