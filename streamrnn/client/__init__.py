"""The ZeroMQ client: :class:`Client` (imports zmq, never TensorFlow).

Rooms: ``client`` (the :class:`Client` facade), ``transport`` (the DEALER socket and its
I/O thread; with several router endpoints it moves to the next when one fails),
``streams`` (the per-stream state machine: window, go-back-N, replay; pure),
``windows`` (its numbering and resend mechanics; pure) and ``requests`` (the requests,
stream state and actions they exchange; pure). :class:`Client` is loaded lazily, so that
importing a pure room does not import zmq.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamrnn.client.client import Client

__all__ = ["Client"]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from streamrnn.client.client import Client

        return Client
    raise AttributeError(f"module 'streamrnn.client' has no attribute {name!r}")
