"""SlotTable: which stream owns which batch row ("slot") of the serving model.

Pure Python, no TensorFlow. Slots are handed out from a free list (lowest first) and never
compacted: a stream keeps its row until it is closed.

Example::

    table = SlotTable(4)
    table.acquire("a")   # -> 0
    table.acquire("b")   # -> 1
    table.release("a")   # row 0 is free again
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from streamrnn.errors import EngineFullError, UnknownStreamError

__all__ = ["SlotInfo", "SlotTable"]


@dataclass
class SlotInfo:
    """Book-keeping for one live stream."""

    slot: int
    steps: int = 0  # timesteps applied since the last reset
    last_seen: float = field(default_factory=time.monotonic)


class SlotTable:
    """Maps stream ids to slots ``0 .. capacity-1`` with a free list."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"slots must be >= 1, got {capacity}")
        self.capacity = capacity
        self._free: list[int] = list(range(capacity))
        heapq.heapify(self._free)
        self._streams: dict[str, SlotInfo] = {}

    def __contains__(self, stream: object) -> bool:
        return stream in self._streams

    def __len__(self) -> int:
        return len(self._streams)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._streams))

    @property
    def free(self) -> int:
        """Number of free slots."""
        return len(self._free)

    def info(self, stream: str) -> SlotInfo:
        try:
            return self._streams[stream]
        except KeyError:
            raise UnknownStreamError(f"unknown stream {stream!r}") from None

    def slot_of(self, stream: str) -> int:
        return self.info(stream).slot

    def acquire(self, stream: str) -> int:
        """The slot of ``stream``, taking a free one if the stream is new."""
        if stream in self._streams:
            return self._streams[stream].slot
        if not self._free:
            raise EngineFullError(
                f"all {self.capacity} slots are taken by live streams; close a stream or "
                f"build the engine with more slots (slots={self.capacity})"
            )
        slot = heapq.heappop(self._free)
        self._streams[stream] = SlotInfo(slot)
        return slot

    def release(self, stream: str) -> int:
        """Free the slot of ``stream`` and return it."""
        info = self.info(stream)
        del self._streams[stream]
        heapq.heappush(self._free, info.slot)
        return info.slot

    def touch(self, stream: str, steps: int = 0) -> None:
        info = self.info(stream)
        info.steps += steps
        info.last_seen = time.monotonic()

    def items(self) -> list[tuple[str, SlotInfo]]:
        return list(self._streams.items())
