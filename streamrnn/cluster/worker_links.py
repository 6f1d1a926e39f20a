"""A router's sockets toward its workers: one DEALER per live worker, connected to the
client endpoint the worker published in Redis, as a client would (with CURVE client keys
when the router has ``--curve-client-key``: the worker's server public key is its Redis
``curve_public``; the worker's ``--curve-routers`` must list the router's public key).

Nothing here listens: a router has no worker-facing endpoint, and workers never send it
anything but replies to its own requests. Runs on the routing thread.

Example::

    links = WorkerLinks(ctx, poller, curve_client_key="router.key_secret")
    links.usable(info)               # False: plaintext worker while CURVE is on, bad endpoint
    links.sync(holders.live)       # connect new workers, close those that left
    links.send("w1", frames)         # raises zmq.Again when its queue is full
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import zmq

__all__ = ["WorkerLinks"]

log = logging.getLogger("streamrnn.router")

_ENDPOINT = re.compile(r"^(tcp|ipc)://\S{1,255}$")


class WorkerLinks:
    """One DEALER per live worker (see the module docs).

    Args:
        ctx: the ZeroMQ context.
        poller: the routing thread's poller (DEALERs are registered and unregistered here).
        curve_client_key: this router's CURVE secret key file (``.key_secret``); None:
            plaintext workers only.
    """

    def __init__(self, ctx: zmq.Context, poller: zmq.Poller,
                 curve_client_key: str | None = None):
        self._ctx = ctx
        self._poller = poller
        self.curve_client_key = curve_client_key
        self._dealers: dict[str, tuple[Any, zmq.Socket]] = {}  # name -> (its info, DEALER)
        self._refused: set[tuple[str, str]] = set()  # (name, token) logged once

    def usable(self, info: Any) -> bool:
        """Whether this router can talk to the worker ``info`` describes: a well-formed
        endpoint, and a CURVE key exactly when the router uses CURVE."""
        curve = bool(getattr(info, "curve_public", ""))
        reason = None
        if not info.endpoint:
            return False  # not bound yet: it publishes its endpoint once it is
        if not isinstance(info.endpoint, str) or not _ENDPOINT.match(info.endpoint):
            reason = f"unusable endpoint {info.endpoint!r}"
        elif self.curve_client_key and not curve:
            reason = "it has no CURVE key and this router uses CURVE"
        elif curve and not self.curve_client_key:
            reason = "it uses CURVE and this router has no --curve-client-key"
        if reason is None:
            return True
        if (info.name, info.token) not in self._refused:
            self._refused.add((info.name, info.token))
            log.error("ignoring worker %r: %s", info.name, reason)
        return False

    def sync(self, live: Mapping[str, Any]) -> None:
        """Connect to workers new in ``live``; close the DEALERs of those no longer there
        (or there with another incarnation)."""
        for name, (info, _) in list(self._dealers.items()):
            now = live.get(name)
            if now is None or now.token != info.token or now.endpoint != info.endpoint:
                self.close_one(name)
        for name, info in live.items():
            if name not in self._dealers:
                self._connect(name, info)

    def _connect(self, name: str, info: Any) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        try:
            if self.curve_client_key:
                from streamrnn.security import curve_client

                curve_client(sock, info.curve_public, self.curve_client_key)
            sock.connect(info.endpoint)
        except (zmq.ZMQError, ValueError, OSError) as exc:
            sock.close(linger=0)
            log.error("cannot connect to worker %r at its published endpoint: %s", name, exc)
            return
        self._poller.register(sock, zmq.POLLIN)
        self._dealers[name] = (info, sock)
        log.info("connected to worker %s", name)

    def close_one(self, name: str) -> None:
        entry = self._dealers.pop(name, None)
        if entry is not None:
            self._poller.unregister(entry[1])
            entry[1].close(linger=0)
            log.info("disconnected from worker %s", name)

    def close(self) -> None:
        for name in list(self._dealers):
            self.close_one(name)

    def connected(self, name: str) -> bool:
        return name in self._dealers

    def readable(self, events: Mapping[Any, int]) -> list[zmq.Socket]:
        """The DEALERs with replies waiting (``events`` from the poller)."""
        return [sock for _, sock in self._dealers.values() if sock in events]

    def send(self, name: str, frames: list) -> None:
        """Forward a request to worker ``name``; raises ``zmq.Again`` when its queue is full
        and KeyError when it is not connected."""
        self._dealers[name][1].send_multipart(frames, zmq.NOBLOCK, copy=False)
