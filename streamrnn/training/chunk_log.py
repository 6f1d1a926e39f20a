"""What durable training needs, declared here and implemented elsewhere: the chunk log.

A trainer started with a store (``streamrnn trainer --store redis://...``) does not train
a PUSH when it arrives. Its front (:class:`~streamrnn.training.front.LogFront`) appends the
request to a durable, ordered :class:`ChunkLog` and answers once it is there; a consumer
(:class:`~streamrnn.training.consumer.LogConsumer`) reads the log, trains in batched steps,
checkpoints, and only then acknowledges what the checkpoint covers. The Redis
implementation is :class:`streamrnn.cluster.training_log.RedisChunkLog` (a Redis Stream
with the consumer group ``trainers``); ``streamrnn trainer`` wires it.

Records: ``push`` (a training chunk ``(T, D)`` float or ``(T,)`` int ids; with
``--paired`` ``(T, D + out)`` or ``(T, 2)``), ``reset`` and ``close``, each with the
stream's sequence number. Appending is idempotent per ``(stream, seq)``: the log keeps each
stream's next sequence number next to the entries (and, for the reply cache, the kind of
its last :data:`~streamrnn.protocol.REPLY_CACHE_SIZE` records), so a front that restarts
after a crash learns where every stream stands, and a chunk resent by a client is never
appended twice.

Entry ids are the log's (``"<ms>-<n>"``, increasing); :func:`entry_key` orders them.

Example::

    log.append([LogRecord("s1", 0, "push", chunk)])     # durable when it returns
    entries = log.read(count=256, block_ms=200)         # [LogEntry("1700000000000-0", ...)]
    log.ack([e.id for e in entries])                    # after a checkpoint covers them
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "ChunkLog",
    "LogEntry",
    "LogRecord",
    "RecordKind",
    "SequenceBook",
    "entry_key",
]

RecordKind = Literal["push", "reset", "close"]


@dataclass(frozen=True)
class LogRecord:
    """One sequenced request of a training stream, as the front appends it.

    Attributes:
        stream: the stream id.
        seq: its sequence number.
        kind: ``"push"``, ``"reset"`` or ``"close"``.
        chunk: the PUSH's chunk (``(T, D)`` or ``(T,)``); None for reset and close.
    """

    stream: str
    seq: int
    kind: RecordKind
    chunk: np.ndarray | None = None

    @property
    def steps(self) -> int:
        """The chunk's timesteps (0 for reset and close)."""
        return 0 if self.chunk is None else int(len(self.chunk))


@dataclass(frozen=True)
class LogEntry:
    """One entry read back from the log: its id and its record, or why it is unusable
    (``record`` None, ``problem`` says why: a deleted or malformed entry)."""

    id: str
    record: LogRecord | None
    problem: str = ""


def entry_key(entry_id: str) -> tuple[int, int]:
    """``"<ms>-<n>"`` -> ``(ms, n)``, the order of the log."""
    ms, _, n = entry_id.partition("-")
    return int(ms), int(n or 0)


@runtime_checkable
class ChunkLog(Protocol):
    """A durable, ordered log of training requests with one reader at a time.

    The front calls :meth:`append` and :meth:`sequences`; the consumer calls the rest.
    """

    def append(self, records: Sequence[LogRecord]) -> list[str]:
        """Append ``records`` (durable when this returns); returns their entry ids.

        A record whose ``seq`` is below its stream's next one is already in the log and is
        not appended again (its id is ``""``); one above it raises
        :class:`~streamrnn.errors.StoreError`.
        """

    def sequences(self) -> dict[str, tuple[int, list[int]]]:
        """stream -> ``(next_seq, steps of its last records)``, oldest first (0: a reset),
        for every stream open in the log."""

    def claim_stale(self, min_idle_ms: int) -> int:
        """Take over the entries other readers got but never acknowledged, once idle for
        ``min_idle_ms``; returns how many such entries others still hold."""

    def pending(self, after: str, count: int) -> list[LogEntry]:
        """Entries this reader got (or claimed) and has not acknowledged, ids above
        ``after`` (``"0-0"``: from the start), in log order."""

    def read(self, count: int, block_ms: int) -> list[LogEntry]:
        """Up to ``count`` entries no reader has got yet, waiting up to ``block_ms``
        (0: do not wait)."""

    def ack(self, ids: Sequence[str]) -> None:
        """Done with ``ids`` (a checkpoint covers them): the log may drop them."""


@runtime_checkable
class SequenceBook(Protocol):
    """A worker's per-stream sequence numbers, as the trainer keeps and restores them
    (:class:`streamrnn.serving.sequencing.SequenceTable` is one)."""

    def next_seq(self, stream: str) -> int:
        """The next seq the stream expects (0 for an unknown stream)."""

    def export(self) -> dict[str, tuple[int, list[tuple[int, Any]]]]:
        """Every held stream's ``(next_seq, cached replies)``."""

    def restore(self, stream: str, next_seq: int, replies: Any = ()) -> None:
        """Hold ``stream`` at ``next_seq`` with ``[(seq, reply), ...]`` cached."""
