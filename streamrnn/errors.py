"""The streamrnn exception hierarchy (one module, like httpx).

Every exception carries an :class:`~streamrnn.protocol.ErrorCode` so that the same failure
reads the same in-process and over the wire.
"""

from __future__ import annotations

from streamrnn.protocol import ErrorCode

__all__ = [
    "CheckpointError",
    "EngineFullError",
    "ExecutorUnsupported",
    "ForbiddenError",
    "InvalidInputError",
    "NameTakenError",
    "NotSupportedError",
    "ProtocolError",
    "QuotaExceededError",
    "RemoteEngineFullError",
    "RemoteError",
    "RemoteInvalidInputError",
    "RemoteNotSupportedError",
    "RemoteUnknownStreamError",
    "RequestTimeoutError",
    "SequenceError",
    "StoreError",
    "StreamExpiredError",
    "StreamRNNError",
    "UnknownStreamError",
    "UnsupportedModelError",
    "WorkerBusyError",
    "remote_error",
]


class StreamRNNError(Exception):
    """Base class of every streamrnn error."""

    code: ErrorCode = ErrorCode.INTERNAL


class InvalidInputError(StreamRNNError, ValueError):
    """A chunk or request argument is unusable (shape, dtype, NaN, empty, ...)."""

    code = ErrorCode.BAD_VALUE

    def __init__(self, message: str, code: ErrorCode | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class UnsupportedModelError(StreamRNNError, ValueError):
    """The model contains a layer that cannot stream (names the layer)."""

    code = ErrorCode.NOT_SUPPORTED


class UnknownStreamError(StreamRNNError, KeyError):
    """A reset/close/generate names a stream the engine does not hold."""

    code = ErrorCode.UNKNOWN_STREAM

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown stream"


class NotSupportedError(StreamRNNError):
    """The worker or engine does not implement the requested operation (yet)."""

    code = ErrorCode.NOT_SUPPORTED


class EngineFullError(StreamRNNError):
    """Every slot is taken by a live stream."""

    code = ErrorCode.ENGINE_FULL


class StreamExpiredError(StreamRNNError):
    """The stream was expired (idle past the timeout); its state is gone."""

    code = ErrorCode.EXPIRED


class SequenceError(StreamRNNError):
    """A request's sequence number is not the next one expected for its stream."""

    code = ErrorCode.SEQ_GAP

    def __init__(self, message: str, expected: int, code: ErrorCode = ErrorCode.SEQ_GAP):
        super().__init__(message)
        self.expected = expected
        self.code = code


class ProtocolError(StreamRNNError):
    """A message cannot be decoded or violates the wire format."""

    code = ErrorCode.MALFORMED

    def __init__(self, message: str, code: ErrorCode = ErrorCode.MALFORMED,
                 context: dict | None = None):
        super().__init__(message)
        self.code = code
        # the well-typed request fields (rid, stream, seq) that could be read before the
        # failure, so that the ERROR reply can still be matched by the client
        self.context: dict = context or {}


class RemoteError(StreamRNNError):
    """An ERROR reply from a worker, raised on the client side."""

    def __init__(self, code: int, message: str, expected_seq: int | None = None):
        name = ErrorCode(code).name if code in ErrorCode._value2member_map_ else str(code)
        super().__init__(f"[{name}] {message}")
        self.code = code
        self.remote_message = message
        self.expected_seq = expected_seq


class ExecutorUnsupported(StreamRNNError):
    """An executor cannot run part of a model that streams (Keras still can).

    ``kind`` is a short category (``"masking"``, ``"custom cell"``, ``"dtype"``,
    ``"activation"``, ``"layer"``, ``"weights"``, ...); ``reason`` says which layer and why,
    for the engine to show when ``executor="auto"`` falls back to the Keras executor.
    """

    def __init__(self, kind: str, reason: str):
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


class CheckpointError(StreamRNNError):
    """A checkpoint file is missing, truncated, corrupted, or of another model."""


class StoreError(StreamRNNError):
    """The stream store (Redis) is unreachable, refused a call, or its URL is unusable."""

    code = ErrorCode.UNAVAILABLE


class NameTakenError(StoreError):
    """A live worker lease of another incarnation holds the worker name."""


class WorkerBusyError(StreamRNNError):
    """The worker kept answering BUSY past the client's retry budget."""

    code = ErrorCode.TIMEOUT


class RequestTimeoutError(StreamRNNError, TimeoutError):
    """No reply arrived within the client's timeout (after retries)."""

    code = ErrorCode.TIMEOUT


# ERROR replies raised on the client side: each is a RemoteError *and* the exception the
# in-process Engine would raise for the same failure, so `except UnknownStreamError` works
# the same in both places.


class RemoteInvalidInputError(RemoteError, InvalidInputError):
    """The worker rejected a chunk or argument (shape, dtype, NaN, empty, too large, ...)."""


class RemoteUnknownStreamError(RemoteError, UnknownStreamError):
    """The worker does not hold the stream."""


class RemoteEngineFullError(RemoteError, EngineFullError):
    """Every slot of the worker is taken."""


class RemoteNotSupportedError(RemoteError, NotSupportedError):
    """The worker does not support the request (e.g. GENERATE on this model)."""


class ForbiddenError(RemoteError):
    """The stream belongs to another client identity (its owner: the CURVE key or stream
    token that created it); nothing was applied and nothing about the stream is told."""


class QuotaExceededError(RemoteError):
    """This client identity has as many open streams as the worker allows it
    (``--max-streams-per-identity``); close one first."""


_REMOTE_CLASSES: dict[int, type[RemoteError]] = {
    ErrorCode.BAD_SHAPE: RemoteInvalidInputError,
    ErrorCode.BAD_DTYPE: RemoteInvalidInputError,
    ErrorCode.NON_FINITE: RemoteInvalidInputError,
    ErrorCode.EMPTY_CHUNK: RemoteInvalidInputError,
    ErrorCode.TOO_LARGE: RemoteInvalidInputError,
    ErrorCode.BAD_VALUE: RemoteInvalidInputError,
    ErrorCode.UNKNOWN_STREAM: RemoteUnknownStreamError,
    ErrorCode.ENGINE_FULL: RemoteEngineFullError,
    ErrorCode.NOT_SUPPORTED: RemoteNotSupportedError,
    ErrorCode.FORBIDDEN: ForbiddenError,
    ErrorCode.QUOTA_EXCEEDED: QuotaExceededError,
}


def remote_error(code: int, message: str, expected_seq: int | None = None) -> RemoteError:
    """The exception for an ERROR reply with ``code`` (a RemoteError subclass)."""
    return _REMOTE_CLASSES.get(code, RemoteError)(code, message, expected_seq)
