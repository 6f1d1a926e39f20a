"""Wire protocol constants: message types, header fields, limits and error codes.

Pure Python (no TensorFlow, no sockets). The full wire format is documented in
docs/protocol.md; this module is its single source of truth in code.
"""

from __future__ import annotations

import enum

PROTOCOL_VERSION = 1


class MessageType(enum.IntEnum):
    """The one-byte type that starts every message (after the ROUTER identity frame)."""

    # requests (client -> worker)
    OPEN = 0x01
    PUSH = 0x02
    RESET = 0x03
    CLOSE = 0x04
    GENERATE = 0x05
    STATS = 0x06
    PING = 0x07
    # replies (worker -> client)
    OUTPUT = 0x81
    ACK = 0x82
    ERROR = 0x83
    BUSY = 0x84
    EXPIRED = 0x85
    PONG = 0x86


class ErrorCode(enum.IntEnum):
    """Error codes carried by ERROR replies and by streamrnn exceptions."""

    MALFORMED = 1  # undecodable frames, bad msgpack, unknown type byte, missing fields
    UNSUPPORTED_VERSION = 2
    BAD_SHAPE = 3
    BAD_DTYPE = 4
    NON_FINITE = 5
    EMPTY_CHUNK = 6
    TOO_LARGE = 7
    UNKNOWN_STREAM = 8
    SEQ_GAP = 9
    SEQ_STALE = 10
    ENGINE_FULL = 11
    BAD_VALUE = 12
    NOT_SUPPORTED = 13
    EXPIRED = 14
    INTERNAL = 15
    TIMEOUT = 16
