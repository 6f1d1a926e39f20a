"""The checks of a worker checkpoint's decoded body: every field, as strictly as a wire message.

Pure Python + NumPy (no TensorFlow, no sockets). A checkpoint is a file from elsewhere: its
checksum only proves that nobody damaged it by accident (and its HMAC, when a key is
configured, who wrote it). :func:`check_body` holds every field to the limits of
:mod:`streamrnn.protocol`, so that what a restored worker serves is what a client could
have sent it: stream ids of 1..``MAX_STREAM_ID_BYTES`` UTF-8 bytes, ``next_seq`` and
``steps`` in ``[0, MAX_SEQ]``, at most ``REPLY_CACHE_SIZE`` cached replies per stream, each
one a reply type a BATCH_REPLY may carry with at most ``MAX_ARRAYS`` arrays of the wire's
dtypes and shapes, state rows of exactly the layout's size, integer weights-version pins.
Fields this version does not know are ignored, as in a wire header.

The body (see :mod:`streamrnn.serving.checkpoint`)::

    {"model": str, "layout": [[dtype, shape], ...], "weights_version": int,
     "created": float, "streams": {id: {"next_seq": int, "steps": int,
     "state": [bytes, ...], "replies": [[seq, type, header, {name: [dtype, shape, bytes]}]]}},
     "extra": {"closed": {id: reply}, "pins": {id: int}, "worker": str}}

Example::

    check_body(msgpack.unpackb(body))   # CheckpointError("'streams' must be a map, ...")
"""

from __future__ import annotations

import math

import msgpack
import numpy as np

from streamrnn.errors import CheckpointError
from streamrnn.protocol import (
    ALLOWED_DTYPES,
    BATCH_REPLY_PART_TYPES,
    MAX_ARRAYS,
    MAX_CONTAINER_LEN,
    MAX_FRAME_BYTES,
    MAX_HEADER_BYTES,
    MAX_NDIM,
    MAX_SEQ,
    MAX_STR_BYTES,
    MAX_STREAM_ID_BYTES,
    REPLY_CACHE_SIZE,
)

__all__ = ["check_body", "check_layout", "check_record", "check_reply", "check_stream_id"]

_REPLY_TYPES = frozenset(int(t) for t in BATCH_REPLY_PART_TYPES)
_DTYPES = {name: np.dtype(name) for name in ALLOWED_DTYPES}


def _fail(where: str, what: str, value: object) -> CheckpointError:
    shown = repr(value)
    if len(shown) > 80:
        shown = f"{shown[:60]}... ({type(value).__name__})"
    return CheckpointError(f"{where} must be {what}, got {shown}")


def _int(value: object, where: str, low: int = 0, high: int = MAX_SEQ) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _fail(where, f"an int in [{low}, {high}]", value)
    return value


def _map(value: object, where: str, most: int | None = MAX_CONTAINER_LEN) -> dict:
    if type(value) is not dict:
        raise _fail(where, "a map", value)
    if most is not None and len(value) > most:
        raise CheckpointError(f"{where} has {len(value)} entries, more than {most}")
    return value


def _list(value: object, where: str, most: int = MAX_CONTAINER_LEN) -> list:
    if type(value) is not list:
        raise _fail(where, "a list", value)
    if len(value) > most:
        raise CheckpointError(f"{where} has {len(value)} entries, more than {most}")
    return value


def _str(value: object, where: str, most: int = MAX_STR_BYTES) -> str:
    if type(value) is not str or len(value.encode("utf-8", "surrogatepass")) > most:
        raise _fail(where, f"a string of at most {most} UTF-8 bytes", value)
    return value


def check_stream_id(stream: object, where: str = "stream id") -> str:
    """A stream id as the wire allows it: a string of 1..MAX_STREAM_ID_BYTES UTF-8 bytes."""
    if type(stream) is not str or not 0 < len(stream.encode("utf-8", "surrogatepass")) \
            <= MAX_STREAM_ID_BYTES:
        raise _fail(where, f"a string of 1..{MAX_STREAM_ID_BYTES} UTF-8 bytes", stream)
    return stream


def _shape(value: object, where: str) -> tuple[int, ...]:
    dims = _list(value, where, MAX_NDIM)
    for i, d in enumerate(dims):
        _int(d, f"{where}[{i}]", 0, MAX_FRAME_BYTES)
    return tuple(dims)


def _dtype(value: object, where: str) -> np.dtype:
    dtype = _DTYPES.get(value) if type(value) is str else None
    if dtype is None:
        raise _fail(where, f"one of {sorted(ALLOWED_DTYPES)}", value)
    return dtype


def _array_size(dtype: np.dtype, shape: tuple[int, ...], where: str) -> int:
    size = math.prod(shape) * dtype.itemsize
    if size > MAX_FRAME_BYTES:
        raise CheckpointError(f"{where} holds {size} bytes, more than {MAX_FRAME_BYTES}")
    return size


def _array_bytes(dtype: np.dtype, shape: tuple[int, ...], buf: object, where: str) -> None:
    size = _array_size(dtype, shape, where)
    if type(buf) is not bytes or len(buf) != size:
        got = f"{len(buf)} bytes" if type(buf) is bytes else type(buf).__name__
        raise CheckpointError(f"{where} must be {size} bytes ({dtype} {list(shape)}), got {got}")


def check_layout(value: object) -> list[tuple[str, tuple[int, ...]]]:
    """``layout``: a list of ``[dtype, row shape]``, one per state variable."""
    layout = []
    for i, item in enumerate(_list(value, "'layout'")):
        pair = _list(item, f"'layout'[{i}]", 2)
        if len(pair) != 2:
            raise _fail(f"'layout'[{i}]", "[dtype, shape]", item)
        dtype = _dtype(pair[0], f"'layout'[{i}] dtype")
        shape = _shape(pair[1], f"'layout'[{i}] shape")
        _array_size(dtype, shape, f"'layout'[{i}]")
        layout.append((pair[0], shape))
    return layout


def _header(value: object, where: str) -> None:
    header = _map(value, where)
    for key in header:
        _str(key, f"{where} key")
    if len(msgpack.packb(header, use_bin_type=True)) > MAX_HEADER_BYTES:
        raise CheckpointError(f"{where} is longer than {MAX_HEADER_BYTES} bytes")


def _reply(item: object, below: int) -> int:
    parts = _list(item, "entry", 4)
    if len(parts) != 4:
        raise _fail("entry", "[seq, type, header, arrays]", item)
    seq = _int(parts[0], "seq", 0, min(below - 1, MAX_SEQ))
    if type(parts[1]) is not int or parts[1] not in _REPLY_TYPES:
        raise _fail("type", f"a reply type in {sorted(_REPLY_TYPES)}", parts[1])
    _header(parts[2], "header")
    for name, desc in _map(parts[3], "arrays", MAX_ARRAYS).items():
        at = f"array {_str(name, 'array name')!r}"
        triple = _list(desc, at, 3)
        if len(triple) != 3:
            raise _fail(at, "[dtype, shape, bytes]", desc)
        _array_bytes(_dtype(triple[0], f"{at} dtype"), _shape(triple[1], f"{at} shape"),
                     triple[2], at)
    return seq


def check_reply(item: object, where: str = "reply", below: int = MAX_SEQ + 1) -> int:
    """One cached reply ``[seq, type, header, {name: [dtype, shape, bytes]}]`` with
    ``seq < below``; returns its seq (CheckpointError naming ``where`` if it is not)."""
    try:
        return _reply(item, below)
    except CheckpointError as exc:
        raise CheckpointError(f"{where} {exc}") from None


def _record(value: object, layout: list, sizes: list[int]) -> None:
    record = _map(value, "record")
    next_seq = _int(record.get("next_seq"), "'next_seq'")
    _int(record.get("steps"), "'steps'")
    state = _list(record.get("state"), "'state'")
    if len(state) != len(layout):
        raise CheckpointError(f"has {len(state)} state rows, the layout {len(layout)}")
    for i, (buf, size) in enumerate(zip(state, sizes, strict=True)):
        if type(buf) is not bytes or len(buf) != size:
            dtype, shape = layout[i]
            _array_bytes(_DTYPES[dtype], shape, buf, f"state row {i}")
    last = -1
    for i, item in enumerate(_list(record.get("replies", []), "'replies'", REPLY_CACHE_SIZE)):
        seq = check_reply(item, f"reply {i}", below=next_seq)
        if seq <= last:
            raise CheckpointError("replies are not in ascending seq order")
        last = seq


def check_record(value: object, layout: list, where: str = "stream record") -> None:
    """One stream's record ``{"next_seq", "steps", "state", "replies"}`` against the
    checked ``layout`` (CheckpointError naming ``where`` if it breaks a limit)."""
    sizes = [math.prod(shape) * _DTYPES[dtype].itemsize for dtype, shape in layout]
    try:
        _record(value, layout, sizes)
    except CheckpointError as exc:
        raise CheckpointError(f"{where} {exc}") from None


def _check_extra(value: object) -> None:
    extra = _map(value, "'extra'", None)
    for stream, item in _map(extra.get("closed", {}), "'extra' 'closed'", None).items():
        check_reply(item, f"closed stream {check_stream_id(stream, 'closed stream id')!r}")
    for stream, version in _map(extra.get("pins", {}), "'extra' 'pins'", None).items():
        _int(version, f"pin of stream {check_stream_id(stream, 'pinned stream id')!r}")
    if "worker" in extra:
        _str(extra["worker"], "'extra' 'worker'")


def check_body(data: object) -> list[tuple[str, tuple[int, ...]]]:
    """Raise :class:`CheckpointError` naming the first field of ``data`` (a decoded
    checkpoint body) that a wire message could not carry; returns the state layout.

    The streams' records are checked one by one with :func:`check_record` (which
    :func:`streamrnn.serving.checkpoint.unpack_record` calls)."""
    body = _map(data, "the body", None)
    _str(body.get("model"), "'model'")
    layout = check_layout(body.get("layout"))
    _int(body.get("weights_version"), "'weights_version'")
    created = body.get("created")
    if type(created) not in (int, float) or not math.isfinite(created):
        raise _fail("'created'", "a finite number", created)
    for stream in _map(body.get("streams"), "'streams'", None):
        check_stream_id(stream)
    _check_extra(body.get("extra", {}))
    return layout
