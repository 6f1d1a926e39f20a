"""Codec: round trips, every decoding failure's error code, and a hypothesis fuzz."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamrnn.codec import Message, decode_reply, decode_request, encode
from streamrnn.errors import ProtocolError
from streamrnn.protocol import (
    MAX_CHUNK_STEPS,
    MAX_FRAMES,
    MAX_HEADER_BYTES,
    ErrorCode,
    MessageType,
)
from tests.helpers.codec_strategies import STRUCTURED_HEADER, encoded

X = np.arange(12, dtype=np.float32).reshape(4, 3)


def push_frames(**header) -> list:
    base = {"rid": 1, "stream": "s", "seq": 0}
    base.update(header)
    return encode(MessageType.PUSH, base, {"chunk": X})


def packed(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def test_push_round_trip_is_zero_copy_and_exact():
    frames = push_frames()
    msg = decode_request(frames)
    assert msg.type is MessageType.PUSH
    assert msg.header["stream"] == "s" and msg.header["seq"] == 0 and msg.header["v"] == 1
    np.testing.assert_array_equal(msg.arrays["chunk"], X)
    assert np.shares_memory(msg.arrays["chunk"], frames[2])  # a view over the frame, no copy


@pytest.mark.parametrize("dtype", ["float16", "float64", "int8", "int32", "int64", "uint8",
                                   "bool"])
def test_allowed_dtypes_round_trip(dtype):
    array = (np.arange(6) % 2).astype(dtype)
    msg = decode_request(encode(MessageType.PUSH, {"stream": "s", "seq": 0}, {"chunk": array}))
    assert msg.arrays["chunk"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(msg.arrays["chunk"], array)


def test_big_endian_and_non_contiguous_arrays_are_normalised():
    array = np.arange(20, dtype=">f4").reshape(4, 5)[:, ::2]
    msg = decode_request(encode(MessageType.PUSH, {"stream": "s", "seq": 0}, {"chunk": array}))
    np.testing.assert_array_equal(msg.arrays["chunk"], array)


def test_reply_round_trip():
    frames = encode(MessageType.OUTPUT, {"rid": 3, "stream": "s", "seq": 2, "steps": 4},
                    {"output": X})
    msg = decode_reply(frames)
    assert msg.type is MessageType.OUTPUT and msg.header["rid"] == 3
    with pytest.raises(ProtocolError):
        decode_request(frames)  # a reply type is not a request


def bad(frames, code, context=None):
    with pytest.raises(ProtocolError) as info:
        decode_request(frames)
    assert info.value.code == code, str(info.value)
    if context is not None:
        assert info.value.context == context
    return info.value


def test_too_few_frames():
    bad([b"\x02"], ErrorCode.MALFORMED)
    bad([], ErrorCode.MALFORMED)


def test_type_frame_must_be_one_known_byte():
    frames = push_frames()
    bad([b"\x7f", *frames[1:]], ErrorCode.MALFORMED, {"rid": 1, "stream": "s", "seq": 0})
    bad([b"\x02\x02", *frames[1:]], ErrorCode.MALFORMED)
    bad([b"\x81", *frames[1:]], ErrorCode.MALFORMED)  # a reply type


def test_bad_msgpack_and_non_map_header():
    bad([b"\x02", b"\xc1"], ErrorCode.MALFORMED)
    bad([b"\x02", packed({"v": 1}) + b"extra"], ErrorCode.MALFORMED)
    bad([b"\x02", packed([1, 2, 3])], ErrorCode.MALFORMED)
    bad([b"\x02", packed({1: 2})], ErrorCode.MALFORMED)  # strict_map_key: keys are strings


def test_missing_and_ill_typed_fields():
    bad([b"\x02", packed({"v": 1, "stream": "s"})], ErrorCode.MALFORMED)  # no seq
    bad([b"\x03", packed({"v": 1, "stream": "s", "seq": True})], ErrorCode.MALFORMED)
    bad([b"\x03", packed({"v": 1, "stream": b"s", "seq": 0})], ErrorCode.MALFORMED)
    bad([b"\x03", packed({"v": 1.0, "stream": "s", "seq": 0})], ErrorCode.MALFORMED)
    bad([b"\x03", packed({"stream": "s", "seq": 0})], ErrorCode.MALFORMED)  # no v


def test_out_of_range_values():
    bad([b"\x03", packed({"v": 1, "stream": "s", "seq": -1})], ErrorCode.BAD_VALUE)
    bad([b"\x03", packed({"v": 1, "stream": "s", "seq": 2**63})], ErrorCode.BAD_VALUE)
    bad([b"\x03", packed({"v": 1, "stream": "", "seq": 0})], ErrorCode.BAD_VALUE)
    bad([b"\x03", packed({"v": 1, "stream": "x" * 257, "seq": 0})], ErrorCode.BAD_VALUE)
    bad([b"\x03", packed({"v": 1, "rid": -5, "stream": "s", "seq": 0})], ErrorCode.BAD_VALUE)


def test_unsupported_version():
    err = bad([b"\x03", packed({"v": 99, "rid": 4, "stream": "s", "seq": 0})],
              ErrorCode.UNSUPPORTED_VERSION)
    assert err.context["rid"] == 4
    # PING is accepted at any version: it is how versions are negotiated
    assert decode_request([b"\x07", packed({"v": 99, "versions": [1, 99]})]).type is (
        MessageType.PING)


def test_dtype_not_allowed():
    header = {"v": 1, "stream": "s", "seq": 0,
              "arrays": {"chunk": {"dtype": "complex64", "shape": [1], "frame": 0}}}
    bad([b"\x02", packed(header), b"\0" * 8], ErrorCode.BAD_DTYPE)
    header["arrays"]["chunk"]["dtype"] = "object"
    bad([b"\x02", packed(header), b"\0" * 8], ErrorCode.BAD_DTYPE)


def test_shape_and_buffer_size_mismatch():
    frames = push_frames()
    bad([*frames[:2], frames[2].tobytes()[:-1]], ErrorCode.BAD_SHAPE)  # truncated array
    bad([*frames[:2], frames[2].tobytes() + b"\0"], ErrorCode.BAD_SHAPE)
    bad(frames[:2], ErrorCode.MALFORMED)  # the array frame is missing
    header = {"v": 1, "stream": "s", "seq": 0,
              "arrays": {"chunk": {"dtype": "float32", "shape": [1, 1, 1, 1, 1], "frame": 0}}}
    bad([b"\x02", packed(header), b"\0" * 4], ErrorCode.BAD_SHAPE)  # too many dims
    header["arrays"]["chunk"]["shape"] = [-1]
    bad([b"\x02", packed(header), b"\0" * 4], ErrorCode.BAD_SHAPE)
    three_d = encode(MessageType.PUSH, {"stream": "s", "seq": 0},
                     {"chunk": np.zeros((1, 2, 3), np.float32)})
    bad(three_d, ErrorCode.BAD_SHAPE)


def test_array_descriptor_frame_index_must_match():
    header = {"v": 1, "stream": "s", "seq": 0,
              "arrays": {"chunk": {"dtype": "float32", "shape": [1], "frame": 3}}}
    bad([b"\x02", packed(header), b"\0" * 4], ErrorCode.MALFORMED)
    bad([b"\x02", packed({"v": 1, "stream": "s", "seq": 0, "arrays": []}), b"x"],
        ErrorCode.MALFORMED)
    reset = encode(MessageType.RESET, {"stream": "s", "seq": 0}, {"chunk": X})
    bad(reset, ErrorCode.MALFORMED)  # RESET takes no arrays


def test_size_limits():
    bad(push_frames() + [b""] * MAX_FRAMES, ErrorCode.TOO_LARGE)
    huge_header = packed({"v": 1, "stream": "s", "seq": 0, "pad": "x" * 4000,
                          "more": ["y" * 4000] * 20})
    assert len(huge_header) > MAX_HEADER_BYTES
    bad([b"\x03", huge_header], ErrorCode.TOO_LARGE)
    long_chunk = np.zeros((MAX_CHUNK_STEPS + 1,), np.int32)
    bad(encode(MessageType.PUSH, {"stream": "s", "seq": 0}, {"chunk": long_chunk}),
        ErrorCode.TOO_LARGE)


def test_generate_fields_are_checked():
    prompt = {"prompt": np.zeros(3, np.int32)}
    ok = decode_request(encode(MessageType.GENERATE, {"stream": "g", "seq": 0, "steps": 5,
                                                      "sample": "top_k", "top_k": 3}, prompt))
    assert ok.header["steps"] == 5
    for fields in [{"steps": 0}, {"steps": 5, "sample": "beam"},
                   {"steps": 5, "temperature": 0.0}, {"steps": 5, "top_k": 0}]:
        with pytest.raises(ProtocolError) as info:
            decode_request(encode(MessageType.GENERATE, {"stream": "g", "seq": 0, **fields},
                                  prompt))
        assert info.value.code == ErrorCode.BAD_VALUE


# ---- fuzz ------------------------------------------------------------------------------

FRAME_LISTS = st.one_of(
    st.lists(st.binary(max_size=64), max_size=8),  # pure noise
    st.tuples(st.sampled_from([bytes([t]) for t in range(0, 256, 1)]),
              STRUCTURED_HEADER.map(encoded),
              st.lists(st.binary(max_size=48), max_size=4)).map(
        lambda t: [t[0], t[1], *t[2]]),
)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(FRAME_LISTS)
def test_fuzz_decoder_gives_message_or_clean_protocol_error(frames):
    for decode in (decode_request, decode_reply):
        try:
            msg = decode(frames)
        except ProtocolError as exc:
            assert isinstance(exc.code, ErrorCode)
            assert isinstance(exc.context, dict)
        else:
            assert isinstance(msg, Message)
            assert isinstance(msg.header, dict)
            for array in msg.arrays.values():
                assert isinstance(array, np.ndarray)


def test_undeclared_fields_are_ignored_whatever_their_type():
    # found by the decoder fuzz: a STATS request carrying an int 'stream' crashed the
    # range checks, which looked at fields the message type does not declare
    header = msgpack.packb({"v": 1, "stream": 5, "seq": -3}, use_bin_type=True)
    msg = decode_request([bytes([MessageType.STATS]), header])
    assert msg.type == MessageType.STATS


def test_envelope_payload_is_aligned_and_its_gaps_are_zeros():
    from streamrnn.codec import encode_batch

    arrays = [np.full((3,), 7, np.int8), np.full((5, 3), -1.0, np.float32), np.ones(2, bool)]
    frames = encode_batch(MessageType.BATCH, [
        (MessageType.PUSH, {"stream": f"s{i}", "seq": 0}, {"chunk": a})
        for i, a in enumerate(arrays)])
    payload = bytes(frames[2])
    regions = [r for part in msgpack.unpackb(frames[1])["parts"] for r in part[2]]
    assert [offset % 16 for offset, _ in regions] == [0, 0, 0]
    used = bytearray(len(payload))
    for (offset, nbytes), array in zip(regions, arrays, strict=True):
        assert payload[offset:offset + nbytes] == array.tobytes()
        used[offset:offset + nbytes] = b"\1" * nbytes
    assert all(b == 0 for b, u in zip(payload, used, strict=True) if not u)  # no stale memory
