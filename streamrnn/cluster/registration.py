"""A worker's link to a router: heartbeats with its load, and adoption of a dead worker's
streams on the router's request (see :mod:`streamrnn.cluster.router`).

Runs in its own thread with its own DEALER socket (connected to the router's worker
endpoint); the adoption itself runs on the worker's compute thread
(:meth:`StreamWorker.adopt`), between steps.

Example::

    link = RouterLink(worker, "tcp://router:5556", name="w1")
    link.start(); ...; link.stop()
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

from streamrnn.cluster.link import ADOPT, ADOPTED, FENCED, HEARTBEAT
from streamrnn.engine.interface import EngineLike

if TYPE_CHECKING:
    from streamrnn.serving.worker import StreamWorker

__all__ = ["RouterLink"]

log = logging.getLogger("streamrnn.registration")


class RouterLink:
    """Registers ``worker`` with the router at ``router_endpoint`` and keeps it alive.

    Args:
        worker: a started :class:`~streamrnn.serving.worker.StreamWorker`.
        advertise: the endpoint the router should connect to (default: the bound one).
        on_fenced: called (from this thread) when the router declared this worker dead;
            the worker process must then exit without writing its checkpoint again.
    """

    def __init__(self, worker: StreamWorker, router_endpoint: str, name: str, *,
                 heartbeat_s: float = 0.25, advertise: str | None = None,
                 on_fenced: Callable[[str], None] | None = None,
                 context: zmq.Context | None = None):
        self.worker = worker
        self.router_endpoint = router_endpoint
        self.name = name
        self.heartbeat_s = heartbeat_s
        self.advertise = advertise
        self.on_fenced = on_fenced
        self._ctx = context or zmq.Context.instance()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="streamrnn-router-link",
                                        daemon=True)
        self._adoptions: list[tuple[int, Future]] = []

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _heartbeat(self) -> dict[str, Any]:
        engine: EngineLike = self.worker.engine
        ckpt = self.worker.checkpointer
        return {
            "name": self.name,
            "endpoint": self.advertise or self.worker.endpoint,
            "checkpoint": str(ckpt.path.resolve()) if ckpt is not None else None,
            "capacity_left": int(engine.capacity_left),
            "streams": int(engine.max_streams - engine.capacity_left),
            "describe": self.worker.describe(),
        }

    def _loop(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.router_endpoint)
        next_beat = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    self._send(sock, HEARTBEAT, self._heartbeat())
                    next_beat = now + self.heartbeat_s
                if sock.poll(20):
                    frames = sock.recv_multipart()
                    if len(frames) == 2:
                        self._on_message(frames[0], msgpack.unpackb(frames[1], raw=False))
                for adopt_id, future in list(self._adoptions):
                    if future.done():
                        self._adoptions.remove((adopt_id, future))
                        exc = future.exception()
                        self._send(sock, ADOPTED, {
                            "id": adopt_id, "streams": [] if exc else future.result(),
                            "error": None if exc is None else f"{type(exc).__name__}: {exc}"})
        finally:
            sock.close(linger=0)

    def _send(self, sock: zmq.Socket, kind: bytes, body: dict[str, Any]) -> None:
        try:
            sock.send_multipart([kind, msgpack.packb(body, use_bin_type=True)], zmq.NOBLOCK)
        except zmq.Again:
            pass  # the router is not reachable now; the next heartbeat tries again

    def _on_message(self, kind: bytes, body: dict[str, Any]) -> None:
        if kind == ADOPT:
            log.info("router asks to adopt %d streams from %s", len(body["streams"]),
                     body["path"])
            self._adoptions.append((int(body["id"]),
                                    self.worker.adopt(body["path"], list(body["streams"]))))
        elif kind == FENCED:
            reason = str(body.get("reason", ""))
            log.error("the router fenced this worker (%s)", reason)
            self._stop.set()
            if self.on_fenced is not None:
                self.on_fenced(reason)
