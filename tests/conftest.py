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


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real ``redis-server`` for the whole run (tests/helpers/redis_server.py): a free
    loopback port, append-only, killed at the end. Missing server: the test fails (with
    how to install it), never skips."""
    from tests.helpers.redis_server import start_server

    try:
        server = start_server(tmp_path_factory.mktemp("redis"))
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    """The session server's URL, ``redis://127.0.0.1:<port>/0``."""
    return redis_server.url


@pytest.fixture
def redis_store(redis_url):
    """A RedisStore on the session server under a fresh key prefix (its keys are deleted
    afterwards)."""
    import uuid

    from streamrnn.cluster.redis_store import RedisStore

    store = RedisStore.from_url(redis_url, prefix=f"t{uuid.uuid4().hex[:12]}")
    yield store
    keys = list(store.client.scan_iter(match=f"{store.prefix}:*", count=1000))
    if keys:
        store.client.delete(*keys)
    store.close()
