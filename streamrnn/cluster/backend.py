"""The router's worker side: the worker-link socket, one DEALER per live worker, and the
sockets and files that carry out :class:`~streamrnn.cluster.membership.Membership`'s
decisions (registration, liveness, failover by ADOPT, retiring a dead worker's checkpoint).

Worker link messages are ``[identity, kind, msgpack map]`` on the link socket (kinds in
:mod:`streamrnn.cluster.link`): workers send HEARTBEAT and ADOPTED, the router sends ADOPT
and FENCED. Requests and replies go over the per-worker DEALERs (to each worker's client
endpoint, as a client would).

Everything here runs on the router's thread.

Example::

    backend = WorkerBackend(ctx, "tcp://127.0.0.1:0", Membership(), Counter(),
                            dead_after_s=1.0, adopt_timeout_s=30.0)
    events = dict(backend.poller.poll(50))
    if backend.link in events:
        backend.on_link(backend.link.recv_multipart(copy=False))
    backend.check(time.monotonic(), on_dead=lambda name: ...)
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import zmq

from streamrnn.cluster.link import ADOPT, ADOPTED, FENCED, HEARTBEAT
from streamrnn.cluster.membership import HeartbeatVerdict, Membership
from streamrnn.errors import CheckpointError
from streamrnn.serving.checkpoint import load_checkpoint

__all__ = ["WorkerBackend"]

log = logging.getLogger("streamrnn.router")


class WorkerBackend:
    """The router's sockets toward its workers, and failover (see the module docs).

    Args:
        ctx: the ZeroMQ context.
        bind: the worker-link endpoint (``--workers-bind``).
        membership: the decisions (shared with the router's client side).
        counts: the router's counters (``registrations``, ``workers_died``, ...).
        dead_after_s: silence after which a worker is declared dead.
        adopt_timeout_s: an adoption not answered by then is given up (streams start over).
    """

    def __init__(self, ctx: zmq.Context, bind: str, membership: Membership,
                 counts: Counter[str], *, dead_after_s: float, adopt_timeout_s: float):
        self._ctx = ctx
        self.membership = membership
        self.counts = counts
        self.dead_after_s = dead_after_s
        self.adopt_timeout_s = adopt_timeout_s
        self.link = ctx.socket(zmq.ROUTER)
        self.link.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.link.setsockopt(zmq.LINGER, 0)
        self.link.bind(bind)
        self.endpoint: str = self.link.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.poller = zmq.Poller()
        self.poller.register(self.link, zmq.POLLIN)
        self._dealers: dict[str, zmq.Socket] = {}  # live worker name -> its DEALER

    # ---- sockets -----------------------------------------------------------------------

    def readable(self, events: dict[Any, int]) -> list[zmq.Socket]:
        """The live workers' DEALERs with replies waiting (``events`` from the poller)."""
        return [sock for sock in self._dealers.values() if sock in events]

    def send(self, name: str, frames: list) -> None:
        """Forward a request to worker ``name``; raises ``zmq.Again`` when its queue is full."""
        self._dealers[name].send_multipart(frames, zmq.NOBLOCK, copy=False)

    def close(self) -> None:
        for sock in self._dealers.values():
            sock.close(linger=0)
        self.link.close()

    def _connect(self, name: str, endpoint: str) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.connect(endpoint)
        self.poller.register(sock, zmq.POLLIN)
        self._dealers[name] = sock

    def _send_link(self, identity: bytes, kind: bytes, body: dict[str, Any]) -> bool:
        try:
            self.link.send_multipart([identity, kind, msgpack.packb(body, use_bin_type=True)],
                                     zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            log.warning("cannot reach worker link %r: %s", identity, exc)
            return False

    # ---- worker link -------------------------------------------------------------------

    def on_link(self, frames: list) -> None:
        """One message on the link socket: ``[identity, kind, msgpack map]``."""
        if len(frames) != 3:
            self.counts["bad_worker_link"] += 1
            return
        identity, kind = frames[0].bytes, frames[1].bytes
        try:
            body = msgpack.unpackb(frames[2].bytes, raw=False)
        except Exception:  # noqa: BLE001
            self.counts["bad_worker_link"] += 1
            return
        if kind == HEARTBEAT:
            self._on_heartbeat(identity, body)
        elif kind == ADOPTED:
            self._on_adopted(body)

    def _on_heartbeat(self, identity: bytes, body: dict[str, Any]) -> None:
        name = str(body["name"])
        verdict = self.membership.check_heartbeat(identity, name)
        if verdict is HeartbeatVerdict.FENCED:
            self._send_link(identity, FENCED, {"reason": "declared dead by the router"})
            return
        if verdict is HeartbeatVerdict.NAME_TAKEN:  # two live workers with one name
            log.error("worker name %r registered twice (%s and %s); refusing the second",
                      name, self.membership.members[name].endpoint, body.get("endpoint"))
            self._send_link(identity, FENCED, {"reason": f"name {name!r} is taken"})
            return
        if verdict is not HeartbeatVerdict.BEAT:  # JOIN, or REJOIN: a restarted worker
            # under a dead worker's name (whose DEALER was closed when it was declared dead)
            endpoint = str(body["endpoint"])
            self._connect(name, endpoint)
            self.membership.join(name, identity, endpoint, body.get("checkpoint"),
                                 time.monotonic())
            log.info("worker %s registered (%s)", name, endpoint)
            self.counts["registrations"] += 1
        self.membership.beat(name, body, time.monotonic())

    # ---- failover ----------------------------------------------------------------------

    def check(self, now: float, on_dead: Callable[[str], None]) -> None:
        """Declare silent workers dead (``on_dead(name)`` answers their requests still
        waiting, then their streams fail over), give up late adoptions, and fail over
        streams that waited for a survivor."""
        membership = self.membership
        for worker in membership.silent(now, self.dead_after_s):
            membership.declare_dead(worker.name)
            log.warning("worker %s (%s) missed its heartbeats for %.1f s: declared dead",
                        worker.name, worker.endpoint, self.dead_after_s)
            self.counts["workers_died"] += 1
            sock = self._dealers.pop(worker.name)
            self.poller.unregister(sock)
            sock.close(linger=0)
            on_dead(worker.name)
            self._fail_over(worker.name)
        for adopt_id in membership.timed_out(now, self.adopt_timeout_s):
            log.error("adoption %d by %s timed out; its streams start over", adopt_id,
                      membership.adoptions[adopt_id].worker)
            self._on_adopted({"id": adopt_id, "streams": [], "error": "timed out"})
        # orphans of a dead worker with no survivor: give them to a survivor once one exists
        orphaned = membership.orphaned()
        if orphaned is not None:
            self._fail_over(orphaned)

    def _fail_over(self, dead: str) -> None:
        membership = self.membership
        if not membership.live():
            log.error("no live worker to take over %d streams of %s; they wait for it",
                      membership.assigned_to(dead), dead)
            return
        checkpoint = membership.members[dead].checkpoint
        plan, homeless = membership.plan_failover(dead, _checkpointed(checkpoint, dead))
        for stream in homeless:
            log.error("no room for stream %r of %s on any survivor", stream, dead)
        for target, names in plan.items():
            self.counts["admitted"] += len(names)
            adopt_id = membership.start_adoption(target, names, dead, time.monotonic())
            self._send_link(membership.members[target].identity, ADOPT,
                            {"id": adopt_id, "path": checkpoint, "streams": names})
            log.info("asked %s to adopt %d streams of %s", target, len(names), dead)
        self.counts["failovers"] += 1
        if not plan:
            _retire(checkpoint)

    def _on_adopted(self, body: dict[str, Any]) -> None:
        adopted = set(body.get("streams") or [])
        adoption = self.membership.finish_adoption(int(body.get("id", -1)), adopted)
        if adoption is None:
            return
        if body.get("error"):
            log.error("worker %s could not adopt streams: %s", adoption.worker, body["error"])
        self.counts["streams_adopted"] += len(adopted)
        if not self.membership.adopting_from(adoption.dead):
            _retire(self.membership.members[adoption.dead].checkpoint)


def _checkpointed(checkpoint: str | None, dead: str) -> set[str]:
    """The streams in a dead worker's checkpoint file (none if it is missing or bad)."""
    if checkpoint and Path(checkpoint).exists():
        try:
            return set(load_checkpoint(checkpoint).streams)
        except CheckpointError as exc:
            log.error("cannot fail over from %s: %s; its streams start over", dead, exc)
    return set()


def _retire(checkpoint: str | None) -> None:
    """Move a dead worker's checkpoint aside, so a restart of it does not resurrect streams
    that live elsewhere now."""
    if checkpoint and Path(checkpoint).exists():
        aside = f"{checkpoint}.adopted-{int(time.time())}"
        os.replace(checkpoint, aside)
        log.info("moved %s aside to %s (its streams live elsewhere now)", checkpoint, aside)
