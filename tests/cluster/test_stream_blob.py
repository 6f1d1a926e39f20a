"""A stream's checkpoint blob (streamrnn.cluster.stream_blob): round trip and strict checks.

Pure: no Redis, no TensorFlow.
"""

from __future__ import annotations

import numpy as np
import pytest

from streamrnn.cluster.stream_blob import StreamBlob, decode_stream_blob, encode_stream_blob
from streamrnn.errors import CheckpointError
from streamrnn.protocol import MessageType
from streamrnn.serving.checkpoint import StreamRecord
from streamrnn.serving.durability import pack_reply

LAYOUT = [("float32", (4,)), ("float32", (4,))]
KEY = b"k" * 32
OWNER = "token:" + "ab" * 32  # the client identity the stream belongs to


def _blob(stream: str = "a", epoch: int = 3) -> StreamBlob:
    state = [np.arange(4, dtype=np.float32), np.ones(4, dtype=np.float32)]
    reply = (MessageType.OUTPUT, {"stream": stream, "seq": 6},
             {"output": np.zeros((2, 3), np.float32)})
    return StreamBlob(stream, epoch, StreamRecord(state, 7, 12, [pack_reply(6, reply)],
                                                  OWNER), LAYOUT, pin=2, model="m")


def test_blob_round_trip_keeps_every_field():
    data = encode_stream_blob(_blob())
    got = decode_stream_blob(data, "a", LAYOUT, below_epoch=4)
    assert (got.stream, got.epoch, got.pin, got.model) == ("a", 3, 2, "m")
    assert (got.record.next_seq, got.record.steps, got.record.owner) == (7, 12, OWNER)
    np.testing.assert_array_equal(got.record.state[0], np.arange(4, dtype=np.float32))
    assert got.record.replies[0][0] == 6


@pytest.mark.parametrize("damage, match", [
    (lambda d: d[:-1], "truncated"),
    (lambda d: d[:60] + bytes([d[60] ^ 1]) + d[61:], "SHA-256"),
    (lambda d: b"SRNNCKPT" + d[8:], "bad magic"),
    (lambda d: d[:10], "truncated"),
])
def test_damaged_blob_is_refused(damage, match):
    with pytest.raises(CheckpointError, match=match):
        decode_stream_blob(damage(encode_stream_blob(_blob())), "a", LAYOUT)


def test_blob_of_another_stream_model_or_a_newer_epoch_is_refused():
    data = encode_stream_blob(_blob())
    with pytest.raises(CheckpointError, match="holds stream 'a'"):
        decode_stream_blob(data, "b", LAYOUT)
    with pytest.raises(CheckpointError, match="another model"):
        decode_stream_blob(data, "a", [("float32", (8,)), ("float32", (8,))])
    with pytest.raises(CheckpointError, match="not below"):
        decode_stream_blob(data, "a", LAYOUT, below_epoch=3)


def test_signed_blob_needs_its_key():
    signed = encode_stream_blob(_blob(), KEY)
    assert decode_stream_blob(signed, "a", LAYOUT, key=KEY).epoch == 3
    with pytest.raises(CheckpointError):
        decode_stream_blob(signed, "a", LAYOUT, key=b"x" * 32)
    with pytest.raises(CheckpointError):
        decode_stream_blob(encode_stream_blob(_blob()), "a", LAYOUT, key=KEY)
