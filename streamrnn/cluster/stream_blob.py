"""One stream's checkpoint as a self-checking blob (the value of its ``srnn:{s:<id>}:ckpt`` key).

The same record as in a worker's checkpoint file (:mod:`streamrnn.serving.checkpoint`: state
rows, next ``seq``, steps since reset, the reply cache packed by
:func:`~streamrnn.serving.durability.pack_reply`), plus the stream's weights-version pin
and the claim epoch it was written under, sealed with a magic and a SHA-256 checksum
(:func:`~streamrnn.serving.checkpoint.seal`; with a checkpoint key also an HMAC-SHA256, and
then only blobs signed with that key are read)::

    b"SRNNSTRM"  8 bytes magic
    u32          format version (1; 1 | SIGNED_FLAG when signed)
    u64          body length in bytes
    32 bytes     SHA-256 of the body
    32 bytes     HMAC-SHA256 of the body (signed blobs only)
    body         msgpack map: {"stream": str, "epoch": int, "model": str,
                 "layout": [[dtype, shape], ...], "weights_version": int, "created": float,
                 "pin": int | None, "record": {"next_seq", "steps", "state", "replies",
                 "owner" (only for a stream with an owner)}}

:func:`decode_stream_blob` is strict: a truncated or altered blob, another stream's blob,
another model's (state layout), an epoch that is not below the claim's, or a field a wire
message could not carry (:func:`~streamrnn.serving.checkpoint.unpack_record`) raises
:class:`~streamrnn.errors.CheckpointError`.

Example::

    blob = encode_stream_blob(StreamBlob("a", 3, record, layout, pin=None))
    again = decode_stream_blob(blob, "a", expect_layout=layout, below_epoch=4)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgpack

from streamrnn.errors import CheckpointError
from streamrnn.serving.checkpoint import (
    StateLayout,
    StreamRecord,
    pack_record,
    seal,
    unpack_record,
    unseal,
)

__all__ = ["BLOB_MAGIC", "BLOB_VERSION", "StreamBlob", "decode_stream_blob",
           "encode_stream_blob"]

BLOB_MAGIC = b"SRNNSTRM"
BLOB_VERSION = 1


@dataclass
class StreamBlob:
    """One stream's checkpoint: its record, the claim epoch it was written under, its pin."""

    stream: str
    epoch: int
    record: StreamRecord
    layout: StateLayout
    pin: int | None = None
    model: str = ""
    weights_version: int = 0
    created: float = field(default_factory=time.time)


def encode_stream_blob(blob: StreamBlob, key: bytes | None = None) -> bytes:
    """``blob`` as sealed bytes, signed with ``key`` if given (CheckpointError if its rows
    do not match its layout)."""
    body = msgpack.packb({
        "stream": blob.stream,
        "epoch": int(blob.epoch),
        "model": blob.model,
        "layout": [[d, list(s)] for d, s in blob.layout],
        "weights_version": int(blob.weights_version),
        "created": float(blob.created),
        "pin": None if blob.pin is None else int(blob.pin),
        "record": pack_record(blob.stream, blob.record, blob.layout),
    }, use_bin_type=True)
    return seal(body, BLOB_MAGIC, BLOB_VERSION, key=key)


def decode_stream_blob(data: bytes, stream: str, expect_layout: StateLayout,
                       below_epoch: int | None = None, key: bytes | None = None) -> StreamBlob:
    """Check and read the blob stored for ``stream``.

    Args:
        data: the stored bytes.
        stream: the stream whose key held them (a blob of another stream is refused).
        expect_layout: the serving model's state layout (another model's is refused).
        below_epoch: the epoch of the claim being restored; a blob must be older.
        key: the checkpoint key: only a blob signed with it is read.
    """
    what = f"of stream {stream!r}"
    body = unseal(data, what, BLOB_MAGIC, BLOB_VERSION, key=key)
    try:
        raw = msgpack.unpackb(body, raw=False, strict_map_key=True)
        layout: StateLayout = [(str(d), tuple(int(n) for n in s)) for d, s in raw["layout"]]
        pin = raw["pin"]
        blob = StreamBlob(
            str(raw["stream"]), _int(raw["epoch"]), StreamRecord([]), layout,
            None if pin is None else _int(pin), str(raw["model"]),
            _int(raw["weights_version"]), float(raw["created"]))
        expected = [(d, tuple(s)) for d, s in expect_layout]
        if layout != expected:
            raise CheckpointError(f"checkpoint {what} holds states of another model (layout "
                                  f"{layout}, expected {expected})")
        blob.record = unpack_record(raw["record"], layout, f"checkpoint {what}")
    except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
        raise CheckpointError(f"checkpoint {what} has a malformed body: {exc}") from exc
    if blob.stream != stream:
        raise CheckpointError(f"checkpoint {what} holds stream {blob.stream!r}")
    if blob.record.next_seq < 0 or blob.record.steps < 0 or blob.epoch < 1:
        raise CheckpointError(f"checkpoint {what} has negative counters")
    if below_epoch is not None and blob.epoch >= below_epoch:
        raise CheckpointError(f"checkpoint {what} was written under epoch {blob.epoch}, "
                              f"not below the claim's {below_epoch}")
    return blob


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value
