"""A worker's streams in Redis: :class:`RedisStreamStore`, the ``--store redis://`` backend of
:class:`~streamrnn.serving.store.StreamStore`.

A worker serves a stream only while it *holds* it: the first request of a stream it does not
hold makes the compute thread :meth:`~RedisStreamStore.acquire` it (one pipelined
``RedisStore.acquire_many`` for all of a round's new streams): a stream that is free, never
seen, or whose holder's lease is dead is claimed (its epoch goes up by one) and its
checkpoint blob (:mod:`streamrnn.cluster.stream_blob`) restored: state rows, ``next_seq``,
reply cache and pin, exactly as a restart restores a checkpoint file. A stream a live other
worker holds is not acquired; its requests are answered ERROR ``NOT_HOLDER``.

:meth:`~RedisStreamStore.save` writes, in one pipelined call, only what changed since the
stream's last write (``next_seq`` moved: a PUSH, RESET or GENERATE applied; its pin
changed; it was closed or expired: checkpoint deleted and stream released). Each write is
fenced in Redis by (worker, token, epoch): a write refused because another worker claimed
the stream meanwhile (this worker was a paused "zombie") drops the stream here and is
counted (``refused_writes``). ``durable`` is the ``next_seq`` of each stream's last write;
replies carry it as ``durable_seq``.

**Interval.** A client keeps every applied request from ``durable_seq`` on (its
``replay_buffer``, 4096 requests per stream by default) to replay after a failover, so the
write interval bounds how long a client must keep unacknowledged chunks: about
``every_s`` + one write (+ the lease ttl until another worker takes over, during which the
stream makes no progress). The default :data:`DEFAULT_EVERY_S` = 1 s (today's
``--checkpoint-every-s``) keeps a stream within the default buffer up to ~4,000 chunks/s;
a longer interval writes fewer bytes (only changed streams are written, once per interval)
but needs ``replay_buffer >= chunk rate * (every_s + write time)``. docs/operations.md has
the measured bytes per second per 1,000 active streams.

On a graceful stop the compute thread saves one last time, then :meth:`close` drops the
lease: the streams keep their checkpoints, and the next worker that gets one of their
requests claims it at once (no waiting for the lease to expire).

Example::

    redis_store = RedisStore.from_url("redis://10.0.0.7:6379/0")
    lease = LeaseKeeper(redis_store, "w1", info=lambda: {"endpoint": endpoint}).start()
    store = RedisStreamStore(redis_store, lease, model="m.keras")
    worker = StreamWorker(engine, WorkerConfig(name="w1"), store=store)
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from streamrnn.cluster.lease import DEFAULT_TTL_MS, LeaseKeeper
from streamrnn.cluster.redis_records import Claimed
from streamrnn.cluster.redis_store import RedisStore
from streamrnn.cluster.stream_blob import StreamBlob, decode_stream_blob, encode_stream_blob
from streamrnn.engine.interface import SupportsPins
from streamrnn.errors import CheckpointError
from streamrnn.serving.checkpoint import StreamRecord
from streamrnn.serving.durability import (
    DurableEngine,
    import_records,
    pack_reply,
    restore_pins,
)
from streamrnn.serving.sequencing import SequenceTable
from streamrnn.serving.store import WriteCadence

__all__ = ["DEFAULT_EVERY_S", "RATE_WINDOW_S", "RedisStreamStore", "open_worker_store"]

log = logging.getLogger("streamrnn.durable")

#: default seconds between writes (see the module docstring: the Client's replay window)
DEFAULT_EVERY_S = 1.0
#: bytes/s in STATS are measured over this many seconds
RATE_WINDOW_S = 10.0

_Signature = tuple[int, int | None]  # (next_seq, pin): what a write captured


class RedisStreamStore(WriteCadence):
    """One worker's streams in Redis (module docstring: the rules).

    Args:
        store: the Redis store.
        lease: this worker's started lease (its name and token fence every write).
        model: the model's name, stored in each blob (informational).
        every_s: write changed streams when this many seconds passed (0: not by time).
        every_steps: also write after this many batched steps (0: not by count).
        key: the checkpoint key (``--checkpoint-key``): blobs are signed with it and only
            blobs signed with it are restored; None: SHA-256 only.
    """

    def __init__(self, store: RedisStore, lease: LeaseKeeper, model: str = "",
                 every_s: float = DEFAULT_EVERY_S, every_steps: int = 0,
                 key: bytes | None = None):
        self._start_cadence(every_steps, every_s)
        self.store = store
        self.lease = lease
        self.name = lease.name
        self.model = model
        self.key = key
        self.where = f"{store.where} (worker {lease.name!r})"
        self.durable: dict[str, int] = {}
        self.written = 0
        self.last_bytes = 0
        self.last_seconds = 0.0
        self.last_streams = 0  # streams written (or released) by the last save
        self.bytes_total = 0
        self.refused = 0  # writes refused because another worker claimed the stream
        self.corrupt = 0  # claimed checkpoints that failed their checks
        self._epochs: dict[str, int] = {}  # held stream -> its claim's epoch
        self._signatures: dict[str, _Signature] = {}  # what each stream's last write held
        self._fresh: set[str] = set()  # acquired since the last save (not released yet)
        #: per stream, seq -> (cached reply, its packed form) of its last write
        self._packed: dict[str, dict[int, tuple[Any, list[Any]]]] = {}
        self._recent: deque[tuple[float, int]] = deque()  # (when, bytes) of recent writes

    # ---- holding -----------------------------------------------------------------------

    def lease_valid(self) -> bool:
        """True while the worker's lease is known to hold (local clock, no Redis call)."""
        return self.lease.valid()

    def holds(self, stream: str) -> bool:
        return stream in self._epochs

    def acquire(self, streams: Iterable[str], engine: DurableEngine,
                table: SequenceTable) -> set[str]:
        """Claim the streams not held yet and restore their checkpoints; returns the held
        ones. Raises StoreError when Redis cannot be reached."""
        wanted = list(dict.fromkeys(streams))
        new = [s for s in wanted if s not in self._epochs]
        if new:
            got = self.store.acquire_many(new, self.name, self.lease.token)
            for stream, result in got.items():
                if isinstance(result, Claimed):
                    self._claimed(stream, result, engine, table)
        return {s for s in wanted if s in self._epochs}

    def _claimed(self, stream: str, claim: Claimed, engine: DurableEngine,
                 table: SequenceTable) -> None:
        """Hold ``stream`` under ``claim``, restoring its checkpoint if it has one."""
        self._drop_local(stream, engine, table)  # nothing stale may survive a new claim
        if claim.blob is not None and stream not in engine and engine.capacity_left < 1:
            log.warning("claimed stream %r but there is no room to restore it: released",
                        stream)
            self.store.release(stream, self.name, self.lease.token, claim.epoch)
            return
        self._epochs[stream] = claim.epoch
        self._fresh.add(stream)
        if claim.blob is None:
            return
        try:
            blob = decode_stream_blob(claim.blob, stream, engine.state_layout,
                                      below_epoch=claim.epoch, key=self.key)
            import_records(self.where, {stream: blob.record}, engine, table)
        except CheckpointError as exc:
            # held, empty: its requests get UNKNOWN_STREAM / SEQ_GAP, never a wrong state
            self.corrupt += 1
            log.error("stream %r: its checkpoint in %s is unusable (%s); the stream starts "
                      "over empty", stream, self.where, exc)
            return
        if blob.pin is not None:
            restore_pins(self.where, {stream: blob.pin}, engine)
        next_seq = blob.record.next_seq
        self.durable[stream] = next_seq
        self._signatures[stream] = (next_seq, _pin_of(engine, stream))
        log.info("claimed stream %r (epoch %d) from its checkpoint at seq %d", stream,
                 claim.epoch, next_seq)

    def _drop_local(self, stream: str, engine: DurableEngine, table: SequenceTable) -> None:
        """Forget ``stream`` here (its slot, sequence entry and holding)."""
        if stream in engine:
            engine.close(stream)
        table.forget(stream)
        self._forget(stream)
        self._fresh.discard(stream)

    # ---- save --------------------------------------------------------------------------

    def save(self, engine: DurableEngine, table: SequenceTable) -> dict[str, int]:
        """Write the held streams that changed since their last write, in one fenced call.

        Call it between steps (compute thread). Raises StoreError (nothing changes here)
        when Redis cannot be reached. Returns :attr:`durable`.
        """
        began = time.monotonic()
        exported = table.export()
        pins = engine.pins() if isinstance(engine, SupportsPins) else {}
        items: list[tuple[str, int, bytes | None]] = []
        signatures: dict[str, _Signature] = {}
        for stream, epoch in self._epochs.items():
            entry = exported.get(stream)
            if entry is None:
                # closed, expired, or acquired and never applied (kept one interval)
                if stream not in self._fresh:
                    items.append((stream, epoch, None))
                continue
            signature = (entry[0], pins.get(stream))
            if self._signatures.get(stream) != signature:
                signatures[stream] = signature
        items += self._blobs(engine, table, exported, signatures, pins)
        results = self.store.save(self.name, self.lease.token, items) if items else {}
        self._fresh.clear()
        size = sum(len(blob) for _, _, blob in items if blob is not None)
        for stream, _epoch, blob in items:
            if blob is None:  # released (or already claimed by another worker)
                self._forget(stream)
            elif results[stream]:
                self._signatures[stream] = signatures[stream]
                self.durable[stream] = signatures[stream][0]
            else:
                self._refused(stream)
                self._drop_local(stream, engine, table)
        self._account(began, size, len(items))
        return self.durable

    def _blobs(self, engine: DurableEngine, table: SequenceTable, exported: dict,
               signatures: dict[str, _Signature], pins: dict[str, int]
               ) -> list[tuple[str, int, bytes | None]]:
        """The ``(stream, epoch, blob)`` writes of the changed streams."""
        if not signatures:
            return []
        owners = table.export_owners()  # the client identities the streams belong to
        states = engine.export_states()
        initial = engine.initial_state()
        layout = engine.state_layout
        version = int(engine.weights_version)
        items: list[tuple[str, int, bytes | None]] = []
        for stream in signatures:
            next_seq, replies = exported[stream]
            # a stream the engine does not hold (e.g. RESET before any PUSH) is initial
            state, steps = states.get(stream, (initial, 0))
            record = StreamRecord([np.asarray(r) for r in state], next_seq, steps,
                                  self._pack_replies(stream, replies),
                                  owners.get(stream))
            epoch = self._epochs[stream]
            items.append((stream, epoch, encode_stream_blob(StreamBlob(
                stream, epoch, record, layout, pins.get(stream), self.model, version),
                self.key)))
        return items

    def _pack_replies(self, stream: str, replies: list[tuple[int, Any]]) -> list[list[Any]]:
        """``replies`` packed (:func:`~streamrnn.serving.durability.pack_reply`), reusing
        what the stream's previous write packed: a write packs only the new replies."""
        before = self._packed.get(stream, {})
        now: dict[int, tuple[Any, list[Any]]] = {}
        for seq, reply in replies:
            known = before.get(seq)
            now[seq] = known if known is not None and known[0] is reply else \
                (reply, pack_reply(seq, reply))
        self._packed[stream] = now
        return [packed for _, packed in now.values()]

    def _refused(self, stream: str) -> None:
        self.refused += 1
        log.warning("checkpoint write of stream %r refused by %s: another worker claimed it "
                    "(epoch past %d); dropped here", stream, self.where,
                    self._epochs.get(stream, 0))

    def _forget(self, stream: str) -> None:
        """A released stream: not held any more (its local entries are gone already)."""
        for held in (self._epochs, self._signatures, self.durable, self._packed):
            held.pop(stream, None)

    def _account(self, began: float, size: int, streams: int) -> None:
        now = self._wrote()
        self.written += 1
        self.last_bytes = size
        self.last_streams = streams
        self.bytes_total += size
        self._recent.append((now, size))
        while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
            self._recent.popleft()
        self.last_seconds = now - began

    # ---- the rest of StreamStore -------------------------------------------------------

    def restore(self, engine: DurableEngine, table: SequenceTable) -> int:
        """Nothing to do on start: each stream is claimed (and restored) on its first
        request. Returns 0."""
        return 0

    def bytes_per_s(self, now: float | None = None) -> float:
        """Checkpoint bytes written per second over the last :data:`RATE_WINDOW_S`."""
        now = time.monotonic() if now is None else now
        recent = sum(size for when, size in self._recent if now - when <= RATE_WINDOW_S)
        return recent / RATE_WINDOW_S

    def report(self) -> dict[str, Any]:
        """STATS' extra ``checkpoint`` figures."""
        return {
            "backend": "redis",
            "held_streams": len(self._epochs),
            "bytes_total": self.bytes_total,
            "bytes_per_s": round(self.bytes_per_s(), 1),
            "streams_written": self.last_streams,
            "refused_writes": self.refused,
            "corrupt_checkpoints": self.corrupt,
            "lease_renewals": self.lease.renewals,
        }

    def close(self) -> None:
        """Drop the lease (after the last save): the streams keep their checkpoints and
        the next worker claims them at once."""
        self.lease.stop(drop=True)


def _pin_of(engine: DurableEngine, stream: str) -> int | None:
    return engine.pinned(stream) if isinstance(engine, SupportsPins) else None


def open_worker_store(url: str, name: str, info: Callable[[], dict], *,
                      ttl_ms: int = DEFAULT_TTL_MS, model: str = "",
                      every_s: float = DEFAULT_EVERY_S, every_steps: int = 0,
                      key: bytes | None = None) -> RedisStreamStore:
    """Connect to the store at ``url``, take worker ``name``'s lease (published with
    ``info()`` on every renew) and return its :class:`RedisStreamStore`.

    Raises StoreError when Redis cannot be reached, NameTakenError when a live worker of
    another incarnation has the name (after waiting up to two ttls for it to expire).
    """
    redis_store = RedisStore.from_url(url)
    redis_store.ping()
    lease = LeaseKeeper(redis_store, name, info, ttl_ms=ttl_ms).start()
    return RedisStreamStore(redis_store, lease, model, every_s, every_steps, key)
