"""A bare wire client for the stream-owner tests (a plain module, not a test module):
:class:`Raw`, a DEALER that sends one request at a time with any header fields (a client
the :class:`streamrnn.Client` would never be, e.g. one claiming another's ``client_key``),
and :func:`assert_forbidden`, what an ERROR FORBIDDEN must (not) carry.

Example::

    bob = Raw(endpoint, {"server": server_key_file, "bob_secret": secret_file}, "bob")
    assert_forbidden(bob.ask(MessageType.RESET, "a1", seq=2))
    bob.close()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import zmq

from streamrnn.codec import Message, decode_reply, encode
from streamrnn.protocol import ErrorCode, MessageType
from streamrnn.security import curve_client

__all__ = ["Raw", "assert_forbidden"]


class Raw:
    """A DEALER that speaks the wire protocol one request at a time (CURVE with ``keys``:
    the server's public key file as ``"server"``, this client's as ``who + "_secret"``)."""

    def __init__(self, endpoint: str, keys: Mapping[str, Any] | None = None, who: str = ""):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            curve_client(self.sock, keys["server"], keys[who + "_secret"])
        self.sock.connect(endpoint)
        self.rid = 0

    def ask(self, msg_type: MessageType, stream: str, **fields: Any) -> Message:
        arrays = fields.pop("arrays", None)
        self.rid += 1
        self.sock.send_multipart(encode(msg_type, {"rid": self.rid, "stream": stream,
                                                   **fields}, arrays))
        assert self.sock.poll(10_000), f"no reply to {msg_type.name}"
        reply = decode_reply(self.sock.recv_multipart())
        assert reply.header["rid"] == self.rid
        return reply

    def close(self) -> None:
        self.sock.close(0)


def assert_forbidden(reply: Message) -> None:
    """``reply`` is ERROR FORBIDDEN and tells nothing about the stream."""
    assert reply.type is MessageType.ERROR, reply
    assert reply.header["code"] == ErrorCode.FORBIDDEN
    # nothing about the stream: no next_seq, no expected, no outputs
    assert not {"next_seq", "expected", "pin_version", "worker"} & reply.header.keys()
    assert not reply.arrays
