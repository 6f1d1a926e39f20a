"""The public surface: what ``import streamrnn`` exports, and that it stays light."""

from __future__ import annotations

import subprocess
import sys

import streamrnn
import streamrnn.errors

EXPECTED = [
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


def test_all_is_pinned_and_sorted():
    assert streamrnn.__all__ == EXPECTED
    assert sorted(streamrnn.__all__) == streamrnn.__all__


def test_every_exported_name_resolves():
    for name in streamrnn.__all__:
        assert getattr(streamrnn, name) is not None, name
    assert streamrnn.Engine.__module__ == "streamrnn.engine.engine"
    assert streamrnn.Client.__module__ == "streamrnn.client.client"


def test_unknown_attribute_is_an_attribute_error():
    try:
        streamrnn.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("streamrnn.NoSuchThing resolved")


def test_every_public_exception_derives_from_streamrnn_error():
    for name in streamrnn.__all__:
        obj = getattr(streamrnn, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, streamrnn.StreamRNNError), name
    # and every exception class of errors.py is reachable from the public surface's root
    for name, obj in vars(streamrnn.errors).items():
        if isinstance(obj, type) and issubclass(obj, BaseException) and obj.__module__ == \
                "streamrnn.errors":
            assert issubclass(obj, streamrnn.StreamRNNError), name


def test_import_streamrnn_starts_no_tensorflow_and_no_zmq():
    code = ("import sys, streamrnn, streamrnn.errors, streamrnn.protocol, streamrnn.codec; "
            "bad = sorted(m for m in ('tensorflow', 'keras', 'zmq') if m in sys.modules); "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "", f"importing streamrnn loaded {out}"


def test_client_imports_no_tensorflow():
    code = ("import sys; from streamrnn import Client; "
            "print(','.join(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "", f"the client loaded {out}"
