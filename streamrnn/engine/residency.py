"""Where each live stream is: in a slot, or parked in host memory (LRU swap).

Pure (numpy only): a :class:`Residency` combines the slot table
(:class:`~streamrnn.engine.slots.SlotTable`) with any
:class:`~streamrnn.engine.interface.StateRows` (the executor's state rows, ``(slots, ...)``
per state variable). An engine may hold more live streams (``max_streams``) than it has
slots: before a step, the streams it needs get slots, and the least recently used idle
streams are swapped out (their rows copied to host memory), to be swapped back in, with
identical state, on their next chunk.

Example::

    homes = Residency(SlotTable(4), bank, max_streams=16)
    homes.make_resident(["a", "b"])      # both hold slots now (swapping others out if needed)
    rows, steps = homes.export_states()["a"]
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from streamrnn.engine.interface import StateRows, StateSnapshot
from streamrnn.engine.slots import SlotTable
from streamrnn.errors import UnknownStreamError

__all__ = ["Parked", "Residency"]


@dataclass
class Parked:
    """A stream parked in host memory: its state rows and steps since reset."""

    state: StateSnapshot
    steps: int


class Residency:
    """The live streams of one engine: resident in a slot, or parked in host memory.

    Args:
        table: which stream holds which slot.
        bank: the state rows of every slot.
        max_streams: live streams allowed in all (>= the table's slots); None: slots only.
    """

    def __init__(self, table: SlotTable, bank: StateRows, max_streams: int | None = None):
        self.table = table
        self.bank = bank
        self.max_streams = table.capacity if max_streams is None else max_streams
        if self.max_streams < table.capacity:
            raise ValueError(f"max_streams ({max_streams}) must be >= slots ({table.capacity})")
        self.parked: OrderedDict[str, Parked] = OrderedDict()
        self.swaps_in = 0
        self.swaps_out = 0

    def __contains__(self, stream: object) -> bool:
        return stream in self.table or stream in self.parked

    def __len__(self) -> int:
        return len(self.table) + len(self.parked)

    @property
    def streams(self) -> list[str]:
        """Every live stream, resident first."""
        return [*self.table, *self.parked]

    @property
    def capacity_left(self) -> int:
        """How many new streams can still be opened (free slots plus swap room)."""
        return self.max_streams - len(self)

    # ---- moving streams in and out -----------------------------------------------------

    def make_resident(self, streams: list[str]) -> None:
        """Give every stream in ``streams`` (at most ``slots``) a slot, swapping others out.

        New streams start in the initial state; parked ones continue from their rows.
        """
        absent = [s for s in streams if s not in self.table]
        shortfall = len(absent) - self.table.free
        if shortfall > 0:
            keep = set(streams)
            victims = sorted(
                (info.last_seen, name) for name, info in self.table.items() if name not in keep
            )[:shortfall]
            self._swap_out([name for _, name in victims])
        self.open_many([s for s in absent if s not in self.parked])
        for s in absent:
            if s in self.parked:
                parked = self.parked.pop(s)
                slot = self.table.acquire(s)
                self.bank.restore(slot, parked.state)
                self.table.info(s).steps = parked.steps
                self.swaps_in += 1

    def _swap_out(self, streams: list[str]) -> None:
        if not streams:
            return
        slots = [self.table.slot_of(s) for s in streams]
        rows = self.bank.read(slots)
        for k, s in enumerate(streams):
            info = self.table.info(s)
            self.parked[s] = Parked([r[k].copy() for r in rows], info.steps)
            self.table.release(s)
            self.swaps_out += 1

    def open_many(self, streams: list[str]) -> None:
        """Slots for the new ones among ``streams``, in the initial state."""
        fresh = [self.table.acquire(s) for s in streams if s not in self.table]
        self.bank.reset(fresh)  # a reused row must not leak the previous stream's state

    def reset(self, stream: str) -> None:
        """Put ``stream`` back to its initial state (resident or parked)."""
        if stream in self.parked:
            self.parked[stream] = Parked([r.copy() for r in self.bank.initial_rows], 0)
            return
        self.bank.reset([self.table.slot_of(stream)])
        self.table.info(stream).steps = 0

    def close(self, stream: str) -> None:
        """Forget ``stream`` (free its slot or drop its parked rows)."""
        if self.parked.pop(stream, None) is None:
            self.table.release(stream)

    # ---- state rows --------------------------------------------------------------------

    def snapshot(self, stream: str) -> StateSnapshot:
        """A copy of ``stream``'s state rows (resident or parked)."""
        if stream in self.parked:
            return [r.copy() for r in self.parked[stream].state]
        if stream not in self.table:
            raise UnknownStreamError(f"unknown stream {stream!r}")
        return self.bank.snapshot(self.table.slot_of(stream))

    def export_states(self) -> dict[str, tuple[StateSnapshot, int]]:
        """Every live stream's ``(state rows, steps since reset)``, resident or parked."""
        resident = list(self.table)
        out: dict[str, tuple[StateSnapshot, int]] = {}
        if resident:
            rows = self.bank.read([self.table.slot_of(s) for s in resident])
            for k, s in enumerate(resident):
                out[s] = ([r[k].copy() for r in rows], self.table.info(s).steps)
        for s, parked in self.parked.items():
            out[s] = ([r.copy() for r in parked.state], parked.steps)
        return out

    def import_states(self, states: Mapping[str, tuple[StateSnapshot, int]]) -> None:
        """Open (or overwrite) each stream with the given rows; those that find no free
        slot are parked. The caller checks :attr:`capacity_left` first."""
        for stream, (state, steps) in states.items():
            if stream in self.parked or (stream not in self.table and not self.table.free):
                self.parked[stream] = Parked([np.array(r) for r in state], steps)
                continue
            self.make_resident([stream])
            self.bank.restore(self.table.slot_of(stream), state)
            self.table.info(stream).steps = steps
