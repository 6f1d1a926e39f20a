"""Durable snapshots of stream states: every live stream's state rows, its last applied
sequence number and the weights version, in one checksummed file written atomically.

File layout (little-endian)::

    b"SRNNCKPT"  8 bytes magic
    u32          format version (1)
    u64          body length in bytes
    32 bytes     SHA-256 of the body
    body         msgpack map (no pickle): {"model": str, "layout": [[dtype, shape], ...],
                 "weights_version": int, "created": float, "streams": {id: {"next_seq": int,
                 "steps": int, "state": [bytes, ...], "replies": [...]}}, "extra": {...}}

A truncated or corrupted file fails the length or checksum test and raises
:class:`CheckpointError`; a checkpoint of a different model (other state layout) is refused.

The pieces are public for other containers of the same records (a per-stream blob in a
store): :func:`seal` / :func:`unseal` put and check the header (magic, version, length,
SHA-256) around a body, :func:`pack_record` / :func:`unpack_record` turn one
:class:`StreamRecord` into its msgpack-able map and back.

Example::

    save_checkpoint(path, Checkpoint(model="m", layout=layout, streams={"a": record}))
    ckpt = load_checkpoint(path)
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np

from streamrnn.atomic import atomic_write
from streamrnn.errors import CheckpointError

__all__ = [
    "Checkpoint",
    "FORMAT_VERSION",
    "MAGIC",
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
_HEADER = struct.Struct("<8sIQ32s")

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
    return {
        "next_seq": int(rec.next_seq),
        "steps": int(rec.steps),
        "replies": rec.replies,
        "state": [np.ascontiguousarray(r).astype(r.dtype.newbyteorder("<")).tobytes()
                  for r in rec.state],
    }


def unpack_record(rec: dict, layout: StateLayout) -> StreamRecord:
    """The inverse of :func:`pack_record` (KeyError, TypeError or ValueError if malformed)."""
    state = [np.frombuffer(buf, dtype=np.dtype(d).newbyteorder("<")).reshape(s).astype(d)
             for buf, (d, s) in zip(rec["state"], layout, strict=True)]
    return StreamRecord(state, int(rec["next_seq"]), int(rec["steps"]),
                        list(rec.get("replies", [])))


def seal(body: bytes, magic: bytes = MAGIC, version: int = FORMAT_VERSION) -> bytes:
    """``body`` behind the header: 8-byte magic, u32 version, u64 length, SHA-256."""
    return _HEADER.pack(magic, version, len(body), hashlib.sha256(body).digest()) + body


def unseal(blob: bytes, what: str, magic: bytes = MAGIC, version: int = FORMAT_VERSION
           ) -> bytes:
    """The body of a :func:`seal` ed ``blob``; CheckpointError (naming ``what``) unless its
    magic, version, length and checksum are right."""
    if len(blob) < _HEADER.size:
        raise CheckpointError(f"checkpoint {what} is truncated ({len(blob)} bytes)")
    got_magic, got_version, length, digest = _HEADER.unpack_from(blob)
    if got_magic != magic:
        raise CheckpointError(f"{what} is not a streamrnn checkpoint (bad magic {got_magic!r})")
    if got_version != version:
        raise CheckpointError(f"checkpoint {what} has format version {got_version}, "
                              f"this streamrnn reads {version}")
    body = blob[_HEADER.size:]
    if len(body) != length:
        raise CheckpointError(f"checkpoint {what} is truncated: body has {len(body)} of "
                              f"{length} bytes")
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointError(f"checkpoint {what} is corrupted (SHA-256 mismatch)")
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


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint) -> int:
    """Write ``ckpt`` atomically (temp file, fsync, rename, fsync dir). Returns bytes written."""
    blob = seal(_encode(ckpt))
    atomic_write(path, lambda f: f.write(blob))
    return len(blob)


def load_checkpoint(
    path: str | os.PathLike, expect_layout: StateLayout | None = None
) -> Checkpoint:
    """Read and verify a checkpoint; raise CheckpointError if it is not intact.

    Args:
        expect_layout: if given, the serving model's state layout; a checkpoint of a model
            with another layout is refused instead of being loaded into the wrong rows.
    """
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    body = unseal(blob, str(path))
    try:
        data = msgpack.unpackb(body, raw=False, strict_map_key=True)
        layout: StateLayout = [(d, tuple(s)) for d, s in data["layout"]]
        streams = {name: unpack_record(rec, layout) for name, rec in data["streams"].items()}
        ckpt = Checkpoint(data["model"], layout, streams, int(data["weights_version"]),
                          float(data["created"]), dict(data.get("extra", {})))
    except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
        raise CheckpointError(f"checkpoint {path} has a malformed body: {exc}") from exc
    if expect_layout is not None and [(d, tuple(s)) for d, s in expect_layout] != layout:
        raise CheckpointError(
            f"checkpoint {path} holds states of another model (layout {layout}, "
            f"expected {expect_layout})"
        )
    return ckpt
