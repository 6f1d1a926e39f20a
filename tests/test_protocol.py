"""Protocol constants, version negotiation and the exactly-once sequence table (no TF)."""

from __future__ import annotations

from streamrnn.protocol import (
    MAX_FRAMES,
    REPLY_SCHEMAS,
    REPLY_TYPES,
    REQUEST_SCHEMAS,
    REQUEST_TYPES,
    SEQUENCED_TYPES,
    ErrorCode,
    MessageType,
    error_code_name,
    is_supported_version,
    message_type_name,
    negotiate_version,
)
from streamrnn.serving.sequencing import SequenceTable, Verdict


def test_every_message_type_has_a_schema_and_one_byte():
    assert set(REQUEST_SCHEMAS) == REQUEST_TYPES
    assert set(REPLY_SCHEMAS) == REPLY_TYPES
    assert all(0 < t < 256 for t in MessageType)
    assert SEQUENCED_TYPES <= REQUEST_TYPES
    assert MAX_FRAMES >= 3


def test_negotiate_version_picks_highest_common():
    assert negotiate_version([1, 2, 3]) == 1
    assert negotiate_version([1, 2], supported=(1, 2)) == 2
    assert negotiate_version([5]) is None
    assert negotiate_version([True, "1"]) is None  # bools and strings are not versions
    assert is_supported_version(1) and not is_supported_version(True)


def test_names_for_logs():
    assert message_type_name(0x02) == "PUSH"
    assert message_type_name(0x7F) == "0x7f"
    assert error_code_name(ErrorCode.SEQ_GAP) == "SEQ_GAP"
    assert error_code_name(999) == "999"


REPLY = (MessageType.OUTPUT, {"stream": "a", "seq": 0}, {})


def test_sequence_apply_duplicate_gap():
    table = SequenceTable()
    assert table.check("a", 0, MessageType.PUSH).verdict is Verdict.APPLY
    table.applied("a", 0, REPLY)
    dup = table.check("a", 0, MessageType.PUSH)
    assert dup.verdict is Verdict.REPLAY and dup.reply is REPLY
    gap = table.check("a", 5, MessageType.PUSH)
    assert gap.verdict is Verdict.ERROR and gap.code == ErrorCode.SEQ_GAP and gap.expected == 1


def test_sequence_stale_after_cache_eviction():
    table = SequenceTable(cache_size=2)
    for seq in range(4):
        table.applied("a", seq, REPLY)
    stale = table.check("a", 0, MessageType.PUSH)
    assert stale.code == ErrorCode.SEQ_STALE and stale.expected == 4
    assert table.check("a", 3, MessageType.PUSH).verdict is Verdict.REPLAY


def test_unknown_stream_only_starts_with_push_at_zero():
    table = SequenceTable()
    assert table.check("new", 0, MessageType.PUSH).verdict is Verdict.APPLY
    for msg_type, seq in [(MessageType.PUSH, 3), (MessageType.RESET, 0), (MessageType.CLOSE, 0)]:
        decision = table.check("new", seq, msg_type)
        assert decision.code == ErrorCode.UNKNOWN_STREAM and decision.expected == 0


def test_close_forgets_but_replays_retried_close():
    table = SequenceTable()
    table.applied("a", 0, REPLY)
    ack = (MessageType.ACK, {"stream": "a", "seq": 1, "next_seq": 0}, {})
    table.closed("a", 1, ack)
    assert "a" not in table
    assert table.check("a", 1, MessageType.CLOSE).reply is ack
    assert table.check("a", 0, MessageType.PUSH).verdict is Verdict.APPLY  # starts over


def test_expired_stream_answers_expired_until_restart():
    table = SequenceTable()
    table.applied("a", 0, REPLY)
    assert table.expire_idle(10.0, now=1e12) == ["a"]
    assert table.check("a", 1, MessageType.PUSH).verdict is Verdict.EXPIRED
    assert table.check("a", 0, MessageType.PUSH).verdict is Verdict.APPLY


def test_next_seq_of_known_closed_and_unknown_streams():
    table = SequenceTable()
    assert table.next_seq("a") == 0
    table.applied("a", 0, REPLY)
    assert table.next_seq("a") == 1
    table.closed("a", 1, REPLY)
    assert table.next_seq("a") == 0
