"""The ROUTER socket clients talk to (a worker's, or a router's front), bound and hardened,
and the CURVE key of the peer that sent a message on it.

Example::

    sock, auth = bind_client_socket(zmq.Context.instance(), "tcp://127.0.0.1:0",
                                    max_frame_bytes=MAX_FRAME_BYTES, linger_ms=0)
    frames = sock.recv_multipart(copy=False)
    key = curve_user(frames[0])   # the sender's z85 public key (None without CURVE)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import zmq

__all__ = ["bind_client_socket", "curve_user"]


def bind_client_socket(ctx: zmq.Context, bind: str, max_frame_bytes: int, linger_ms: int,
                       curve_secret_key: str | None = None, curve_allow: str | None = None,
                       curve_also_allow: Iterable[bytes] = ()) -> tuple[zmq.Socket, Any]:
    """The ROUTER socket clients talk to (a worker's, or a router's front), bound.

    ROUTER_MANDATORY (an unroutable reply raises instead of vanishing), ZMQ_MAXMSGSIZE
    (a bigger frame disconnects its peer), deep queues, and CURVE when a secret key is
    given (admitting ``curve_allow``'s keys and the z85 keys ``curve_also_allow``). Returns
    the socket and the ZAP authenticator (None without CURVE) to stop later.
    """
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.setsockopt(zmq.LINGER, linger_ms)
    auth = None
    if curve_secret_key:
        from streamrnn.security import curve_server

        auth = curve_server(sock, curve_secret_key, curve_allow, ctx, curve_also_allow)
    sock.bind(bind)
    return sock, auth


def curve_user(frame: zmq.Frame) -> str | None:
    """The ZAP User-Id of a received frame: with CURVE, the sender's public key (z85, as
    :func:`~streamrnn.security.curve_server`'s authenticator sets it); else None."""
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:
        return None
