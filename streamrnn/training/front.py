"""LogFront: the trainer's front when training goes through a durable log.

:class:`LogFront` plays "engine" for the trainer's
:class:`~streamrnn.serving.worker.StreamWorker` (same protocol, same exactly-once sequence
numbers as without a log), but a PUSH does not train: the worker's compute thread calls
:meth:`LogFront.push_many`, which appends the chunks to the
:class:`~streamrnn.training.chunk_log.ChunkLog` and returns once they are durable. The
reply is an OUTPUT whose ``output`` is empty, ``(0, output_dim)`` float32 (``steps`` is
the chunk's length): the chunk is in the log and will be trained exactly once, later, by
the :class:`~streamrnn.training.consumer.LogConsumer`. RESET and CLOSE are appended too, so
the consumer applies every stream's requests in order.

Sequence numbers live in the log (:meth:`ChunkLog.sequences`): :meth:`LogFront.attach` puts
them back into the worker's sequence table when the trainer starts, with the replies a
resent request is answered with, so a client that resends a chunk the crashed trainer had
appended but not answered gets its reply and the chunk is not appended again. The front
keeps the slot rule of the trainer: at most ``slots`` streams are open in the log.

Example::

    front = LogFront(online, RedisChunkLog(client, consumer="t1"))
    worker = StreamWorker(front, WorkerConfig(bind="tcp://127.0.0.1:5560", coalesce_steps=0))
    front.attach(worker.sequences)       # before worker.start()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from streamrnn.engine.interface import EngineLike
from streamrnn.protocol import (
    A_OUTPUT,
    F_NEXT_SEQ,
    F_SEQ,
    F_STEPS,
    F_STREAM,
    MessageType,
)
from streamrnn.training.chunk_log import ChunkLog, LogRecord, RecordKind, SequenceBook
from streamrnn.training.online import OnlineTrainer

__all__ = ["LogFront"]


class LogFront(EngineLike):
    """An EngineLike that appends training requests to ``log`` instead of training.

    Driven by the worker's compute thread (validation by its I/O thread, as for every
    engine). ``online`` gives the model's facts and the chunk checks; it is trained by the
    consumer's thread, never here.
    """

    def __init__(self, online: OnlineTrainer, log: ChunkLog):
        self.online = online
        self.log = log
        self._book: SequenceBook | None = None
        self._open: set[str] = set()  # streams open in the log
        self.appended = 0  # records appended by this process

    def attach(self, book: SequenceBook) -> int:
        """Before serving: put every stream's next seq (and replayable replies) from the log
        into ``book`` (the worker's sequence table); returns how many streams."""
        self._book = book
        for stream, (next_seq, recent) in self.log.sequences().items():
            first = next_seq - len(recent)
            book.restore(stream, next_seq, [(first + i, self._reply(stream, first + i, steps))
                                            for i, steps in enumerate(recent)])
            self._open.add(stream)
        return len(self._open)

    def _reply(self, stream: str, seq: int, steps: int) -> tuple[Any, ...]:
        """The reply the front gave to record ``seq`` (a PUSH of ``steps`` or a RESET)."""
        if steps:
            return (MessageType.OUTPUT, {F_STREAM: stream, F_SEQ: seq, F_STEPS: steps},
                    {A_OUTPUT: self._empty()})
        return MessageType.ACK, {F_STREAM: stream, F_SEQ: seq, F_NEXT_SEQ: seq + 1}, {}

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.online.output_dim), np.float32)

    def _append(self, kind: RecordKind, chunks: Mapping[str, Any]) -> None:
        book = self._book
        if book is None:
            raise RuntimeError("LogFront.attach(worker sequence table) was not called")
        records = [LogRecord(s, book.next_seq(s), kind,
                             None if c is None else np.ascontiguousarray(c))
                   for s, c in chunks.items()]
        self.log.append(records)
        self.appended += len(records)

    # ---- EngineLike: facts -------------------------------------------------------------

    @property
    def slots(self) -> int:
        return self.online.slots

    @property
    def max_streams(self) -> int:
        return self.online.slots

    @property
    def capacity_left(self) -> int:
        return max(0, self.online.slots - len(self._open))

    @property
    def streams(self) -> list[str]:
        return sorted(self._open)

    @property
    def input_kind(self) -> str:
        return self.online.input_kind

    @property
    def input_dim(self) -> int:
        return self.online.input_dim

    @property
    def output_dim(self) -> int:
        return self.online.output_dim

    @property
    def weights_version(self) -> int:
        return self.online.weights_version

    def __contains__(self, stream: object) -> bool:
        return stream in self._open

    def is_resident(self, stream: str) -> bool:
        return stream in self._open

    def stats(self) -> dict[str, Any]:
        """The trainer's stats (read from this thread; counters only) plus the front's."""
        stats = self.online.stats()
        return {**stats, "streams": len(self._open), "free_slots": self.capacity_left,
                "appended": self.appended, "kernel": "trainer (durable log)"}

    # ---- EngineLike: requests (appended, trained later by the consumer) --------------

    def validate(self, chunk: Any) -> np.ndarray:
        return self.online.validate(chunk)

    def push(self, stream: str, chunk: Any) -> np.ndarray:
        return self.push_many({stream: chunk})[stream]

    def push_many(self, chunks: Mapping[str, Any], *, validated: bool = False
                  ) -> dict[str, np.ndarray]:
        """Append one chunk per stream (durable on return); each answer is empty."""
        if not validated:
            chunks = {s: self.validate(c) for s, c in chunks.items()}
        self._append("push", chunks)
        self._open.update(chunks)
        return {s: self._empty() for s in chunks}

    def reset(self, stream: str) -> None:
        self._append("reset", {stream: None})

    def close(self, stream: str) -> None:
        self._append("close", {stream: None})
        self._open.discard(stream)
