"""streamrnn: serve recurrent Keras models over unbounded streams.

Importing the package starts nothing: TensorFlow is imported only when an :class:`Engine`
is built, so the client side and the pure modules stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from streamrnn.errors import (
    CheckpointError,
    EngineFullError,
    ForbiddenError,
    InvalidInputError,
    NameTakenError,
    NotSupportedError,
    ProtocolError,
    QuotaExceededError,
    RemoteError,
    RequestTimeoutError,
    SequenceError,
    StoreError,
    StreamExpiredError,
    StreamRNNError,
    UnknownStreamError,
    UnsupportedModelError,
    WorkerBusyError,
)

if TYPE_CHECKING:
    from streamrnn.client.client import Client
    from streamrnn.engine.engine import Engine

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Client",
    "Engine",
    "EngineFullError",
    "ForbiddenError",
    "InvalidInputError",
    "NameTakenError",
    "NotSupportedError",
    "ProtocolError",
    "QuotaExceededError",
    "RemoteError",
    "RequestTimeoutError",
    "SequenceError",
    "StoreError",
    "StreamExpiredError",
    "StreamRNNError",
    "UnknownStreamError",
    "UnsupportedModelError",
    "WorkerBusyError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # Lazy so that `import streamrnn` does not import TensorFlow (Engine) or zmq (Client).
    if name == "Engine":
        from streamrnn.engine import Engine

        return Engine
    if name == "Client":
        from streamrnn.client import Client

        return Client
    raise AttributeError(f"module 'streamrnn' has no attribute {name!r}")
