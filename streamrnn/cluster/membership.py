"""The router's decisions over plain data: admission, liveness and failover (pure: no
sockets, no files, no TensorFlow).

:class:`Membership` holds who is registered (:class:`Member`: name, link identity,
endpoint, checkpoint file, load from its last heartbeat), which worker each stream is
assigned to (sticky), which streams are moving to a survivor, and the adoptions in flight.
The :class:`~streamrnn.cluster.router.Router` feeds it what it hears (heartbeats, replies,
the clock) and applies what it decides (sends, closes sockets, reads and renames
checkpoint files).

* **Admission** (:meth:`Membership.place`): a stream's first request goes to the live
  worker with the most room (``capacity_left`` minus streams admitted since its last
  heartbeat); later requests go to the same worker. No room: a refusal
  (``ENGINE_FULL``, or ``UNAVAILABLE`` with no live worker). A moving stream, or one whose
  worker is dead with no survivor yet: busy.
* **Liveness** (:meth:`Membership.silent`): alive members not heard from for more than
  ``dead_after_s`` at time ``now``.
* **Failover** (:meth:`Membership.plan_failover`): a dead worker's streams (and those in its
  checkpoint file) are unassigned; those in the file are admitted to survivors and grouped
  per survivor into adoptions; the rest start over wherever their next request lands.

Example::

    m = Membership()
    m.join("w1", b"id1", "tcp://w1:5555", "/ckpt/w1.ckpt", now=0.0)
    m.beat("w1", {"capacity_left": 4, "streams": 0}, now=0.0)
    m.place("s1")                  # Placement(worker="w1", admitted=True)
    m.silent(now=2.0, dead_after_s=1.0)   # [Member(name="w1", ...)]
    m.declare_dead("w1")
    m.plan_failover("w1", records={"s1"})  # ({}, ["s1"]): no survivor has room
"""

from __future__ import annotations

import enum
import itertools
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from streamrnn.protocol import ErrorCode

__all__ = ["Adoption", "HeartbeatVerdict", "Member", "Membership", "Placement"]

log = logging.getLogger("streamrnn.router")


@dataclass
class Member:
    """One registered worker, as the router knows it from its heartbeats."""

    name: str
    identity: bytes  # on the router's worker socket
    endpoint: str
    checkpoint: str | None
    last_seen: float
    capacity_left: int = 0
    streams: int = 0
    admitted: int = 0  # streams admitted since its last heartbeat
    describe: dict[str, Any] = field(default_factory=dict)
    alive: bool = True

    @property
    def room(self) -> int:
        """New streams it can take now."""
        return self.capacity_left - self.admitted


@dataclass
class Adoption:
    """A survivor asked to adopt some of a dead worker's streams from its checkpoint."""

    worker: str
    streams: list[str]
    dead: str
    sent: float


@dataclass(frozen=True)
class Placement:
    """Where one request of a stream goes: forward to ``worker``, answer BUSY, or refuse."""

    worker: str | None = None
    busy: bool = False
    refusal: tuple[ErrorCode, str] | None = None
    admitted: bool = False  # the stream was admitted by this request


class HeartbeatVerdict(enum.Enum):
    """What to do with a heartbeat before recording it."""

    BEAT = "beat"  # a known worker: record its load
    JOIN = "join"  # a new name: connect to it, then record
    REJOIN = "rejoin"  # a dead worker's name from a new process: drop the old, then join
    FENCED = "fenced"  # the sender was declared dead: tell it to exit
    NAME_TAKEN = "name_taken"  # a live worker already has this name: tell the sender to exit


class Membership:
    """Registered workers, sticky stream assignments and adoptions (see the module docs)."""

    def __init__(self) -> None:
        self.members: dict[str, Member] = {}
        self.assigned: dict[str, str] = {}  # stream -> worker name (sticky)
        self.moving: dict[str, int] = {}  # stream -> ADOPT id it waits for
        self.adoptions: dict[int, Adoption] = {}
        self.fenced: set[bytes] = set()
        self._adopt_ids = itertools.count(1)

    # ---- registration ----------------------------------------------------------------------

    def live(self) -> list[Member]:
        """Alive members, in registration order."""
        return [m for m in self.members.values() if m.alive]

    def check_heartbeat(self, identity: bytes, name: str) -> HeartbeatVerdict:
        """Classify a heartbeat from ``identity`` claiming ``name``."""
        if identity in self.fenced:
            return HeartbeatVerdict.FENCED
        member = self.members.get(name)
        if member is None:
            return HeartbeatVerdict.JOIN
        if member.identity == identity:
            return HeartbeatVerdict.BEAT
        return HeartbeatVerdict.NAME_TAKEN if member.alive else HeartbeatVerdict.REJOIN

    def join(self, name: str, identity: bytes, endpoint: str, checkpoint: str | None,
             now: float) -> Member:
        """Register (or re-register, after REJOIN) a worker."""
        member = Member(name, identity, endpoint, checkpoint, last_seen=now)
        self.members[name] = member
        return member

    def beat(self, name: str, body: Mapping[str, Any], now: float) -> None:
        """Record a heartbeat's load; admissions since the last one are now counted in it."""
        member = self.members[name]
        member.last_seen = now
        member.capacity_left = int(body.get("capacity_left", 0))
        member.streams = int(body.get("streams", 0))
        member.describe = body.get("describe", member.describe)
        member.admitted = 0

    # ---- admission -------------------------------------------------------------------------

    def admit(self, stream: str) -> str | None:
        """The live worker with the most room for a new stream (sticky from now on)."""
        best: Member | None = None
        for member in self.members.values():
            if member.alive and member.room > 0 and (best is None or member.room > best.room):
                best = member
        if best is None:
            return None
        best.admitted += 1
        self.assigned[stream] = best.name
        return best.name

    def refusal(self, stream: str) -> tuple[ErrorCode, str]:
        """Why a new stream cannot be admitted now (error code and message)."""
        live = len(self.live())
        if live:
            return ErrorCode.ENGINE_FULL, (f"no worker has room for stream {stream!r} "
                                           f"({live} live workers, all full)")
        return (ErrorCode.UNAVAILABLE,
                f"no live worker behind this router can take stream {stream!r}")

    def place(self, stream: str) -> Placement:
        """Where a request of ``stream`` goes (admits the stream if it is new)."""
        if stream in self.moving:
            return Placement(busy=True)
        name = self.assigned.get(stream)
        admitted = False
        if name is None:
            name = self.admit(stream)
            if name is None:
                return Placement(refusal=self.refusal(stream))
            admitted = True
        if not self.members[name].alive:  # waits for a survivor or for it to come back
            return Placement(busy=True)
        return Placement(worker=name, admitted=admitted)

    def forget(self, stream: str) -> None:
        """The worker forgot ``stream`` (closed or expired): its next request is admitted
        afresh."""
        self.assigned.pop(stream, None)

    def assigned_to(self, name: str) -> int:
        """How many streams are assigned to worker ``name``."""
        return sum(1 for n in self.assigned.values() if n == name)

    # ---- liveness --------------------------------------------------------------------------

    def silent(self, now: float, dead_after_s: float) -> list[Member]:
        """Alive members not heard from for more than ``dead_after_s`` at ``now``."""
        return [m for m in self.members.values()
                if m.alive and now - m.last_seen > dead_after_s]

    def declare_dead(self, name: str) -> Member:
        """Mark ``name`` dead; its link identity is fenced from now on."""
        member = self.members[name]
        member.alive = False
        self.fenced.add(member.identity)
        return member

    def orphaned(self) -> str | None:
        """A dead worker whose streams still wait (not moving) while a survivor exists, or
        None: the router then fails them over."""
        for stream, name in self.assigned.items():
            member = self.members.get(name)
            if (member is not None and not member.alive and stream not in self.moving
                    and any(m.alive for m in self.members.values())):
                return name
        return None

    # ---- failover --------------------------------------------------------------------------

    def plan_failover(self, dead: str, records: Iterable[str]
                      ) -> tuple[dict[str, list[str]], list[str]]:
        """Unassign the streams of ``dead`` and those in its checkpoint (``records``); admit
        the checkpointed ones to survivors. Returns (survivor -> streams to adopt, the
        checkpointed streams no survivor had room for). Streams not in ``records`` start
        over where their next request is admitted."""
        records = set(records)
        streams = {s for s, n in self.assigned.items() if n == dead}
        plan: dict[str, list[str]] = {}
        homeless: list[str] = []
        for stream in sorted(streams | records):
            self.assigned.pop(stream, None)
            if stream not in records:
                continue  # never checkpointed: admitted afresh, the client replays it all
            target = self.admit(stream)
            if target is None:
                homeless.append(stream)
                continue
            plan.setdefault(target, []).append(stream)
        return plan, homeless

    def start_adoption(self, target: str, streams: list[str], dead: str, now: float) -> int:
        """Record that ``target`` is asked to adopt ``streams`` of ``dead``; they are busy
        until it answers. Returns the adoption id."""
        adopt_id = next(self._adopt_ids)
        self.adoptions[adopt_id] = Adoption(target, streams, dead, now)
        for stream in streams:
            self.moving[stream] = adopt_id
        return adopt_id

    def timed_out(self, now: float, timeout_s: float) -> list[int]:
        """Ids of adoptions sent more than ``timeout_s`` before ``now``."""
        return [i for i, a in self.adoptions.items() if now - a.sent > timeout_s]

    def finish_adoption(self, adopt_id: int, adopted: Iterable[str]) -> Adoption | None:
        """A survivor answered: its adopted streams stay with it, the others are admitted
        afresh on their next request. Returns the adoption (None if unknown)."""
        adoption = self.adoptions.pop(adopt_id, None)
        if adoption is None:
            return None
        adopted = set(adopted)
        for stream in adoption.streams:
            self.moving.pop(stream, None)
            if stream not in adopted:
                self.assigned.pop(stream, None)
        return adoption

    def adopting_from(self, dead: str) -> bool:
        """Whether adoptions of ``dead``'s streams are still in flight."""
        return any(a.dead == dead for a in self.adoptions.values())

    def stats(self) -> dict[str, Any]:
        """Streams, moving streams and per-worker facts (part of the router's STATS)."""
        return {
            "streams": len(self.assigned),
            "moving": len(self.moving),
            "workers": {m.name: {"alive": m.alive, "endpoint": m.endpoint,
                                 "streams": m.streams, "capacity_left": m.capacity_left,
                                 "assigned": self.assigned_to(m.name)}
                        for m in self.members.values()},
        }
