"""Encode and strictly decode streamrnn messages: a msgpack header plus raw array frames.

A message (without the ROUTER identity frame) is::

    frame 0   one byte: MessageType
    frame 1   msgpack map: the header (see streamrnn.protocol for field names)
    frame 2+  raw little-endian C-order array buffers, described in header["arrays"] as
              {name: {"dtype": "float32", "shape": [T, D], "frame": k}} where k counts array
              frames from 0 (so array k is message frame 2 + k)

Arrays are sent and received without copies (``np.frombuffer`` over the received frame).

A BATCH / BATCH_REPLY envelope (:func:`encode_batch`, :func:`decode_batch`) carries many
such messages in three frames: the type byte, one header listing every part's type, header
and array regions, and one payload frame holding all their arrays (docs/protocol.md,
section 4a). Each part is checked exactly like a message of its own.
Decoding never unpickles and never trusts a length: every failure is a
:class:`~streamrnn.errors.ProtocolError` whose ``code`` says what was wrong.

Example::

    frames = encode(MessageType.PUSH, {"v": 1, "stream": "a", "seq": 0}, {"chunk": x})
    msg = decode_request(frames)      # Message(type=PUSH, header={...}, arrays={"chunk": x})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from streamrnn.errors import ProtocolError
from streamrnn.protocol import (
    A_CHUNK,
    A_PROMPT,
    ALLOWED_DTYPES,
    BATCH_PART_TYPES,
    BATCH_REPLY_PART_TYPES,
    D_DTYPE,
    D_FRAME,
    D_SHAPE,
    F_ARRAYS,
    F_PARTS,
    F_VERSION,
    MAX_ARRAYS,
    MAX_BATCH_HEADER_BYTES,
    MAX_BATCH_PARTS,
    MAX_CHUNK_STEPS,
    MAX_CONTAINER_LEN,
    MAX_FRAME_BYTES,
    MAX_FRAMES,
    MAX_HEADER_BYTES,
    MAX_NDIM,
    PROTOCOL_VERSION,
    REPLY_ARRAYS,
    REPLY_SCHEMAS,
    REPLY_TYPES,
    REQUEST_ARRAYS,
    REQUEST_SCHEMAS,
    REQUEST_TYPES,
    SUPPORTED_VERSIONS,
    ErrorCode,
    MessageType,
    Schema,
    is_supported_version,
)
from streamrnn.wirecheck import (
    FrameLike,
    as_view,
    check_fields,
    check_frames,
    check_ranges,
    decode_arrays,
    echo_context,
    is_int,
    read_type_byte,
    salvage_context,
    unpack_header,
)

__all__ = [
    "FrameLike",
    "Message",
    "Part",
    "batches_of",
    "decode_batch",
    "decode_reply",
    "decode_request",
    "encode",
    "encode_batch",
    "is_batch",
]

# Replies may carry larger maps (STATS); requests are held to the tight limits.
_REPLY_CONTAINER_LEN = 1 << 20
# enum lookups are slow on the per-part path: plain dicts and constants instead
_TYPES: dict[int, MessageType] = {int(t): t for t in MessageType}
_NAMES: dict[MessageType, str] = {t: t.name for t in MessageType}
_PING = MessageType.PING
_NONE: Mapping[str, tuple[int, ...]] = {}  # no arrays required (never written to)


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded message: its type, its header map and its arrays (read-only views)."""

    type: MessageType
    header: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# encoding


# numpy's dtype.name is slow (it is rebuilt on every access): the hot path looks dtypes up
# in these tables instead. Keys are dtype objects; a big-endian dtype is not among them.
_WIRE_NAMES: dict[np.dtype, str] = {np.dtype(n).newbyteorder("<"): n for n in ALLOWED_DTYPES}


def _wire_array(array: np.ndarray) -> np.ndarray:
    """``array`` as a C-contiguous little-endian array with an allowed dtype."""
    array = np.asarray(array)
    if array.dtype in _WIRE_NAMES and array.flags.c_contiguous and array.ndim <= MAX_NDIM:
        return array  # the common case: nothing to convert
    if array.dtype.name not in ALLOWED_DTYPES:
        raise ProtocolError(
            f"dtype {array.dtype} cannot be sent; allowed: {sorted(ALLOWED_DTYPES)}",
            ErrorCode.BAD_DTYPE,
        )
    if array.ndim > MAX_NDIM:
        raise ProtocolError(f"arrays have at most {MAX_NDIM} dims, got {array.ndim}",
                            ErrorCode.BAD_SHAPE)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array)


def _with_arrays(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None
                 ) -> tuple[dict[str, Any], list[np.ndarray]]:
    """``header`` with ``"v"`` (if absent) and the ``"arrays"`` descriptors, and the array
    buffers in frame order (descriptor ``"frame"`` k is the k-th buffer)."""
    out_header = dict(header)
    if F_VERSION not in out_header:
        out_header[F_VERSION] = PROTOCOL_VERSION
    if not arrays:
        return out_header, []
    buffers: list[np.ndarray] = []
    descriptors = {}
    for index, (name, array) in enumerate(arrays.items()):
        wire = _wire_array(array)
        descriptors[name] = {D_DTYPE: _WIRE_NAMES[wire.dtype], D_SHAPE: list(wire.shape),
                             D_FRAME: index}
        buffers.append(wire)
    out_header[F_ARRAYS] = descriptors
    return out_header, buffers


def encode(
    msg_type: MessageType | int,
    header: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray] | None = None,
) -> list[bytes | np.ndarray]:
    """Frames ``[type byte, msgpack header, array buffers...]`` ready for ``send_multipart``.

    ``header`` gets ``"v"`` (if absent) and ``"arrays"`` descriptors added. Array frames are
    the (contiguous) numpy arrays themselves, so ``send_multipart(..., copy=False)`` sends
    them without copying.
    """
    out_header, buffers = _with_arrays(header, arrays)
    return [bytes((int(msg_type),)), msgpack.packb(out_header, use_bin_type=True), *buffers]


_ALIGN = 16  # byte alignment of each array in an envelope's payload
_ZEROS = [bytes(n) for n in range(_ALIGN)]  # the gap after an array of nbytes: -nbytes % 16

#: One message inside an envelope: (type, header, arrays or None).
Part = tuple[MessageType, Mapping[str, Any], Mapping[str, np.ndarray] | None]


def encode_batch(envelope: MessageType, parts: Sequence[Part]) -> list[bytes | bytearray]:
    """Frames of a BATCH (requests) or BATCH_REPLY (replies) envelope carrying ``parts``.

    Three frames: ``[type byte, msgpack {"v", "parts": [[type, header, regions], ...]},
    payload]``. Every part's arrays are copied into the one payload frame (one frame is
    much cheaper to send and receive than one per array; the gaps that align each array to
    16 bytes are zeros); ``regions`` lists each array's ``[offset, nbytes]`` in it, and the
    part's descriptors number its arrays as usual. Raises ProtocolError (BAD_DTYPE /
    BAD_SHAPE) for an array that cannot travel; encode such a part alone to fail only it.
    """
    entries = []
    pieces: list[Any] = []  # the arrays and the zero gaps between them, in payload order
    size = 0
    for msg_type, part_header, arrays in parts:
        out_header, part_buffers = _with_arrays(part_header, arrays)
        regions = []
        for buffer in part_buffers:
            nbytes = buffer.nbytes
            regions.append([size, nbytes])
            gap = -nbytes % _ALIGN
            pieces.append(buffer)
            if gap:
                pieces.append(_ZEROS[gap])
            size += nbytes + gap
        entries.append([int(msg_type), out_header, regions])
    out = {F_VERSION: PROTOCOL_VERSION, F_PARTS: entries}
    payload = bytearray().join(pieces)  # writable, as the np.uint8 buffer it replaces
    return [bytes((int(envelope),)), msgpack.packb(out, use_bin_type=True), payload]


def batches_of(parts: Sequence[Part], max_parts: int = MAX_BATCH_PARTS,
               max_bytes: int = MAX_FRAME_BYTES // 2) -> list[list[Part]]:
    """``parts`` split in order into groups that each fit one envelope (at most
    ``max_parts`` parts and, unless a single part is bigger, ``max_bytes`` of arrays)."""
    groups: list[list[Part]] = []
    current: list[Part] = []
    size = 0
    for part in parts:
        arrays = part[2]
        nbytes = sum(a.nbytes if type(a) is np.ndarray else np.asarray(a).nbytes
                     for a in arrays.values()) if arrays else 0
        if current and (len(current) >= max_parts or size + nbytes > max_bytes):
            groups.append(current)
            current, size = [], 0
        current.append(part)
        size += nbytes
    if current:
        groups.append(current)
    return groups


# ---------------------------------------------------------------------------------------
# decoding


def _check_message(
    type_byte: int, header: dict[str, Any], array_frames: Sequence[FrameLike],
    allowed_types: frozenset[MessageType], schemas: Mapping[MessageType, Schema],
    array_specs: Mapping[MessageType, Mapping[str, tuple[int, ...]]],
) -> Message:
    """Validate one decoded message (standalone or a part of an envelope)."""
    try:
        # the checks raise without context; the matching fields are read only on failure
        if type_byte not in allowed_types:
            raise ProtocolError(f"unknown or unexpected message type 0x{type_byte:02x}")
        msg_type = _TYPES[type_byte]  # MessageType(type_byte), without the enum call
        name = _NAMES[msg_type]
        schema = schemas[msg_type]
        check_fields(header, schema, name, None)
        if msg_type is not _PING and not is_supported_version(header[F_VERSION]):
            raise ProtocolError(
                f"protocol version {header[F_VERSION]} not supported (supported: "
                f"{list(SUPPORTED_VERSIONS)}); send PING with 'versions' to negotiate",
                ErrorCode.UNSUPPORTED_VERSION,
            )
        check_ranges(msg_type, header, schema)
        arrays = decode_arrays(header, array_frames, array_specs.get(msg_type, _NONE), name)
    except ProtocolError as exc:
        exc.context = echo_context(header)
        raise
    return Message(msg_type, header, arrays)


def _read_header(views: list[memoryview], max_frames: int, max_header: int,
                 container_len: int) -> dict[str, Any]:
    """The strictly decoded header after the frame checks; a failure of either still
    carries the rid (stream, seq) when the header frame is readable."""
    try:
        check_frames(views, max_frames, max_header)
        return unpack_header(views[1], container_len)
    except ProtocolError as exc:
        exc.context = salvage_context(views, max_header)
        raise


def _decode(
    frames: Sequence[FrameLike], allowed_types: frozenset[MessageType],
    schemas: Mapping[MessageType, Schema],
    array_specs: Mapping[MessageType, Mapping[str, tuple[int, ...]]],
    container_len: int,
) -> Message:
    views = [as_view(f) for f in frames]
    header = _read_header(views, MAX_FRAMES, MAX_HEADER_BYTES, container_len)
    type_byte = read_type_byte(views[0], echo_context(header))
    return _check_message(type_byte, header, frames[2:], allowed_types, schemas, array_specs)


def _check_chunk_steps(msg: Message) -> Message:
    array = msg.arrays.get(A_CHUNK, msg.arrays.get(A_PROMPT))
    if array is not None and array.shape[0] > MAX_CHUNK_STEPS:
        raise ProtocolError(
            f"chunk of {array.shape[0]} steps exceeds {MAX_CHUNK_STEPS}; split it",
            ErrorCode.TOO_LARGE, echo_context(msg.header),
        )
    return msg


_SINGLE_REQUESTS = REQUEST_TYPES - {MessageType.BATCH}
_SINGLE_REPLIES = REPLY_TYPES - {MessageType.BATCH_REPLY}


def decode_request(frames: Sequence[FrameLike], check_steps: bool = True) -> Message:
    """Decode a client request (frames without the identity). Raises ProtocolError.

    A BATCH envelope is not a request of its own: check :func:`is_batch` first and
    decode it with :func:`decode_batch`. ``check_steps=False`` leaves a chunk or prompt of
    more than ``MAX_CHUNK_STEPS`` timesteps to the caller (a worker answers it after the
    stream's sequence check, with ``expected``)."""
    msg = _decode(frames, _SINGLE_REQUESTS, REQUEST_SCHEMAS, REQUEST_ARRAYS, MAX_CONTAINER_LEN)
    return _check_chunk_steps(msg) if check_steps else msg


def decode_reply(frames: Sequence[FrameLike]) -> Message:
    """Decode a worker reply (frames without any identity). Raises ProtocolError.

    A BATCH_REPLY envelope: check :func:`is_batch` first, decode with :func:`decode_batch`."""
    return _decode(frames, _SINGLE_REPLIES, REPLY_SCHEMAS, REPLY_ARRAYS, _REPLY_CONTAINER_LEN)


def is_batch(frames: Sequence[FrameLike]) -> bool:
    """True if ``frames`` (without the identity) start with a BATCH or BATCH_REPLY byte."""
    if not frames:
        return False
    view = as_view(frames[0])
    return view.nbytes == 1 and view[0] in (MessageType.BATCH, MessageType.BATCH_REPLY)


def decode_batch(frames: Sequence[FrameLike], replies: bool = False, check_steps: bool = True
                 ) -> tuple[dict[str, Any], list[Message | ProtocolError]]:
    """Decode a BATCH (``replies=False``) or BATCH_REPLY envelope.

    Returns the envelope header and, per part in order, its :class:`Message` (arrays are
    read-only views into the payload frame) or the :class:`~streamrnn.errors.ProtocolError`
    that part alone failed with (its ``context`` holds the part's rid, stream and seq when
    they are readable). Raises ProtocolError when the envelope itself is unusable (then no
    part can be trusted; its ``context`` holds the envelope header's own rid, when
    readable). ``check_steps``: as for :func:`decode_request`.
    """
    envelope = MessageType.BATCH_REPLY if replies else MessageType.BATCH
    views = [as_view(f) for f in frames]
    container_len = _REPLY_CONTAINER_LEN if replies else MAX_CONTAINER_LEN
    header = _read_header(views, 3, MAX_BATCH_HEADER_BYTES, container_len)
    ctx = echo_context(header)
    if read_type_byte(views[0], ctx) != envelope:
        raise ProtocolError(f"not a {envelope.name} envelope", context=ctx)
    if len(views) != 3:
        raise ProtocolError(f"a {envelope.name} has 3 frames (type, header, payload), got "
                            f"{len(views)}", context=ctx)
    schemas = REPLY_SCHEMAS if replies else REQUEST_SCHEMAS
    check_fields(header, schemas[envelope], envelope.name, ctx)
    if not is_supported_version(header[F_VERSION]):
        raise ProtocolError(f"protocol version {header[F_VERSION]} not supported (supported: "
                            f"{list(SUPPORTED_VERSIONS)})", ErrorCode.UNSUPPORTED_VERSION, ctx)
    entries = header[F_PARTS]
    if not 1 <= len(entries) <= MAX_BATCH_PARTS:
        raise ProtocolError(f"{envelope.name} carries 1..{MAX_BATCH_PARTS} parts, got "
                            f"{len(entries)}", ErrorCode.TOO_LARGE if entries else
                            ErrorCode.MALFORMED, ctx)
    payload = views[2]
    for entry in entries:
        if (type(entry) is not list or len(entry) != 3 or not is_int(entry[0])
                or type(entry[1]) is not dict or not _regions_ok(entry[2], payload.nbytes)):
            raise ProtocolError(
                f"each part of a {envelope.name} is [type, header map, at most {MAX_ARRAYS} "
                f"[offset, nbytes] regions inside the {payload.nbytes}-byte payload]",
                context=ctx)
    if replies:
        allowed, specs = BATCH_REPLY_PART_TYPES, REPLY_ARRAYS
    else:
        allowed, specs = BATCH_PART_TYPES, REQUEST_ARRAYS
    parts: list[Message | ProtocolError] = []
    for type_byte, part_header, regions in entries:
        try:
            msg = _check_message(type_byte, part_header,
                                 [payload[o:o + n] for o, n in regions], allowed, schemas, specs)
            parts.append(msg if replies or not check_steps else _check_chunk_steps(msg))
        except ProtocolError as exc:
            parts.append(exc)
    return header, parts


def _regions_ok(regions: object, payload_bytes: int) -> bool:
    """True for a list of at most MAX_ARRAYS ``[offset, nbytes]`` inside the payload."""
    if type(regions) is not list or len(regions) > MAX_ARRAYS:
        return False
    for region in regions:
        if type(region) is not list or len(region) != 2:
            return False
        offset, nbytes = region
        if not (is_int(offset) and is_int(nbytes) and offset >= 0 and nbytes >= 0
                and offset + nbytes <= payload_bytes):
            return False
    return True
