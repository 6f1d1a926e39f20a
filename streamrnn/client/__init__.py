"""The ZeroMQ client: :class:`Client` (imports zmq, never TensorFlow)."""

from streamrnn.client.client import Client

__all__ = ["Client"]
