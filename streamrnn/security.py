"""Optional CURVE encryption and client authentication (ZeroMQ's own, via ZAP).

A server (worker or router) has a secret key file (``zmq.auth.create_certificates`` writes
``name.key_secret``) and an allow-list of client public keys (a ``.key`` file or a
directory of them). A ``zmq.auth.thread.ThreadAuthenticator`` answers ZAP requests: a
client whose public key is not allowed never completes the handshake, so it gets nothing at
all (its requests time out).

Example::

    auth = curve_server(router_socket, "server.key_secret", "clients/")   # before bind
    client = Client(endpoint, curve_server_key="server.key",
                    curve_keypair="client.key_secret")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

ZAP_DOMAIN = "streamrnn"


def _load(path: str | os.PathLike, secret: bool) -> tuple[bytes, bytes | None]:
    public, secret_key = zmq.auth.load_certificate(str(path))
    if secret and secret_key is None:
        raise ValueError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret_key


def _allowed_keys(allow: str | os.PathLike) -> list[bytes]:
    path = Path(allow)
    files = sorted(path.glob("*.key")) if path.is_dir() else [path]
    keys = [zmq.auth.load_certificate(str(f))[0] for f in files]
    if not keys:
        raise ValueError(f"no client public keys (*.key) in {allow}")
    return keys


def curve_server(sock: zmq.Socket, secret_key_file: str | os.PathLike,
                 allow: str | os.PathLike | None, context: zmq.Context | None = None
                 ) -> ThreadAuthenticator:
    """Make ``sock`` (not yet bound) a CURVE server that admits only ``allow``'s keys.

    Returns the running authenticator (call ``.stop()`` when the socket is closed).
    """
    if allow is None:
        raise ValueError("CURVE needs an allow-list of client public keys (--curve-allow)")
    public, secret = _load(secret_key_file, secret=True)
    keys = _allowed_keys(allow)
    auth = ThreadAuthenticator(context or zmq.Context.instance())
    auth.start()
    # only the listed client keys (z85); everything else fails the handshake
    auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=_AllowList(keys))
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    return auth


class _AllowList:
    def __init__(self, keys: list[bytes]):
        self.keys = set(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


def curve_client(sock: zmq.Socket, server_key: Any, keypair: Any) -> None:
    """Make ``sock`` (not yet connected) a CURVE client of the server with ``server_key``.

    ``server_key``: the server's public key file (``.key``) or its z85 key (bytes/str);
    ``keypair``: this client's ``.key_secret`` file, or a ``(public, secret)`` z85 pair.
    """
    if isinstance(server_key, (str, os.PathLike)) and Path(server_key).is_file():
        server_public = _load(server_key, secret=False)[0]
    else:
        server_public = server_key.encode() if isinstance(server_key, str) else server_key
    if isinstance(keypair, (str, os.PathLike)):
        public, secret = _load(keypair, secret=True)
    else:
        public, secret = (k.encode() if isinstance(k, str) else k for k in keypair)
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)


__all__ = ["curve_client", "curve_server"]
