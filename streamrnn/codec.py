"""Encode and strictly decode streamrnn messages: a msgpack header plus raw array frames.

A message (without the ROUTER identity frame) is::

    frame 0   one byte: MessageType
    frame 1   msgpack map: the header (see streamrnn.protocol for field names)
    frame 2+  raw little-endian C-order array buffers, described in header["arrays"] as
              {name: {"dtype": "float32", "shape": [T, D], "frame": k}} where k counts array
              frames from 0 (so array k is message frame 2 + k)

Arrays are sent and received without copies (``np.frombuffer`` over the received frame).
Decoding never unpickles and never trusts a length: every failure is a
:class:`~streamrnn.errors.ProtocolError` whose ``code`` says what was wrong.

Example::

    frames = encode(MessageType.PUSH, {"v": 1, "stream": "a", "seq": 0}, {"chunk": x})
    msg = decode_request(frames)      # Message(type=PUSH, header={...}, arrays={"chunk": x})
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from streamrnn.errors import ProtocolError
from streamrnn.protocol import (
    A_PROMPT,
    ALLOWED_DTYPES,
    D_DTYPE,
    D_FRAME,
    D_SHAPE,
    F_ARRAYS,
    F_REQUEST_ID,
    F_SEQ,
    F_STEPS,
    F_STREAM,
    F_VERSION,
    F_VERSIONS,
    GENERATE_SAMPLERS,
    MAX_CHUNK_STEPS,
    MAX_CONTAINER_LEN,
    MAX_FRAME_BYTES,
    MAX_FRAMES,
    MAX_GENERATE_STEPS,
    MAX_HEADER_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_NDIM,
    MAX_REQUEST_ID,
    MAX_SEQ,
    MAX_STR_BYTES,
    MAX_STREAM_ID_BYTES,
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

#: Anything zmq hands back or accepts: bytes, memoryview, numpy array, or zmq.Frame.
FrameLike = Any

# Replies may carry larger maps (STATS); requests are held to the tight limits.
_REPLY_CONTAINER_LEN = 1 << 20


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
_WIRE_DTYPES: dict[str, np.dtype] = {n: np.dtype(n).newbyteorder("<") for n in ALLOWED_DTYPES}


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
    out_header = dict(header)
    out_header.setdefault(F_VERSION, PROTOCOL_VERSION)
    buffers: list[np.ndarray] = []
    if arrays:
        descriptors = {}
        for index, (name, array) in enumerate(arrays.items()):
            wire = _wire_array(array)
            descriptors[name] = {D_DTYPE: _WIRE_NAMES[wire.dtype], D_SHAPE: list(wire.shape),
                                 D_FRAME: index}
            buffers.append(wire)
        out_header[F_ARRAYS] = descriptors
    return [bytes((int(msg_type),)), msgpack.packb(out_header, use_bin_type=True), *buffers]


# ---------------------------------------------------------------------------------------
# decoding


def _buffer(frame: FrameLike) -> memoryview:
    view = memoryview(getattr(frame, "buffer", frame))
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _is_int(value: object) -> bool:
    return type(value) is int


def _context(header: Mapping[str, Any]) -> dict[str, Any]:
    """The well-typed matching fields of a (possibly bad) header, to echo in an ERROR."""
    context: dict[str, Any] = {}
    rid = header.get(F_REQUEST_ID)
    if _is_int(rid) and 0 <= rid <= MAX_REQUEST_ID:
        context[F_REQUEST_ID] = rid
    stream = header.get(F_STREAM)
    if type(stream) is str and 0 < len(stream.encode("utf-8", "replace")) <= MAX_STREAM_ID_BYTES:
        context[F_STREAM] = stream
    seq = header.get(F_SEQ)
    if _is_int(seq) and 0 <= seq <= MAX_SEQ:
        context[F_SEQ] = seq
    return context


def _check_fields(header: dict[str, Any], schema: Schema, name: str, ctx: dict) -> None:
    for key, (types, required) in schema.items():
        if key not in header:
            if required:
                raise ProtocolError(f"{name} header is missing field {key!r}", context=ctx)
            continue
        value = header[key]
        # bool is an int subclass in Python but a distinct msgpack type: never accept it
        if type(value) not in types:
            expected = "/".join("nil" if t is type(None) else t.__name__ for t in types)
            raise ProtocolError(
                f"{name} header field {key!r} must be {expected}, got {type(value).__name__}",
                context=ctx,
            )


def _check_ranges(msg_type: MessageType, header: dict[str, Any], schema: Schema,
                  ctx: dict) -> None:
    """Value checks of the fields ``schema`` declares (their types are already checked);
    undeclared fields are ignored, whatever their type, as the protocol promises."""
    header = {k: v for k, v in header.items() if k in schema}
    rid = header.get(F_REQUEST_ID)
    if rid is not None and not 0 <= rid <= MAX_REQUEST_ID:
        raise ProtocolError(f"'rid' must be in [0, 2**64), got {rid}", ErrorCode.BAD_VALUE, ctx)
    stream = header.get(F_STREAM)
    if stream is not None:
        size = len(stream.encode("utf-8", "surrogatepass"))
        if not 0 < size <= MAX_STREAM_ID_BYTES:
            raise ProtocolError(
                f"'stream' must be 1..{MAX_STREAM_ID_BYTES} UTF-8 bytes, got {size}",
                ErrorCode.BAD_VALUE, ctx,
            )
    seq = header.get(F_SEQ)
    if seq is not None and not 0 <= seq <= MAX_SEQ:
        raise ProtocolError(f"'seq' must be in [0, 2**63), got {seq}", ErrorCode.BAD_VALUE, ctx)
    if msg_type == MessageType.PING:
        versions = header.get(F_VERSIONS, [])
        if len(versions) > 64 or not all(_is_int(v) for v in versions):
            raise ProtocolError("'versions' must be a list of at most 64 ints",
                                ErrorCode.BAD_VALUE, ctx)
    if msg_type == MessageType.GENERATE:
        _check_generate(header, ctx)


def _check_generate(header: dict[str, Any], ctx: dict) -> None:
    steps = header[F_STEPS]
    if not 1 <= steps <= MAX_GENERATE_STEPS:
        raise ProtocolError(f"'steps' must be in 1..{MAX_GENERATE_STEPS}, got {steps}",
                            ErrorCode.BAD_VALUE, ctx)
    sample = header.get("sample", "greedy")
    if sample not in GENERATE_SAMPLERS:
        raise ProtocolError(f"'sample' must be one of {sorted(GENERATE_SAMPLERS)}",
                            ErrorCode.BAD_VALUE, ctx)
    temperature = header.get("temperature", 1.0)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ProtocolError("'temperature' must be a finite number > 0", ErrorCode.BAD_VALUE, ctx)
    top_k = header.get("top_k")
    if top_k is not None and top_k < 1:
        raise ProtocolError("'top_k' must be >= 1 or nil", ErrorCode.BAD_VALUE, ctx)


def _decode_arrays(
    header: dict[str, Any], array_frames: Sequence[FrameLike],
    required: Mapping[str, tuple[int, ...]], name: str, ctx: dict,
) -> dict[str, np.ndarray]:
    descriptors = header.get(F_ARRAYS, {})
    if type(descriptors) is not dict:
        raise ProtocolError(f"'{F_ARRAYS}' must be a map", context=ctx)
    if len(descriptors) != len(array_frames):
        raise ProtocolError(
            f"{len(array_frames)} array frame(s) but {len(descriptors)} array descriptor(s)",
            context=ctx,
        )
    arrays: dict[str, np.ndarray] = {}
    used_frames: set[int] = set()
    for array_name, desc in descriptors.items():
        where = f"array {array_name!r}"
        if type(desc) is not dict:
            raise ProtocolError(f"{where}: descriptor must be a map", context=ctx)
        dtype, shape, index = desc.get(D_DTYPE), desc.get(D_SHAPE), desc.get(D_FRAME)
        if type(dtype) is not str:
            raise ProtocolError(f"{where}: 'dtype' must be a string", ErrorCode.BAD_DTYPE, ctx)
        if dtype not in ALLOWED_DTYPES:
            raise ProtocolError(
                f"{where}: dtype {dtype!r} not allowed; allowed: {sorted(ALLOWED_DTYPES)}",
                ErrorCode.BAD_DTYPE, ctx,
            )
        if (type(shape) is not list or len(shape) > MAX_NDIM
                or not all(_is_int(d) and 0 <= d <= MAX_FRAME_BYTES for d in shape)):
            raise ProtocolError(
                f"{where}: 'shape' must be a list of at most {MAX_NDIM} non-negative ints",
                ErrorCode.BAD_SHAPE, ctx,
            )
        if not _is_int(index) or not 0 <= index < len(array_frames) or index in used_frames:
            raise ProtocolError(
                f"{where}: 'frame' must be a distinct int in [0, {len(array_frames)})",
                context=ctx,
            )
        used_frames.add(index)
        np_dtype = _WIRE_DTYPES[dtype]
        buf = _buffer(array_frames[index])
        expected = math.prod(shape) * np_dtype.itemsize
        if buf.nbytes != expected:
            raise ProtocolError(
                f"{where}: shape {shape} of {dtype} needs {expected} bytes, frame has "
                f"{buf.nbytes}",
                ErrorCode.BAD_SHAPE, ctx,
            )
        array = np.frombuffer(buf, dtype=np_dtype).reshape(shape)
        if not np_dtype.isnative:  # big-endian host
            array = array.astype(np_dtype.newbyteorder("="))
        arrays[array_name] = array
    for array_name, ndims in required.items():
        if array_name not in arrays:
            raise ProtocolError(f"{name} needs array {array_name!r}", context=ctx)
        if arrays[array_name].ndim not in ndims:
            raise ProtocolError(
                f"array {array_name!r} must have {' or '.join(map(str, ndims))} dims, got "
                f"shape {list(arrays[array_name].shape)}",
                ErrorCode.BAD_SHAPE, ctx,
            )
    extra = set(arrays) - set(required)
    if extra:
        raise ProtocolError(f"{name} takes no array(s) {sorted(extra)}", context=ctx)
    return arrays


def _decode(
    frames: Sequence[FrameLike], allowed_types: frozenset[MessageType],
    schemas: Mapping[MessageType, Schema],
    array_specs: Mapping[MessageType, Mapping[str, tuple[int, ...]]],
    container_len: int,
) -> Message:
    if len(frames) < 2:
        raise ProtocolError(f"a message has at least 2 frames (type, header), got {len(frames)}")
    if len(frames) > MAX_FRAMES:
        raise ProtocolError(f"a message has at most {MAX_FRAMES} frames, got {len(frames)}",
                            ErrorCode.TOO_LARGE)
    views = [_buffer(f) for f in frames]
    total = 0
    for view in views:
        if view.nbytes > MAX_FRAME_BYTES:
            raise ProtocolError(f"frame of {view.nbytes} bytes exceeds {MAX_FRAME_BYTES}",
                                ErrorCode.TOO_LARGE)
        total += view.nbytes
    if total > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {total} bytes exceeds {MAX_MESSAGE_BYTES}",
                            ErrorCode.TOO_LARGE)
    if views[1].nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {views[1].nbytes} bytes exceeds {MAX_HEADER_BYTES}",
                            ErrorCode.TOO_LARGE)
    try:
        header = msgpack.unpackb(
            views[1], raw=False, strict_map_key=True, use_list=True,
            max_str_len=MAX_STR_BYTES, max_bin_len=0, max_ext_len=0,
            max_array_len=container_len, max_map_len=container_len,
        )
    except Exception as exc:  # msgpack raises a zoo of types (ValueError, ExtraData, ...)
        raise ProtocolError(f"header is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if type(header) is not dict:
        raise ProtocolError(f"header must be a msgpack map, got {type(header).__name__}")
    ctx = _context(header)
    if views[0].nbytes != 1:
        raise ProtocolError(f"type frame must be exactly 1 byte, got {views[0].nbytes}",
                            context=ctx)
    type_byte = views[0][0]
    if type_byte not in allowed_types:
        raise ProtocolError(f"unknown or unexpected message type 0x{type_byte:02x}", context=ctx)
    msg_type = MessageType(type_byte)
    name = msg_type.name
    _check_fields(header, schemas[msg_type], name, ctx)
    if msg_type != MessageType.PING and not is_supported_version(header[F_VERSION]):
        raise ProtocolError(
            f"protocol version {header[F_VERSION]} not supported (supported: "
            f"{list(SUPPORTED_VERSIONS)}); send PING "
            "with 'versions' to negotiate",
            ErrorCode.UNSUPPORTED_VERSION, ctx,
        )
    _check_ranges(msg_type, header, schemas[msg_type], ctx)
    arrays = _decode_arrays(header, frames[2:], array_specs.get(msg_type, {}), name, ctx)
    return Message(msg_type, header, arrays)


def decode_request(frames: Sequence[FrameLike]) -> Message:
    """Decode a client request (frames without the identity). Raises ProtocolError."""
    msg = _decode(frames, REQUEST_TYPES, REQUEST_SCHEMAS, REQUEST_ARRAYS, MAX_CONTAINER_LEN)
    array = msg.arrays.get("chunk", msg.arrays.get(A_PROMPT))
    if array is not None and array.shape[0] > MAX_CHUNK_STEPS:
        raise ProtocolError(
            f"chunk of {array.shape[0]} steps exceeds {MAX_CHUNK_STEPS}; split it",
            ErrorCode.TOO_LARGE, _context(msg.header),
        )
    return msg


def decode_reply(frames: Sequence[FrameLike]) -> Message:
    """Decode a worker reply (frames without any identity). Raises ProtocolError."""
    return _decode(frames, REPLY_TYPES, REPLY_SCHEMAS, REPLY_ARRAYS, _REPLY_CONTAINER_LEN)
