"""Shared pytest setup: quiet TensorFlow logs, the Keras backend, and the ``worker`` /
``dealer`` fixtures over the session's shared worker process (a module may define its own
``worker``)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


@pytest.fixture(scope="module")
def worker():
    """The session's shared real worker process (tests/helpers/shared_worker.py)."""
    from tests.helpers.shared_worker import shared_worker

    return shared_worker()


@pytest.fixture
def dealer(worker):
    """A raw DEALER socket connected to ``worker`` (60 s receive timeout)."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 60_000)
    sock.connect(worker.endpoint)
    yield sock
    sock.close()
