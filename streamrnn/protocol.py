"""Wire protocol constants: message types, header fields, limits and error codes.

Pure Python (no TensorFlow, no sockets). The full wire format is documented in
docs/protocol.md; this module is its single source of truth in code: the codec
(:mod:`streamrnn.codec`) validates every header against :data:`REQUEST_SCHEMAS` /
:data:`REPLY_SCHEMAS` and the limits below.

A message is ``[type byte] [msgpack header] [array frame] ...`` (a ROUTER socket sees one
more frame in front: the peer identity). Example header of a PUSH::

    {"v": 1, "rid": 7, "stream": "sensor-7", "seq": 0,
     "arrays": {"chunk": {"dtype": "float32", "shape": [32, 16], "frame": 0}}}
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

__all__ = [
    "ALLOWED_DTYPES",
    "A_CHUNK",
    "A_OUTPUT",
    "A_PROMPT",
    "BATCH_PART_TYPES",
    "BATCH_REPLY_PART_TYPES",
    "CLIENT_KEY_CHARS",
    "D_DTYPE",
    "D_FRAME",
    "D_SHAPE",
    "ErrorCode",
    "F_ARRAYS",
    "F_CLIENT_KEY",
    "F_CODE",
    "F_DURABLE_SEQ",
    "F_EXPECTED",
    "F_MESSAGE",
    "F_NEXT_SEQ",
    "F_PARTS",
    "F_PIN",
    "F_REQUEST_ID",
    "F_RETRY_AFTER_MS",
    "F_SEQ",
    "F_STATS",
    "F_STEPS",
    "F_STREAM",
    "F_TOKEN",
    "F_VERSION",
    "F_VERSIONS",
    "FieldSpec",
    "GENERATE_OPTIONS",
    "GENERATE_SAMPLERS",
    "MAX_ARRAYS",
    "MAX_BATCH_HEADER_BYTES",
    "MAX_BATCH_PARTS",
    "MAX_CHUNK_STEPS",
    "MAX_CONTAINER_LEN",
    "MAX_FRAMES",
    "MAX_FRAME_BYTES",
    "MAX_GENERATE_STEPS",
    "MAX_HEADER_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_NDIM",
    "MAX_REQUEST_ID",
    "MAX_SEQ",
    "MAX_STREAM_ID_BYTES",
    "MAX_STR_BYTES",
    "MAX_TOKEN_BYTES",
    "MessageType",
    "PROTOCOL_VERSION",
    "REPLY_ARRAYS",
    "REPLY_CACHE_SIZE",
    "REPLY_SCHEMAS",
    "REPLY_TYPES",
    "REQUEST_ARRAYS",
    "REQUEST_SCHEMAS",
    "REQUEST_TYPES",
    "SEQUENCED_TYPES",
    "SUPPORTED_VERSIONS",
    "Schema",
    "error_code_name",
    "is_supported_version",
    "message_type_name",
    "negotiate_version",
]

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)


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
    BATCH = 0x08  # an envelope of several requests (see BATCH_PART_TYPES)
    # replies (worker -> client)
    OUTPUT = 0x81
    ACK = 0x82
    ERROR = 0x83
    BUSY = 0x84
    EXPIRED = 0x85
    PONG = 0x86
    BATCH_REPLY = 0x87  # an envelope of several replies


REQUEST_TYPES = frozenset(t for t in MessageType if t < 0x80)
REPLY_TYPES = frozenset(t for t in MessageType if t >= 0x80)
#: Request types that may travel inside a BATCH envelope (PING and STATS go alone).
BATCH_PART_TYPES = frozenset({MessageType.OPEN, MessageType.PUSH, MessageType.RESET,
                              MessageType.CLOSE, MessageType.GENERATE})
#: Reply types that may travel inside a BATCH_REPLY envelope.
BATCH_REPLY_PART_TYPES = frozenset({MessageType.OUTPUT, MessageType.ACK, MessageType.ERROR,
                                    MessageType.BUSY, MessageType.EXPIRED})
#: Requests that carry a per-stream sequence number and are applied at most once.
SEQUENCED_TYPES = frozenset({MessageType.PUSH, MessageType.RESET, MessageType.CLOSE,
                             MessageType.GENERATE})


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
    UNAVAILABLE = 17  # a router has no live worker that can take the stream
    #: this worker does not hold the stream's lease (another worker holds it, or this
    #: worker's own lease lapsed); a router re-resolves the holder and forwards again
    NOT_HOLDER = 18
    #: the stream belongs to another client identity (its owner: the CURVE key or the
    #: stream token that opened it)
    FORBIDDEN = 19
    #: a per-identity limit was reached (open streams of one client identity)
    QUOTA_EXCEEDED = 20


# ---------------------------------------------------------------------------------------
# Header field names (msgpack map keys, UTF-8 strings).

F_VERSION = "v"  # int: protocol version of this message
F_REQUEST_ID = "rid"  # int: client-chosen request id, echoed in every reply
F_STREAM = "stream"  # str: stream id
F_SEQ = "seq"  # int: per-stream sequence number of a sequenced request
F_ARRAYS = "arrays"  # map name -> array descriptor
F_NEXT_SEQ = "next_seq"  # int: the next sequence number the worker expects for a stream
F_CODE = "code"  # int: ErrorCode of an ERROR reply
F_MESSAGE = "message"  # str: human-readable error text
F_EXPECTED = "expected"  # int: next expected seq, in ERROR/EXPIRED replies about a stream
F_RETRY_AFTER_MS = "retry_after_ms"  # int: BUSY hint
F_VERSIONS = "versions"  # list[int]: versions a PING offers / a PONG supports
F_STATS = "stats"  # map: STATS reply payload
F_STEPS = "steps"  # int: number of timesteps in an OUTPUT / GENERATE request
#: int: in OUTPUT/ACK from a checkpointing worker: every request of the stream with a lower
#: seq is in a checkpoint on disk (a client may drop those from its resend buffer)
F_DURABLE_SEQ = "durable_seq"
#: list of [type, header, [[offset, nbytes], ...]]: the parts of a BATCH / BATCH_REPLY
#: envelope, each with the regions of the payload frame that hold its arrays
F_PARTS = "parts"

# array descriptor keys
D_DTYPE = "dtype"
D_SHAPE = "shape"
D_FRAME = "frame"

# array names
A_CHUNK = "chunk"  # PUSH input: float [T, D] or int token ids [T]
F_PIN = "pin_version"  # OPEN: pin the stream to a weights version (None: unpin)
#: str: a stream's owner token (when CURVE is off): set by the request that creates the
#: stream, required on every later request of it (compared in constant time)
F_TOKEN = "token"
#: str: the end client's CURVE public key (z85, :data:`CLIENT_KEY_CHARS` characters), set by
#: a router on every request it forwards (as its client socket authenticated it; absent
#: without CURVE there) and dropped from what a client sent. A worker believes it only from
#: a peer whose own CURVE key it trusts as a router's (``--curve-routers``); from anyone else
#: the field is ignored and the sender's own key is the identity (serving.owners)
F_CLIENT_KEY = "client_key"
A_PROMPT = "prompt"  # GENERATE input
A_OUTPUT = "output"  # OUTPUT payload: float32 [T, output_dim] (or generated sequence)

# ---------------------------------------------------------------------------------------
# Limits. The worker sets ZMQ_MAXMSGSIZE to MAX_FRAME_BYTES (a peer that sends a bigger
# frame is disconnected by ZeroMQ itself, so no reply is possible); everything else is
# checked by the codec and answered with ERROR TOO_LARGE.

MAX_FRAME_BYTES = 32 * 1024 * 1024
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_ARRAYS = 4  # array frames per message
MAX_FRAMES = 2 + MAX_ARRAYS  # type + header + arrays (identity not counted)
MAX_BATCH_PARTS = 256  # messages in one BATCH / BATCH_REPLY envelope
MAX_BATCH_HEADER_BYTES = 1024 * 1024  # the envelope's header (all parts' headers)
MAX_NDIM = 4
MAX_STREAM_ID_BYTES = 256
MAX_CHUNK_STEPS = 65536
MAX_GENERATE_STEPS = 65536
MAX_SEQ = 2**63 - 1
MAX_REQUEST_ID = 2**64 - 1
MAX_STR_BYTES = 4096  # any other string in a header
MAX_TOKEN_BYTES = 256  # a stream's owner token (F_TOKEN): 1..256 UTF-8 bytes
CLIENT_KEY_CHARS = 40  # a vouched client key (F_CLIENT_KEY): a z85 CURVE public key
MAX_CONTAINER_LEN = 1024  # any msgpack array/map in a header
#: Replies kept per stream for answering duplicates; a client's window must not exceed it.
REPLY_CACHE_SIZE = 32

#: dtype names allowed on the wire (always little-endian, C order).
ALLOWED_DTYPES = frozenset({
    "float16", "float32", "float64",
    "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32",
    "bool",
})

# ---------------------------------------------------------------------------------------
# Header schemas: field -> (accepted python types after msgpack decoding, required).
# ``int`` never accepts ``bool``. Unknown fields are ignored (forward compatibility).

FieldSpec = tuple[tuple[type, ...], bool]
Schema = dict[str, FieldSpec]

_INT = (int,)
_STR = (str,)
_BASE: Schema = {F_VERSION: (_INT, True), F_REQUEST_ID: (_INT, False)}
_STREAM_REQ: Schema = {**_BASE, F_STREAM: (_STR, True), F_SEQ: (_INT, True),
                       F_TOKEN: (_STR, False), F_CLIENT_KEY: (_STR, False)}

REQUEST_SCHEMAS: dict[MessageType, Schema] = {
    MessageType.OPEN: {**_BASE, F_STREAM: (_STR, True), F_PIN: ((int, type(None)), False),
                       F_TOKEN: (_STR, False), F_CLIENT_KEY: (_STR, False)},
    MessageType.PUSH: _STREAM_REQ,
    MessageType.RESET: _STREAM_REQ,
    MessageType.CLOSE: _STREAM_REQ,
    MessageType.GENERATE: {
        **_STREAM_REQ,
        F_STEPS: (_INT, True),
        "sample": (_STR, False),
        "temperature": ((float, int), False),
        "top_k": ((int, type(None)), False),
        "seed": ((int, type(None)), False),
        "end_token": ((int, type(None)), False),
    },
    MessageType.STATS: dict(_BASE),
    MessageType.PING: {F_VERSION: (_INT, True), F_REQUEST_ID: (_INT, False),
                       F_VERSIONS: ((list,), False)},
    MessageType.BATCH: {**_BASE, F_PARTS: ((list,), True)},
}

#: Arrays each request must carry (name -> allowed ndim values).
REQUEST_ARRAYS: dict[MessageType, dict[str, tuple[int, ...]]] = {
    MessageType.PUSH: {A_CHUNK: (1, 2)},
    MessageType.GENERATE: {A_PROMPT: (1, 2)},
}

_REPLY_BASE: Schema = {F_VERSION: (_INT, True), F_REQUEST_ID: (_INT, False),
                       F_STREAM: (_STR, False), F_SEQ: (_INT, False)}
REPLY_SCHEMAS: dict[MessageType, Schema] = {
    MessageType.OUTPUT: {**_REPLY_BASE, F_STEPS: (_INT, False), F_DURABLE_SEQ: (_INT, False)},
    MessageType.ACK: {**_REPLY_BASE, F_NEXT_SEQ: (_INT, False), F_DURABLE_SEQ: (_INT, False)},
    MessageType.ERROR: {**_REPLY_BASE, F_CODE: (_INT, True), F_MESSAGE: (_STR, True),
                        F_EXPECTED: (_INT, False)},
    MessageType.BUSY: {**_REPLY_BASE, F_RETRY_AFTER_MS: (_INT, False)},
    MessageType.EXPIRED: {**_REPLY_BASE, F_EXPECTED: (_INT, False)},
    MessageType.PONG: {**_REPLY_BASE, F_VERSIONS: ((list,), True)},
    MessageType.BATCH_REPLY: {F_VERSION: (_INT, True), F_PARTS: ((list,), True)},
}
REPLY_ARRAYS: dict[MessageType, dict[str, tuple[int, ...]]] = {
    MessageType.OUTPUT: {A_OUTPUT: (1, 2)},
}

GENERATE_SAMPLERS = frozenset({"greedy", "sample", "temperature", "top_k"})
#: Optional GENERATE fields passed on to ``engine.generate`` when present.
GENERATE_OPTIONS = ("sample", "temperature", "top_k", "seed", "end_token")


# ---------------------------------------------------------------------------------------
# Version negotiation


def is_supported_version(version: object) -> bool:
    """True if ``version`` is a protocol version this build speaks."""
    return type(version) is int and version in SUPPORTED_VERSIONS


def negotiate_version(offered: Iterable[object], supported: Iterable[int] = SUPPORTED_VERSIONS
                      ) -> int | None:
    """The highest version in both ``offered`` and ``supported``, or ``None``.

    Example: ``negotiate_version([1, 2], supported=(1,)) -> 1``.
    """
    common = {v for v in offered if type(v) is int} & set(supported)
    return max(common) if common else None


def message_type_name(value: int) -> str:
    """``"PUSH"`` for 0x02, ``"0x7f"`` for an unknown byte (for logs and errors)."""
    try:
        return MessageType(value).name
    except ValueError:
        return f"0x{value:02x}"


def error_code_name(value: int) -> str:
    try:
        return ErrorCode(value).name
    except ValueError:
        return str(value)
