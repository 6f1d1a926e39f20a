"""Published weights files from elsewhere (issue 16, item 5): a pickled array or weights of
the wrong shape are logged once, clearly, and the follower keeps serving what it has; with
a key, only weights signed with it are loaded."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import streamrnn
from streamrnn.engine.weights import (
    LATEST,
    WeightsFollower,
    load_weights,
    publish_weights,
    weights_filename,
)
from streamrnn.errors import InvalidInputError
from tests.helpers.weights_helpers import D, model_with_seed

KEY = b"a checkpoint key of 32 bytes...."


@pytest.fixture
def follower(tmp_path):
    """A follower serving published version 1 (model seed 1), polling on every step."""
    publish_weights(tmp_path, model_with_seed(1).get_weights(), 1)
    engine = streamrnn.Engine.from_keras(model_with_seed(0), slots=2, jit_compile=False)
    return WeightsFollower(engine, tmp_path, poll_s=0.0)


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "streamrnn.weights" and r.levelno >= logging.WARNING]


def _publish_pickled(directory, version: int) -> None:
    """A weights file whose w0 is a pickled object array (np.savez pickles those)."""
    weights = model_with_seed(2).get_weights()
    with open(directory / weights_filename(version), "wb") as f:
        np.savez(f, w0=np.array([object()], dtype=object),
                 **{f"w{i}": w for i, w in enumerate(weights) if i},
                 meta=np.frombuffer(b"{}", np.uint8))
    (directory / LATEST).write_text(weights_filename(version))


@pytest.mark.parametrize("bad", ["pickled", "wrong shape", "not numbers"])
def test_a_bad_version_is_logged_once_and_the_follower_keeps_serving(
        follower, tmp_path, caplog, bad):
    x = np.ones((3, D), np.float32)
    if bad == "pickled":
        _publish_pickled(tmp_path, 2)
    elif bad == "wrong shape":
        weights = model_with_seed(2).get_weights()
        publish_weights(tmp_path, [*weights[:-1], np.zeros(7, np.float32)], 2)
    else:
        publish_weights(tmp_path, [np.array(["x"] * 3)] * 8, 2)
    caplog.set_level(logging.INFO)
    for _ in range(5):
        assert follower.push("a", x).shape == (3, 2)  # every poll sees v2; no exception
    assert follower.weights_version == 1
    (line,) = _errors(caplog)
    assert "weights version 2" in line and "cannot be served" in line
    assert "still serving weights version 1" in line
    assert not any(r.exc_info for r in caplog.records)  # no traceback
    # a good version 3 is still taken
    publish_weights(tmp_path, model_with_seed(3).get_weights(), 3)
    follower.push("a", x)
    assert follower.weights_version == 3 and len(_errors(caplog)) == 1


def test_a_pickled_array_is_a_clear_error(tmp_path):
    _publish_pickled(tmp_path, 1)
    with pytest.raises(InvalidInputError, match="cannot be read safely.*pickle"):
        load_weights(tmp_path, 1)


def test_with_a_key_only_signed_weights_are_loaded(tmp_path, caplog):
    w1, w2 = model_with_seed(1).get_weights(), model_with_seed(2).get_weights()
    publish_weights(tmp_path, w1, 1, key=KEY)
    loaded, _ = load_weights(tmp_path, 1, key=KEY)
    assert all(np.array_equal(a, b) for a, b in zip(loaded, w1, strict=True))
    assert len(load_weights(tmp_path, 1)[0]) == len(w1)  # no key: read as before
    with pytest.raises(InvalidInputError, match="fails its HMAC check"):
        load_weights(tmp_path, 1, key=b"another key of 32 bytes........!")
    publish_weights(tmp_path, w2, 2)  # unsigned
    with pytest.raises(InvalidInputError, match="not signed"):
        load_weights(tmp_path, 2, key=KEY)
    engine = streamrnn.Engine.from_keras(model_with_seed(0), slots=2, jit_compile=False)
    caplog.set_level(logging.INFO)
    follower = WeightsFollower(engine, tmp_path, poll_s=0.0, key=KEY)
    assert follower.weights_version == 0  # v2 (LATEST) is unsigned: refused, logged
    (line,) = _errors(caplog)
    assert "not signed" in line
    publish_weights(tmp_path, w2, 3, key=KEY)
    assert follower.poll() and follower.weights_version == 3
