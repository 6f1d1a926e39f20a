"""A router's client socket (a ROUTER, as a worker's): replies it makes itself (PONG,
ERROR, BUSY) and what it passes on from the workers.

Runs on the routing thread. Replies that cannot be delivered (the client is gone or its
queue is full: ROUTER_MANDATORY) are counted, never raised.

Example::

    front = Front(sock, counts, busy_retry_after_ms=20)
    front.reply(identity, MessageType.ACK, {"stats": {...}}, rid=7)
    front.busy(identity, {"stream": "s1", "seq": 3}, rid=8)
"""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Mapping
from typing import Any

import zmq

from streamrnn.codec import Message, encode
from streamrnn.errors import ProtocolError
from streamrnn.protocol import (
    F_CODE,
    F_MESSAGE,
    F_REQUEST_ID,
    F_RETRY_AFTER_MS,
    F_SEQ,
    F_STREAM,
    F_VERSIONS,
    SUPPORTED_VERSIONS,
    ErrorCode,
    MessageType,
    negotiate_version,
)

__all__ = ["Front", "echo"]


def echo(header: Mapping[str, Any]) -> dict[str, Any]:
    """The request fields a reply repeats (stream and seq)."""
    return {k: header[k] for k in (F_STREAM, F_SEQ) if k in header}


class Front:
    """The router's client socket (see the module docs)."""

    def __init__(self, sock: zmq.Socket, counts: Counter[str], busy_retry_after_ms: int):
        self.sock = sock
        self.counts = counts
        self.busy_retry_after_ms = busy_retry_after_ms

    def send(self, frames: list) -> None:
        """Send ``[identity, *message]`` without blocking (undeliverable: counted)."""
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # ROUTER_MANDATORY: the client is gone or full
            self.counts["replies_unroutable" if exc.errno == errno.EHOSTUNREACH
                        else "replies_dropped"] += 1

    def reply(self, identity: bytes, msg_type: MessageType, header: dict[str, Any],
              rid: int | None) -> None:
        if rid is not None:
            header = {**header, F_REQUEST_ID: rid}
        self.send([identity, *encode(msg_type, header)])

    def busy(self, identity: bytes, header: Mapping[str, Any], rid: int | None) -> None:
        """BUSY for the request with ``header`` (the client resends after the hint)."""
        self.counts["busy"] += 1
        self.reply(identity, MessageType.BUSY,
                   {**echo(header), F_RETRY_AFTER_MS: self.busy_retry_after_ms}, rid)

    def malformed(self, identity: bytes, exc: ProtocolError) -> None:
        self.counts["malformed"] += 1
        header = {**exc.context, F_CODE: int(exc.code), F_MESSAGE: str(exc)}
        if exc.code == ErrorCode.UNSUPPORTED_VERSION:
            header[F_VERSIONS] = list(SUPPORTED_VERSIONS)
        self.send([identity, *encode(MessageType.ERROR, header)])

    def pong(self, identity: bytes, msg: Message, rid: int | None,
             live: Mapping[str, Any]) -> None:
        """Answer PING: versions, and the first live worker's facts plus ``router``."""
        offered = msg.header.get(F_VERSIONS) or [msg.header["v"]]
        chosen = negotiate_version(offered)
        if chosen is None:
            self.reply(identity, MessageType.ERROR, {
                F_CODE: int(ErrorCode.UNSUPPORTED_VERSION),
                F_MESSAGE: f"no common protocol version: offered {offered}",
                F_VERSIONS: list(SUPPORTED_VERSIONS)}, rid)
            return
        describe = live[min(live)].describe if live else None
        info = dict(describe) if isinstance(describe, dict) else {}
        info["router"] = {"workers": len(live)}
        self.reply(identity, MessageType.PONG, {
            F_VERSIONS: list(SUPPORTED_VERSIONS), "version": chosen, "worker": info}, rid)
