"""Strict checks of received frames, headers and array descriptors (used by
:mod:`streamrnn.codec`). Each check raises :class:`~streamrnn.errors.ProtocolError` with the
code that says what was wrong; none trusts a length, none unpickles.

Example::

    views = [as_view(f) for f in frames]
    check_frames(views, MAX_FRAMES, MAX_HEADER_BYTES)
    header = unpack_header(views[1], MAX_CONTAINER_LEN)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np

from streamrnn.errors import ProtocolError
from streamrnn.protocol import (
    ALLOWED_DTYPES,
    CLIENT_KEY_CHARS,
    D_DTYPE,
    D_FRAME,
    D_SHAPE,
    F_ARRAYS,
    F_CLIENT_KEY,
    F_REQUEST_ID,
    F_SEQ,
    F_STEPS,
    F_STREAM,
    F_TOKEN,
    F_VERSIONS,
    GENERATE_SAMPLERS,
    MAX_FRAME_BYTES,
    MAX_GENERATE_STEPS,
    MAX_MESSAGE_BYTES,
    MAX_NDIM,
    MAX_REQUEST_ID,
    MAX_SEQ,
    MAX_STR_BYTES,
    MAX_STREAM_ID_BYTES,
    MAX_TOKEN_BYTES,
    ErrorCode,
    MessageType,
    Schema,
)

__all__ = [
    "WIRE_DTYPES",
    "as_view",
    "check_client_key",
    "check_fields",
    "check_frames",
    "check_generate",
    "check_ranges",
    "check_token",
    "decode_arrays",
    "dims_ok",
    "echo_context",
    "is_int",
    "read_type_byte",
    "salvage_context",
    "unpack_header",
]

#: Anything zmq hands back or accepts: bytes, memoryview, numpy array, or zmq.Frame.
FrameLike = Any

#: wire dtype name -> little-endian numpy dtype (numpy's dtype.name is slow to rebuild)
WIRE_DTYPES: dict[str, np.dtype] = {n: np.dtype(n).newbyteorder("<") for n in ALLOWED_DTYPES}
_SURELY_SHORT = MAX_STREAM_ID_BYTES // 4  # stream ids of at most this many code points fit
_PING, _GENERATE = MessageType.PING, MessageType.GENERATE  # (enum attribute lookups are slow)
_ABSENT = object()  # a header without an "arrays" map
_Z85 = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                 ".-:+=^!/*?&<>()[]{}@%$#")  # ZeroMQ's z85 alphabet (RFC 32)


def as_view(frame: FrameLike) -> memoryview:
    view = memoryview(getattr(frame, "buffer", frame))
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def is_int(value: object) -> bool:
    return type(value) is int


def dims_ok(shape: list) -> bool:
    for d in shape:
        if type(d) is not int or not 0 <= d <= MAX_FRAME_BYTES:
            return False
    return True


def echo_context(header: Mapping[str, Any]) -> dict[str, Any]:
    """The well-typed matching fields of a (possibly bad) header, to echo in an ERROR."""
    context: dict[str, Any] = {}
    rid = header.get(F_REQUEST_ID)
    if is_int(rid) and 0 <= rid <= MAX_REQUEST_ID:
        context[F_REQUEST_ID] = rid
    stream = header.get(F_STREAM)
    if type(stream) is str and 0 < len(stream.encode("utf-8", "replace")) <= MAX_STREAM_ID_BYTES:
        context[F_STREAM] = stream
    seq = header.get(F_SEQ)
    if is_int(seq) and 0 <= seq <= MAX_SEQ:
        context[F_SEQ] = seq
    return context


def check_fields(header: dict[str, Any], schema: Schema, name: str, ctx: dict | None
                  ) -> None:
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


def check_ranges(msg_type: MessageType, header: dict[str, Any], schema: Schema) -> None:
    """Value checks of the fields ``schema`` declares (their types are already checked);
    undeclared fields are ignored, whatever their type, as the protocol promises. Raises
    without context (the caller adds it)."""
    rid = header.get(F_REQUEST_ID) if F_REQUEST_ID in schema else None
    if rid is not None and not 0 <= rid <= MAX_REQUEST_ID:
        raise ProtocolError(f"'rid' must be in [0, 2**64), got {rid}", ErrorCode.BAD_VALUE)
    stream = header.get(F_STREAM) if F_STREAM in schema else None
    # a code point takes at most 4 UTF-8 bytes: short ids need no encoding to be measured
    if stream is not None and not 0 < len(stream) <= _SURELY_SHORT:
        size = len(stream.encode("utf-8", "surrogatepass"))
        if not 0 < size <= MAX_STREAM_ID_BYTES:
            raise ProtocolError(
                f"'stream' must be 1..{MAX_STREAM_ID_BYTES} UTF-8 bytes, got {size}",
                ErrorCode.BAD_VALUE,
            )
    seq = header.get(F_SEQ) if F_SEQ in schema else None
    if seq is not None and not 0 <= seq <= MAX_SEQ:
        raise ProtocolError(f"'seq' must be in [0, 2**63), got {seq}", ErrorCode.BAD_VALUE)
    if F_TOKEN in header and F_TOKEN in schema:
        check_token(header[F_TOKEN])
    if F_CLIENT_KEY in header and F_CLIENT_KEY in schema:
        check_client_key(header[F_CLIENT_KEY])
    if msg_type == _PING:
        versions = (header.get(F_VERSIONS) if F_VERSIONS in schema else None) or []
        if len(versions) > 64 or not all(is_int(v) for v in versions):
            raise ProtocolError("'versions' must be a list of at most 64 ints",
                                ErrorCode.BAD_VALUE)
    elif msg_type == _GENERATE:
        check_generate(header)


def check_token(token: str) -> None:
    """A stream's owner token (``token``): 1..MAX_TOKEN_BYTES UTF-8 bytes."""
    if not 0 < len(token) <= MAX_TOKEN_BYTES // 4:
        size = len(token.encode("utf-8", "surrogatepass"))
        if not 0 < size <= MAX_TOKEN_BYTES:
            raise ProtocolError(f"'token' must be 1..{MAX_TOKEN_BYTES} UTF-8 bytes, got {size}",
                                ErrorCode.BAD_VALUE)


def check_client_key(key: str) -> None:
    """A vouched client key (``client_key``): a z85 CURVE public key, 40 characters."""
    if len(key) != CLIENT_KEY_CHARS or not _Z85.issuperset(key):
        raise ProtocolError(f"'client_key' must be a z85 CURVE public key ({CLIENT_KEY_CHARS} "
                            f"characters)", ErrorCode.BAD_VALUE)


def check_generate(header: dict[str, Any]) -> None:
    steps = header[F_STEPS]
    if not 1 <= steps <= MAX_GENERATE_STEPS:
        raise ProtocolError(f"'steps' must be in 1..{MAX_GENERATE_STEPS}, got {steps}",
                            ErrorCode.BAD_VALUE)
    sample = header.get("sample", "greedy")
    if sample not in GENERATE_SAMPLERS:
        raise ProtocolError(f"'sample' must be one of {sorted(GENERATE_SAMPLERS)}",
                            ErrorCode.BAD_VALUE)
    temperature = header.get("temperature", 1.0)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ProtocolError("'temperature' must be a finite number > 0", ErrorCode.BAD_VALUE)
    top_k = header.get("top_k")
    if top_k is not None and top_k < 1:
        raise ProtocolError("'top_k' must be >= 1 or nil", ErrorCode.BAD_VALUE)


def decode_arrays(
    header: dict[str, Any], array_frames: Sequence[FrameLike],
    required: Mapping[str, tuple[int, ...]], name: str,
) -> dict[str, np.ndarray]:
    """The arrays ``header`` describes, as views over ``array_frames``. Raises without
    context (the caller adds it)."""
    descriptors = header.get(F_ARRAYS, _ABSENT)
    if descriptors is _ABSENT:
        if not array_frames and not required:
            return {}  # the common case of a message without arrays
        descriptors = {}
    elif type(descriptors) is not dict:
        raise ProtocolError(f"'{F_ARRAYS}' must be a map")
    if len(descriptors) != len(array_frames):
        raise ProtocolError(
            f"{len(array_frames)} array frame(s) but {len(descriptors)} array descriptor(s)")
    arrays: dict[str, np.ndarray] = {}
    used_frames: set[int] = set()
    for array_name, desc in descriptors.items():
        arrays[array_name] = _decode_array(array_name, desc, array_frames, used_frames)
    _check_required(arrays, required, name)
    return arrays


def _decode_array(array_name: Any, desc: Any, array_frames: Sequence[FrameLike],
                  used_frames: set[int]) -> np.ndarray:
    """One array from its descriptor ``{dtype, shape, frame}``; marks its frame used."""
    if type(desc) is not dict:
        raise ProtocolError(f"array {array_name!r}: descriptor must be a map")
    dtype, shape, index = desc.get(D_DTYPE), desc.get(D_SHAPE), desc.get(D_FRAME)
    if type(dtype) is not str:
        raise ProtocolError(f"array {array_name!r}: 'dtype' must be a string",
                            ErrorCode.BAD_DTYPE)
    np_dtype = WIRE_DTYPES.get(dtype)
    if np_dtype is None:
        raise ProtocolError(
            f"array {array_name!r}: dtype {dtype!r} not allowed; allowed: "
            f"{sorted(ALLOWED_DTYPES)}", ErrorCode.BAD_DTYPE,
        )
    if type(shape) is not list or len(shape) > MAX_NDIM or not dims_ok(shape):
        raise ProtocolError(
            f"array {array_name!r}: 'shape' must be a list of at most {MAX_NDIM} "
            "non-negative ints", ErrorCode.BAD_SHAPE,
        )
    if type(index) is not int or not 0 <= index < len(array_frames) or index in used_frames:
        raise ProtocolError(
            f"array {array_name!r}: 'frame' must be a distinct int in "
            f"[0, {len(array_frames)})")
    used_frames.add(index)
    buf = array_frames[index]
    if type(buf) is not memoryview or buf.ndim != 1 or buf.format != "B":
        buf = as_view(buf)  # (an envelope's regions are such views already)
    expected = math.prod(shape) * np_dtype.itemsize
    if buf.nbytes != expected:
        raise ProtocolError(
            f"array {array_name!r}: shape {shape} of {dtype} needs {expected} bytes, "
            f"frame has {buf.nbytes}", ErrorCode.BAD_SHAPE,
        )
    # a view over the frame (np.ndarray is one call; an empty array as frombuffer makes it)
    array = (np.ndarray(shape, np_dtype, buf) if expected
             else np.frombuffer(buf, dtype=np_dtype).reshape(shape))
    if not np_dtype.isnative:  # big-endian host
        array = array.astype(np_dtype.newbyteorder("="))
    return array


def _check_required(arrays: Mapping[str, np.ndarray], required: Mapping[str, tuple[int, ...]],
                    name: str) -> None:
    """Every array ``name`` needs is there with an allowed number of dims, and no other."""
    for array_name, ndims in required.items():
        if array_name not in arrays:
            raise ProtocolError(f"{name} needs array {array_name!r}")
        if arrays[array_name].ndim not in ndims:
            raise ProtocolError(
                f"array {array_name!r} must have {' or '.join(map(str, ndims))} dims, got "
                f"shape {list(arrays[array_name].shape)}",
                ErrorCode.BAD_SHAPE,
            )
    extra = [a for a in arrays if a not in required] if len(arrays) > len(required) else []
    if extra:
        raise ProtocolError(f"{name} takes no array(s) {sorted(extra)}")


def check_frames(views: Sequence[memoryview], max_frames: int, max_header: int) -> None:
    if len(views) < 2:
        raise ProtocolError(f"a message has at least 2 frames (type, header), got {len(views)}")
    if len(views) > max_frames:
        raise ProtocolError(f"a message has at most {max_frames} frames, got {len(views)}",
                            ErrorCode.TOO_LARGE)
    total = 0
    for view in views:
        if view.nbytes > MAX_FRAME_BYTES:
            raise ProtocolError(f"frame of {view.nbytes} bytes exceeds {MAX_FRAME_BYTES}",
                                ErrorCode.TOO_LARGE)
        total += view.nbytes
    if total > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {total} bytes exceeds {MAX_MESSAGE_BYTES}",
                            ErrorCode.TOO_LARGE)
    if views[1].nbytes > max_header:
        raise ProtocolError(f"header of {views[1].nbytes} bytes exceeds {max_header}",
                            ErrorCode.TOO_LARGE)


def unpack_header(view: memoryview, container_len: int) -> dict[str, Any]:
    try:
        header = msgpack.unpackb(
            view, raw=False, strict_map_key=True, use_list=True,
            max_str_len=MAX_STR_BYTES, max_bin_len=0, max_ext_len=0,
            max_array_len=container_len, max_map_len=container_len,
        )
    except Exception as exc:  # msgpack raises a zoo of types (ValueError, ExtraData, ...)
        raise ProtocolError(f"header is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if type(header) is not dict:
        raise ProtocolError(f"header must be a msgpack map, got {type(header).__name__}")
    return header


def salvage_context(views: Sequence[memoryview], max_header: int) -> dict[str, Any]:
    """The matching fields (rid, stream, seq) of a message that failed before its header
    was decoded strictly (too many frames, a message too big, a string or list over the
    header limits, a msgpack bin or ext), read leniently from a header frame of at most
    ``max_header`` bytes; ``{}`` when there is no such frame or it is not a msgpack map."""
    if len(views) < 2 or views[1].nbytes > max_header:
        return {}
    try:
        header = msgpack.unpackb(views[1], raw=False, strict_map_key=False,
                                 unicode_errors="surrogateescape")
    except Exception:  # not msgpack at all: nothing to echo
        return {}
    return echo_context(header) if type(header) is dict else {}


def read_type_byte(view: memoryview, ctx: dict) -> int:
    if view.nbytes != 1:
        raise ProtocolError(f"type frame must be exactly 1 byte, got {view.nbytes}", context=ctx)
    return view[0]
