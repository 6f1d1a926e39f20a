"""Durable snapshots of stream states: every live stream's state rows, its last applied
sequence number and the weights version, in one checksummed file written atomically.

File layout (little-endian)::

    b"SRNNCKPT"  8 bytes magic
    u32          format version (1; 1 | SIGNED_FLAG = 257 when written with a key)
    u64          body length in bytes
    32 bytes     SHA-256 of the body
    32 bytes     HMAC-SHA256 of the body under the checkpoint key (signed files only)
    body         msgpack map (no pickle): {"model": str, "layout": [[dtype, shape], ...],
                 "weights_version": int, "created": float, "streams": {id: {"next_seq": int,
                 "steps": int, "state": [bytes, ...], "replies": [...], "owner": str
                 (only for a stream with an owner)}}, "extra": {...}}

A truncated or corrupted file fails the length or checksum test and raises
:class:`CheckpointError`; a checkpoint of a different model (other state layout) is refused,
and so is a body with any field a wire message could not carry
(:mod:`streamrnn.serving.checkpoint_schema`). With a ``key`` (``--checkpoint-key``) files
are signed and only files whose HMAC matches are read: a file written without a key, or
under another key, is refused. Without a key both kinds are read (the SHA-256 proves that
the file is intact, not who wrote it).

The pieces are public for other containers of the same records (a per-stream blob in a
store): :func:`seal` / :func:`unseal` put and check the header (magic, version, length,
SHA-256) around a body, :func:`pack_record` / :func:`unpack_record` turn one
:class:`StreamRecord` into its msgpack-able map and back.

Example::

    save_checkpoint(path, Checkpoint(model="m", layout=layout, streams={"a": record}))
    ckpt = load_checkpoint(path)
    save_checkpoint(path, ckpt, key=key)          # signed: load_checkpoint(path, key=key)
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np

from streamrnn.atomic import atomic_write
from streamrnn.errors import CheckpointError
from streamrnn.serving.checkpoint_schema import check_body, check_record
from streamrnn.serving.owners import check_owner

__all__ = [
    "Checkpoint",
    "FORMAT_VERSION",
    "MAGIC",
    "SIGNED_FLAG",
    "StateLayout",
    "StreamRecord",
    "layout_of",
    "load_checkpoint",
    "pack_record",
    "save_checkpoint",
    "seal",
    "unpack_record",
    "unseal",
]

MAGIC = b"SRNNCKPT"
FORMAT_VERSION = 1
#: set in the version field of a file signed with a key (its header has the HMAC too)
SIGNED_FLAG = 0x100
_HEADER = struct.Struct("<8sIQ32s")
_SIGNED_HEADER = struct.Struct("<8sIQ32s32s")

StateLayout = list[tuple[str, tuple[int, ...]]]
"""(dtype, row shape) of each state variable, in StateBank order."""


@dataclass
class StreamRecord:
    """One stream in a checkpoint: state rows (one per variable), next expected sequence
    number and timesteps since its last reset."""

    state: list[np.ndarray]
    next_seq: int = 0
    steps: int = 0
    #: the worker's cached replies (msgpack-able; see streamrnn.serving.durability), so that a
    #: resent request that was applied before the checkpoint is still answered after a restart
    replies: list = field(default_factory=list)
    #: the client identity the stream belongs to (streamrnn.serving.owners; None: anyone)
    owner: str | None = None


@dataclass
class Checkpoint:
    model: str
    layout: StateLayout
    streams: dict[str, StreamRecord] = field(default_factory=dict)
    weights_version: int = 0
    created: float = field(default_factory=time.time)
    extra: dict = field(default_factory=dict)  # msgpack-able (the worker's closed streams)


def layout_of(rows: list[np.ndarray]) -> StateLayout:
    return [(str(r.dtype), tuple(int(d) for d in r.shape)) for r in rows]


def pack_record(name: str, rec: StreamRecord, layout: StateLayout) -> dict:
    """``rec`` as a msgpack-able map (state rows as little-endian bytes); CheckpointError if
    its rows do not match ``layout``."""
    if layout_of(rec.state) != layout:
        raise CheckpointError(f"stream {name!r} state does not match the checkpoint layout")
    packed = {
        "next_seq": int(rec.next_seq),
        "steps": int(rec.steps),
        "replies": rec.replies,
        "state": [np.ascontiguousarray(r).astype(r.dtype.newbyteorder("<")).tobytes()
                  for r in rec.state],
    }
    if rec.owner is not None:
        packed["owner"] = rec.owner
    return packed


def unpack_record(rec: dict, layout: StateLayout, where: str = "stream record"
                  ) -> StreamRecord:
    """The inverse of :func:`pack_record`; CheckpointError (naming ``where``) unless every
    field is as a wire message could carry it
    (:func:`~streamrnn.serving.checkpoint_schema.check_record`)."""
    check_record(rec, layout, where)
    state = [np.frombuffer(buf, dtype=np.dtype(d).newbyteorder("<")).reshape(s).astype(d)
             for buf, (d, s) in zip(rec["state"], layout, strict=True)]
    return StreamRecord(state, int(rec["next_seq"]), int(rec["steps"]),
                        list(rec.get("replies", [])),
                        check_owner(rec.get("owner"), f"{where} 'owner'"))


def _mac(key: bytes, body: bytes | memoryview) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()


def seal(body: bytes, magic: bytes = MAGIC, version: int = FORMAT_VERSION,
         key: bytes | None = None) -> bytes:
    """``body`` behind the header: 8-byte magic, u32 version, u64 length, SHA-256; with
    ``key``, the version has :data:`SIGNED_FLAG` set and the body's HMAC-SHA256 follows."""
    digest = hashlib.sha256(body).digest()
    if key is None:
        return _HEADER.pack(magic, version, len(body), digest) + body
    return _SIGNED_HEADER.pack(magic, version | SIGNED_FLAG, len(body), digest,
                               _mac(key, body)) + body


def unseal(blob: bytes, what: str, magic: bytes = MAGIC, version: int = FORMAT_VERSION,
           key: bytes | None = None) -> bytes:
    """The body of a :func:`seal` ed ``blob``; CheckpointError (naming ``what``) unless its
    magic, version, length and checksum are right, and with ``key`` its HMAC (a blob sealed
    without a key is then refused). Without ``key`` a signed blob's SHA-256 is checked."""
    if len(blob) < _HEADER.size:
        raise CheckpointError(f"checkpoint {what} is truncated ({len(blob)} bytes)")
    got_magic, got_version = _HEADER.unpack_from(blob)[:2]
    if got_magic != magic:
        raise CheckpointError(f"{what} is not a streamrnn checkpoint (bad magic {got_magic!r})")
    if got_version & ~SIGNED_FLAG != version:
        raise CheckpointError(f"checkpoint {what} has format version {got_version}, "
                              f"this streamrnn reads {version}")
    header = _SIGNED_HEADER if got_version & SIGNED_FLAG else _HEADER
    if len(blob) < header.size:
        raise CheckpointError(f"checkpoint {what} is truncated ({len(blob)} bytes)")
    _, _, length, digest, *mac = header.unpack_from(blob)
    body = blob[header.size:]
    if len(body) != length:
        raise CheckpointError(f"checkpoint {what} is truncated: body has {len(body)} of "
                              f"{length} bytes")
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointError(f"checkpoint {what} is corrupted (SHA-256 mismatch)")
    if key is not None and not mac:
        raise CheckpointError(
            f"checkpoint {what} carries no HMAC (it was written without a checkpoint key), "
            "but a checkpoint key is configured: refusing a file of unknown origin")
    if key is not None and not hmac.compare_digest(_mac(key, body), mac[0]):
        raise CheckpointError(f"checkpoint {what} fails its HMAC check: written under "
                              "another checkpoint key, or forged")
    return bytes(body)


def _encode(ckpt: Checkpoint) -> bytes:
    streams = {name: pack_record(name, rec, ckpt.layout) for name, rec in ckpt.streams.items()}
    return msgpack.packb(
        {
            "model": ckpt.model,
            "layout": [[d, list(s)] for d, s in ckpt.layout],
            "weights_version": int(ckpt.weights_version),
            "created": float(ckpt.created),
            "streams": streams,
            "extra": ckpt.extra,
        },
        use_bin_type=True,
    )


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint, key: bytes | None = None
                    ) -> int:
    """Write ``ckpt`` atomically (temp file, fsync, rename, fsync dir), signed with ``key``
    (HMAC-SHA256) if given. Returns bytes written."""
    blob = seal(_encode(ckpt), key=key)
    atomic_write(path, lambda f: f.write(blob))
    return len(blob)


def _decode(body: bytes, what: str) -> Checkpoint:
    try:
        data = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (TypeError, ValueError, msgpack.UnpackException) as exc:
        raise CheckpointError(f"checkpoint {what} has a malformed body: {exc}") from exc
    try:
        layout = check_body(data)
        streams = {name: unpack_record(rec, layout, f"stream {name[:64]!r}")
                   for name, rec in data["streams"].items()}
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {what} has a malformed body: {exc}") from None
    return Checkpoint(data["model"], layout, streams, data["weights_version"],
                      float(data["created"]), dict(data.get("extra", {})))


def load_checkpoint(
    path: str | os.PathLike, expect_layout: StateLayout | None = None,
    key: bytes | None = None,
) -> Checkpoint:
    """Read and verify a checkpoint; raise CheckpointError if it is not intact.

    Args:
        expect_layout: if given, the serving model's state layout; a checkpoint of a model
            with another layout is refused instead of being loaded into the wrong rows.
        key: the checkpoint key: if given, only a file signed with it is read.
    """
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    ckpt = _decode(unseal(blob, str(path), key=key), str(path))
    layout = ckpt.layout
    if expect_layout is not None and [(d, tuple(s)) for d, s in expect_layout] != layout:
        raise CheckpointError(
            f"checkpoint {path} holds states of another model (layout {layout}, "
            f"expected {expect_layout})"
        )
    return ckpt
