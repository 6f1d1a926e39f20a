"""A fake wire for the client's stream state machine (streamrnn.client.streams).

:class:`Wire` feeds :class:`~streamrnn.client.streams.Streams` events at chosen times,
applies the futures it resolves and records what it sends; a test plays the worker by
answering those sends (``wire.output(send)``, ``wire.error(send, code, expected)``).
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import numpy as np

from streamrnn.client.requests import Request, Send
from streamrnn.client.streams import Streams
from streamrnn.codec import Message
from streamrnn.protocol import (
    A_CHUNK,
    A_OUTPUT,
    F_CODE,
    F_DURABLE_SEQ,
    F_EXPECTED,
    F_MESSAGE,
    F_NEXT_SEQ,
    F_REQUEST_ID,
    F_SEQ,
    F_STREAM,
    ErrorCode,
    MessageType,
)


class Wire:
    """Streams plus a clock; ``sent`` holds the sends not answered yet by the test."""

    def __init__(self, window: int = 4, timeout: float = 1.0, retries: int = 2,
                 replay_buffer: int = 16, jitter: float = 0.5, batch: bool = False):
        self.streams = Streams("tcp://worker:1", timeout=timeout, retries=retries,
                               window=window, replay_buffer=replay_buffer, batch=batch,
                               jitter=lambda: jitter)
        self.counters = self.streams.counters
        self.now = 0.0
        self.sent: list[Send] = []

    def run(self, actions: list) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.sent.append(action)
            else:
                action.apply()

    def submit(self, *requests: Request) -> None:
        self.run(self.streams.submit(list(requests), self.now))

    def tick(self, dt: float = 0.0) -> None:
        self.now += dt
        self.run(self.streams.tick(self.now))

    def answer(self, send: Send, kind: MessageType, arrays: dict | None = None,
               **header: Any) -> None:
        rid = send.part[1][F_REQUEST_ID]
        self.run(self.streams.on_reply(Message(kind, {F_REQUEST_ID: rid, **header},
                                               arrays or {}), self.now))

    def output(self, send: Send, **header: Any) -> np.ndarray:
        y = np.full((1, 1), float(send.part[1][F_SEQ]), np.float32)
        self.answer(send, MessageType.OUTPUT, {A_OUTPUT: y}, **header)
        return y

    def error(self, send: Send, code: ErrorCode, expected: int | None = None) -> None:
        self.answer(send, MessageType.ERROR, **{F_CODE: int(code), F_MESSAGE: code.name,
                                                F_EXPECTED: expected})

    def take(self) -> list[Send]:
        sent, self.sent = self.sent, []
        return sent

    def open(self, stream: str = "s", next_seq: int = 0, **header: Any) -> None:
        """Answer the OPEN the first request of ``stream`` sent."""
        (send,) = [s for s in self.take() if s.part[0] == MessageType.OPEN]
        assert send.part[1][F_STREAM] == stream
        self.answer(send, MessageType.ACK, **{F_NEXT_SEQ: next_seq, **header})


def push(stream: str = "s") -> Request:
    return Request(MessageType.PUSH, stream, {}, {A_CHUNK: np.zeros((1, 2), np.float32)}, Future())


def kinds(sends: list[Send]) -> list[tuple[str, int | None]]:
    return [(s.part[0].name, s.part[1].get(F_SEQ)) for s in sends]


def started(wire: Wire, n: int, next_seq: int = 0, **ack: Any) -> list[Request]:
    """``n`` pushes on stream "s", after the OPEN that learns ``next_seq``."""
    requests = [push() for _ in range(n)]
    wire.submit(*requests)
    wire.open("s", next_seq, **ack)
    return requests


def restarted(wire: Wire, applied: int, durable: int,
              code: ErrorCode = ErrorCode.SEQ_GAP) -> tuple[list[Request], Request]:
    """``applied`` pushes answered with ``durable_seq = durable``, then one more that a
    restarted worker refuses with ``code``, expecting ``durable``: (the first, the last)."""
    requests = started(wire, applied)
    for send in wire.take():
        wire.output(send, **{F_DURABLE_SEQ: durable})
    late = push()
    wire.submit(late)
    wire.error(wire.take()[0], code, expected=durable)
    return requests, late



__all__ = ["Wire", "kinds", "push", "restarted", "started"]
