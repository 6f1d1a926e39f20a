"""A worker's durable state: checkpoints of its engine states + sequence table, and restores.

The worker's compute thread calls :meth:`WorkerCheckpointer.save` between steps, so each
file reflects exactly the applied requests: for every stream, its state rows, the next
sequence number it expects, the replies it would answer duplicates with (the reply cache,
so a client that resends a request applied just before a crash still gets its output),
its owner (the client identity it belongs to), the worker's recently closed streams (and
their owners), and the streams' weights-version pins. After
:meth:`save` returns, the file is on disk and :attr:`WorkerCheckpointer.durable` says, per
stream, below which ``seq`` everything is in it: the worker reports that in its replies
(``durable_seq``), and a client keeps every request from there on to replay after a crash.

Files are ``<dir>/<name>.ckpt`` (one per worker, so workers can share a directory). Moving
streams between workers is the Redis store's job (:mod:`streamrnn.cluster.redis_checkpoints`);
this file store serves one worker on one machine.

Example::

    ckpt = WorkerCheckpointer("/var/lib/streamrnn", name="w1", model="m.keras")
    ckpt.restore(engine, table)          # on start; CheckpointError if the file is bad
    ckpt.save(engine, table)             # between steps; returns the durable map
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from streamrnn.engine.interface import EngineLike, SupportsPins, SupportsSnapshots
from streamrnn.errors import CheckpointError, EngineFullError, StreamRNNError
from streamrnn.protocol import MessageType
from streamrnn.serving.checkpoint import (
    Checkpoint,
    StreamRecord,
    load_checkpoint,
    save_checkpoint,
)
from streamrnn.serving.owners import load_owners
from streamrnn.serving.sequencing import CachedReply, SequenceTable
from streamrnn.serving.store import WriteCadence

log = logging.getLogger("streamrnn.durable")


class DurableEngine(EngineLike, SupportsSnapshots, Protocol):
    """An engine whose stream states can be checkpointed (an Engine, or a WeightsFollower
    around one; with :class:`~streamrnn.engine.interface.SupportsPins` the pins are kept)."""


def checkpoint_path(directory: str | os.PathLike, name: str) -> Path:
    """Where the worker called ``name`` keeps its checkpoint in ``directory``."""
    return Path(directory) / f"{name}.ckpt"


def pack_reply(seq: int, reply: CachedReply) -> list[Any]:
    """A cached reply as msgpack-able ``[seq, type, header, {name: [dtype, shape, bytes]}]``."""
    msg_type, header, arrays = reply
    packed = {k: [str(a.dtype), list(a.shape), np.ascontiguousarray(a).tobytes()]
              for k, a in arrays.items()}
    return [int(seq), int(msg_type), dict(header), packed]


def unpack_reply(item: list[Any]) -> tuple[int, CachedReply]:
    """The inverse of :func:`pack_reply`: ``(seq, cached reply)``."""
    seq, msg_type, header, packed = item
    arrays = {k: np.frombuffer(buf, dtype=np.dtype(d).newbyteorder("<")).reshape(shape)
              .astype(d) for k, (d, shape, buf) in packed.items()}
    return int(seq), (MessageType(msg_type), dict(header), arrays)


class WorkerCheckpointer(WriteCadence):
    """Writes and reads one worker's checkpoint file.

    Args:
        directory: checkpoint directory (created if missing; may be shared by workers).
        name: this worker's name; the file is ``<directory>/<name>.ckpt``.
        model: the model's name, stored in the file (informational).
        every_steps: write after this many engine steps (batched pushes); 0: never by count.
        every_s: write when this many seconds passed since the last write; 0: never by time.
        key: the checkpoint key (``--checkpoint-key``): files are signed with it (HMAC-SHA256)
            and only files signed with it are read; None: SHA-256 only.
    """

    def __init__(self, directory: str | os.PathLike, name: str = "worker", model: str = "",
                 every_steps: int = 0, every_s: float = 0.0, key: bytes | None = None):
        self._start_cadence(every_steps, every_s)
        self.key = key
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.model = model
        self.path = checkpoint_path(directory, name)
        self.where = str(self.path)
        #: stream -> next_seq in the newest file on disk (everything below it is durable)
        self.durable: dict[str, int] = {}
        self.written = 0
        self.last_bytes = 0
        self.last_seconds = 0.0

    # ---- holding (StreamStore): one machine, every stream is this worker's -------------

    def lease_valid(self) -> bool:
        """Always True: a checkpoint directory has no leases."""
        return True

    def holds(self, stream: str) -> bool:
        """Always True: this worker serves every stream it is sent."""
        return True

    def acquire(self, streams: Iterable[str], engine: DurableEngine,
                table: SequenceTable) -> set[str]:
        """Every stream is held already: returns ``set(streams)``, restores nothing."""
        return set(streams)

    def report(self) -> dict[str, Any]:
        """Nothing beyond the common STATS figures."""
        return {}

    def close(self) -> None:
        """Nothing to let go: the file stays for the next start."""

    # ---- save -------------------------------------------------------------------------

    def save(self, engine: DurableEngine, table: SequenceTable) -> dict[str, int]:
        """Write every stream of ``table`` (state, next seq, cached replies) atomically.

        Call it between steps (compute thread): the states and sequence numbers must be
        taken at the same point. Returns the new durable map (stream -> next_seq).
        """
        began = time.monotonic()
        states = engine.export_states()
        initial = engine.initial_state()
        streams: dict[str, StreamRecord] = {}
        owners = table.export_owners()  # the client identities the streams belong to
        for stream, (next_seq, replies) in table.export().items():
            # a stream the engine does not hold (e.g. RESET before any PUSH) is initial
            state, steps = states.get(stream, (initial, 0))
            streams[stream] = StreamRecord(
                [np.asarray(r) for r in state], next_seq, steps,
                [pack_reply(seq, reply) for seq, reply in replies], owners.get(stream))
        closed = {s: pack_reply(seq, reply) for s, (seq, reply) in table.export_closed().items()}
        # a WeightsFollower's weights-version pins
        pins = engine.pins() if isinstance(engine, SupportsPins) else {}
        extra = {"closed": closed, "worker": self.name, "pins": dict(pins)}
        if owners.keys() & closed.keys():
            extra["closed_owners"] = {s: owners[s] for s in closed if s in owners}
        ckpt = Checkpoint(self.model, engine.state_layout, streams, int(engine.weights_version),
                          extra=extra)
        self.last_bytes = save_checkpoint(self.path, ckpt, key=self.key)
        self.durable = {s: r.next_seq for s, r in streams.items()}
        self.written += 1
        self.last_seconds = self._wrote() - began
        return self.durable

    # ---- restore ----------------------------------------------------------------------

    def restore(self, engine: DurableEngine, table: SequenceTable) -> int:
        """Load this worker's own checkpoint, if there is one; returns the streams restored.

        Raises CheckpointError (and changes nothing) if the file is corrupt, truncated, of
        another model, or holds more streams than the engine has room for.
        """
        if not self.path.exists():
            return 0
        ckpt = load_checkpoint(self.path, expect_layout=engine.state_layout, key=self.key)
        closed_owners = load_owners(ckpt.extra.get("closed_owners"),
                                    f"checkpoint {self.where} 'closed_owners'")
        self._import(ckpt.streams, engine, table)
        restore_pins(self.where, ckpt.extra.get("pins", {}), engine)  # absent in older files
        for stream, item in ckpt.extra.get("closed", {}).items():
            seq, reply = unpack_reply(item)
            table.restore_closed(stream, seq, reply, closed_owners.get(stream))
        version = int(engine.weights_version)
        if ckpt.weights_version != version:
            log.warning("checkpoint %s was written with weights version %d; serving %d",
                        self.where, ckpt.weights_version, version)
        return len(ckpt.streams)

    def _import(self, records: dict[str, StreamRecord], engine: DurableEngine,
                table: SequenceTable) -> None:
        import_records(self.where, records, engine, table)
        for stream, record in records.items():
            self.durable[stream] = record.next_seq



def import_records(where: str, records: Mapping[str, StreamRecord], engine: DurableEngine,
                   table: SequenceTable) -> None:
    """Load ``records`` into ``engine`` (state rows, steps) and ``table`` (next seq, reply
    cache). Raises CheckpointError, before changing anything, on a malformed reply cache or
    when the engine has no room for them (``where`` names the source in the message)."""
    try:
        unpacked = {s: [unpack_reply(item) for item in r.replies] for s, r in records.items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {where}: malformed reply cache: {exc}") from exc
    try:
        engine.import_states({s: (r.state, r.steps) for s, r in records.items()})
    except EngineFullError as exc:
        raise CheckpointError(
            f"checkpoint holds {len(records)} streams but this worker has room for "
            f"{engine.capacity_left} (raise --max-streams): {exc}") from exc
    for stream, record in records.items():
        table.restore(stream, record.next_seq, unpacked[stream], record.owner)


def restore_pins(where: str, pins: Mapping[str, int], engine: DurableEngine) -> None:
    """Pin restored streams to their weights versions again.

    A version that can no longer be loaded (pruned from the publish directory) or an
    engine without pins leaves the stream following the latest weights, with a warning.
    """
    if not pins:
        return
    if not isinstance(engine, SupportsPins):
        log.warning("checkpoint %s pins %d streams to weights versions, but this worker "
                    "does not follow published weights (--weights-from): pins dropped",
                    where, len(pins))
        return
    for stream, version in pins.items():
        try:
            engine.pin(stream, int(version))
        except (OSError, ValueError, KeyError, TypeError, StreamRNNError) as exc:
            log.warning("stream %r was pinned to weights version %s, which cannot be "
                        "loaded (%s): it follows the latest weights now", stream, version, exc)


__all__ = [
    "DurableEngine",
    "WorkerCheckpointer",
    "checkpoint_path",
    "import_records",
    "pack_reply",
    "restore_pins",
    "unpack_reply",
]
