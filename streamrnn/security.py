"""Optional CURVE encryption and client authentication (ZeroMQ's own, via ZAP), and the
HMAC key that signs checkpoints and published weights.

A server (worker or router) has a secret key file (``streamrnn keys curve DIR NAME`` writes
``NAME.key_secret``, mode 0600, and ``NAME.key``) and an allow-list of client public keys (a
``.key`` file or a directory of them). A ``zmq.auth.thread.ThreadAuthenticator`` answers ZAP
requests: a client whose public key is not allowed never completes the handshake, so it
gets nothing at all (its requests time out).

A secret file (CURVE ``.key_secret`` or the HMAC key of ``--checkpoint-key`` /
``$STREAMRNN_CHECKPOINT_KEY``) that other users may read is used, with one warning per file
and process (:func:`warn_if_exposed`).

Example::

    auth = curve_server(router_socket, "server.key_secret", "clients/")   # before bind
    client = Client(endpoint, curve_server_key="server.key",
                    curve_keypair="client.key_secret")
    key = checkpoint_key("keys/checkpoint.key")   # bytes, or None without a file or env var
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from streamrnn.errors import CheckpointError

ZAP_DOMAIN = "streamrnn"
#: names the checkpoint key file when ``--checkpoint-key`` is not given
CHECKPOINT_KEY_ENV = "STREAMRNN_CHECKPOINT_KEY"
#: the shortest HMAC key accepted (bytes of the file, surrounding whitespace stripped)
MIN_HMAC_KEY_BYTES = 16

log = logging.getLogger("streamrnn.security")
_warned: set[str] = set()
_warned_lock = threading.Lock()


def warn_if_exposed(path: str | os.PathLike) -> bool:
    """Log a warning (once per file and process) when the secret file ``path`` may be read
    by its group or by other users; returns whether it may."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    if not mode & (stat.S_IRGRP | stat.S_IROTH):
        return False
    name = os.path.realpath(path)
    with _warned_lock:
        if name in _warned:
            return True
        _warned.add(name)
    log.warning("secret key file %s is readable by other users (mode %04o): restrict it "
                "with chmod 600 %s", path, stat.S_IMODE(mode), path)
    return True


def _load(path: str | os.PathLike, secret: bool) -> tuple[bytes, bytes | None]:
    public, secret_key = zmq.auth.load_certificate(str(path))
    if secret and secret_key is None:
        raise ValueError(f"{path} holds no secret key (use the .key_secret file)")
    if secret:
        warn_if_exposed(path)
    return public, secret_key


def load_hmac_key(path: str | os.PathLike) -> bytes:
    """The HMAC key in file ``path`` (its bytes, surrounding whitespace stripped; at least
    :data:`MIN_HMAC_KEY_BYTES`; CheckpointError if not). ``streamrnn keys hmac FILE`` writes
    one."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise CheckpointError(f"cannot read the checkpoint key {path}: {exc}") from exc
    if len(key) < MIN_HMAC_KEY_BYTES:
        raise CheckpointError(f"checkpoint key {path} holds {len(key)} bytes; a key needs at least "
                         f"{MIN_HMAC_KEY_BYTES} (make one with: streamrnn keys hmac FILE)")
    warn_if_exposed(path)
    return key


def checkpoint_key_file(path: str | os.PathLike | None = None) -> str | None:
    """``path``, else the file ``$STREAMRNN_CHECKPOINT_KEY`` names, else None."""
    return str(path) if path else os.environ.get(CHECKPOINT_KEY_ENV) or None


def checkpoint_key(path: str | os.PathLike | None = None) -> bytes | None:
    """The key in :func:`checkpoint_key_file` ``(path)``, or None (checkpoints and weights
    are then checked by SHA-256 only, as without a key)."""
    path = checkpoint_key_file(path)
    return None if path is None else load_hmac_key(path)


def public_keys(allow: str | os.PathLike) -> list[bytes]:
    """The z85 public keys of a ``.key`` file, or of the ``*.key`` files in a directory (as
    ``--curve-allow`` and ``--curve-routers`` name them); ValueError if there are none."""
    path = Path(allow)
    files = sorted(path.glob("*.key")) if path.is_dir() else [path]
    keys = [zmq.auth.load_certificate(str(f))[0] for f in files]
    if not keys:
        raise ValueError(f"no public keys (*.key) in {allow}")
    return keys


def curve_server(sock: zmq.Socket, secret_key_file: str | os.PathLike,
                 allow: str | os.PathLike | None, context: zmq.Context | None = None,
                 also_allow: Iterable[bytes] = ()) -> ThreadAuthenticator:
    """Make ``sock`` (not yet bound) a CURVE server that admits only ``allow``'s keys and
    the z85 keys ``also_allow`` (a worker's trusted routers).

    Returns the running authenticator (call ``.stop()`` when the socket is closed).
    """
    also_allow = list(also_allow)
    if allow is None and not also_allow:
        raise ValueError("CURVE needs an allow-list of client public keys (--curve-allow)")
    public, secret = _load(secret_key_file, secret=True)
    keys = (public_keys(allow) if allow is not None else []) + also_allow
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


__all__ = [
    "CHECKPOINT_KEY_ENV",
    "MIN_HMAC_KEY_BYTES",
    "checkpoint_key",
    "checkpoint_key_file",
    "curve_client",
    "curve_server",
    "load_hmac_key",
    "public_keys",
    "warn_if_exposed",
]
