"""Stream owners and the sequence table's reply types, as pure logic (milliseconds).

The real-socket side (CURVE keys, tokens, restarts, quotas against a live worker) is in
tests/serving/test_stream_owners.py.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from streamrnn.codec import Message, decode_request, encode
from streamrnn.errors import CheckpointError, ProtocolError
from streamrnn.protocol import F_CLIENT_KEY, ErrorCode, MessageType
from streamrnn.serving.batching import Round, Work, coalesce
from streamrnn.serving.checkpoint import StreamRecord, pack_record, unpack_record
from streamrnn.serving.owners import (
    Caller,
    OwnerBook,
    check_owner,
    load_owners,
    permits,
    token_digest,
    vouched_user,
)
from streamrnn.serving.sequencing import SequenceTable, Verdict

KEY_A = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # z85 alphabet, with ':' and '.'
KEY_B = "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID"
OUT = (MessageType.OUTPUT, {"stream": "s", "seq": 0, "steps": 1},
       {"output": np.zeros((1, 2), np.float32)})


def test_owner_of_each_kind_of_caller():
    assert Caller(None, None, b"p").owner is None
    assert Caller(KEY_A, None, b"p").owner == "curve:" + KEY_A
    assert Caller(None, "t", b"p").owner == "token:" + token_digest("t")
    assert Caller(KEY_A, "t", b"p").owner == f"curve:{KEY_A} token:{token_digest('t')}"
    assert "t" not in Caller(None, "t", b"p").owner.partition(":")[2]  # only the digest
    assert Caller(KEY_A, "t", b"p").charge == "curve:" + KEY_A
    assert Caller(None, "t", b"\x00\x01").charge == "peer:0001"


@pytest.mark.parametrize(("creator", "caller", "allowed"), [
    (Caller(None, None, b"1"), Caller(KEY_B, "x", b"2"), True),  # unowned: anyone
    (Caller(KEY_A, None, b"1"), Caller(KEY_A, None, b"2"), True),  # same key, new connection
    (Caller(KEY_A, None, b"1"), Caller(KEY_B, None, b"1"), False),
    (Caller(KEY_A, None, b"1"), Caller(None, None, b"1"), False),
    (Caller(None, "t", b"1"), Caller(None, "t", b"2"), True),
    (Caller(None, "t", b"1"), Caller(None, "u", b"1"), False),
    (Caller(None, "t", b"1"), Caller(None, None, b"1"), False),
    (Caller(None, "t", b"1"), Caller(KEY_A, "t", b"1"), True),  # token-owned: the token
    (Caller(KEY_A, "t", b"1"), Caller(KEY_A, "t", b"2"), True),  # both: both must match
    (Caller(KEY_A, "t", b"1"), Caller(KEY_A, None, b"1"), False),
    (Caller(KEY_A, "t", b"1"), Caller(KEY_B, "t", b"1"), False),
])
def test_permits(creator, caller, allowed):
    assert permits(creator.owner, caller) is allowed


def test_permits_refuses_an_owner_of_unknown_kind():
    assert not permits("root:x", Caller(KEY_A, "t", b"p"))


KEY_R = "0" * 40  # a trusted router's key


@pytest.mark.parametrize(("sender", "header", "user"), [
    (KEY_R, {F_CLIENT_KEY: KEY_A}, KEY_A),  # a trusted router vouches for A
    (KEY_R, {}, None),  # a trusted router whose client socket has no CURVE: no key
    (KEY_B, {F_CLIENT_KEY: KEY_A}, KEY_B),  # anyone else: the field is ignored
    (KEY_B, {}, KEY_B),
    (None, {F_CLIENT_KEY: KEY_A}, None),  # no CURVE at all: no key, whatever is claimed
])
def test_vouched_user(sender, header, user):
    assert vouched_user(sender, header, frozenset({KEY_R})) == user
    assert vouched_user(sender, header, frozenset()) == sender  # no trusted routers


@pytest.mark.parametrize("key", [KEY_A[:-1], KEY_A + "x", "~" * 40, "é" * 40])
def test_client_key_must_be_a_z85_public_key(key):
    for msg_type, header in ((MessageType.OPEN, {"v": 1, "stream": "s"}),
                             (MessageType.RESET, {"v": 1, "stream": "s", "seq": 0})):
        ok = decode_request(encode(msg_type, {**header, F_CLIENT_KEY: KEY_A}))
        assert ok.header[F_CLIENT_KEY] == KEY_A
        with pytest.raises(ProtocolError) as info:
            decode_request(encode(msg_type, {**header, F_CLIENT_KEY: key}))
        assert info.value.code == ErrorCode.BAD_VALUE


def test_book_counts_open_streams_per_charged_identity():
    book = OwnerBook(limit=2)
    a, b = Caller(KEY_A, None, b"1"), Caller(KEY_B, None, b"1")
    assert book.claim("s1", a) and book.claim("s2", a)
    assert not book.claim("s3", a)  # claims count until dropped
    assert book.claim("t1", b)
    book.created("s1")
    book.drop_claims()  # s2 never became a stream
    assert book.open_streams(a.charge) == 1 and book.open_streams(b.charge) == 0
    assert book.owner("s1") == a.owner and book.owner("s2") is None
    assert book.claim("s2", a)
    book.created("s2")
    assert not book.claim("s3", a)
    assert book.released("s1") == a.owner
    assert book.claim("s3", a)
    assert book.owners() == {"s2": a.owner}


def test_book_without_limit_and_reclaims():
    book = OwnerBook()
    a, b = Caller(None, "t", b"1"), Caller(None, None, b"2")
    assert all(book.claim(f"s{i}", a) for i in range(100))
    assert book.claim("s0", b)  # a later claim of the same stream replaces the earlier one
    book.created("s0")
    assert book.owner("s0") is None and book.open_streams(b.charge) == 1
    book.drop_claims()
    assert book.open_streams(a.charge) == 0
    with pytest.raises(ValueError):
        OwnerBook(limit=-1)


def test_book_restore_charges_curve_owners_only():
    book = OwnerBook(limit=1)
    book.restore("k", f"curve:{KEY_A} token:{token_digest('t')}")
    book.restore("t", "token:" + token_digest("t"))
    book.restore("n", None)
    assert book.open_streams("curve:" + KEY_A) == 1
    assert not book.claim("x", Caller(KEY_A, None, b"9"))
    assert book.owners() == {"k": f"curve:{KEY_A} token:{token_digest('t')}",
                             "t": "token:" + token_digest("t")}


def _created(table: SequenceTable, stream: str, caller: Caller) -> None:
    assert table.owners.claim(stream, caller)
    table.applied(stream, 0, OUT)


def test_table_keeps_owners_through_close_expiry_and_export():
    table = SequenceTable()
    a = Caller(KEY_A, None, b"1")
    _created(table, "live", a)
    _created(table, "closing", a)
    _created(table, "idle", a)
    _created(table, "moved", a)
    table.closed("closing", 1, (MessageType.ACK, {"next_seq": 0}, {}))
    table.forget("moved")
    table.applied("idle", 1, OUT)
    assert table.expire_idle(-1.0, now=None) == ["live", "idle"]  # every stream is idle
    assert table.owner("live") == (a.owner, False)  # expired: a tombstone keeps its owner
    assert table.owner("closing") == (a.owner, False)
    assert table.owner("moved") == (None, False)
    assert table.owner("never") == (None, False)
    assert table.export_owners() == {"closing": a.owner}  # closed ones answer a CLOSE
    assert table.owners.open_streams(a.charge) == 0


def test_table_restore_with_owner():
    table = SequenceTable()
    table.restore("r", 3, [(2, OUT)], owner="token:" + token_digest("t"))
    table.restore_closed("c", 4, (MessageType.ACK, {}, {}), owner="curve:" + KEY_A)
    assert table.owner("r") == ("token:" + token_digest("t"), True)
    assert table.owner("c") == ("curve:" + KEY_A, False)
    assert table.export_owners() == {"r": "token:" + token_digest("t"), "c": "curve:" + KEY_A}


# ---- a cached reply answers only a request of its own type (issue 16, item 4) ------------


def assert_refused(table: SequenceTable, seq: int, types, code: ErrorCode, expected: int):
    for msg_type in types:
        decision = table.check("s", seq, msg_type)
        assert (decision.verdict, decision.code, decision.expected) == (
            Verdict.ERROR, code, expected), msg_type


def test_reset_does_not_get_a_cached_push_output():
    table = SequenceTable()
    table.applied("s", 0, OUT)
    assert table.check("s", 0, MessageType.PUSH).verdict is Verdict.REPLAY
    assert_refused(table, 0, (MessageType.RESET, MessageType.GENERATE, MessageType.CLOSE),
                   ErrorCode.SEQ_STALE, 1)


def test_generate_and_reset_replies_answer_only_their_own_type():
    table = SequenceTable()
    table.applied("s", 0, OUT, MessageType.GENERATE)
    table.applied("s", 1, (MessageType.ACK, {"next_seq": 2}, {}), MessageType.RESET)
    table.applied("s", 2, OUT)
    assert table.check("s", 0, MessageType.GENERATE).verdict is Verdict.REPLAY
    assert table.check("s", 0, MessageType.PUSH).code is ErrorCode.SEQ_STALE
    assert table.check("s", 1, MessageType.RESET).verdict is Verdict.REPLAY
    assert table.check("s", 1, MessageType.PUSH).code is ErrorCode.SEQ_STALE
    assert table.check("s", 2, MessageType.GENERATE).code is ErrorCode.SEQ_STALE


def test_push_after_close_is_unknown_stream_not_the_close_ack():
    table = SequenceTable()
    table.applied("s", 0, OUT)
    ack = (MessageType.ACK, {"stream": "s", "seq": 1, "next_seq": 0}, {})
    table.closed("s", 1, ack)
    assert table.check("s", 1, MessageType.CLOSE).reply == ack
    assert_refused(table, 1, (MessageType.PUSH, MessageType.RESET, MessageType.GENERATE),
                   ErrorCode.UNKNOWN_STREAM, 0)


def test_restored_outputs_answer_push_or_generate():
    """A checkpoint does not say which request made an OUTPUT: both may replay it."""
    table = SequenceTable()
    table.restore("s", 2, [(0, OUT), (1, (MessageType.ACK, {"next_seq": 2}, {}))])
    assert table.check("s", 0, MessageType.PUSH).verdict is Verdict.REPLAY
    assert table.check("s", 0, MessageType.GENERATE).verdict is Verdict.REPLAY
    assert table.check("s", 1, MessageType.RESET).verdict is Verdict.REPLAY
    assert table.check("s", 1, MessageType.PUSH).code is ErrorCode.SEQ_STALE
    table.applied("s", 2, OUT)
    assert table.check("s", 2, MessageType.GENERATE).code is ErrorCode.SEQ_STALE


# ---- owners in checkpoints ---------------------------------------------------------------


def test_record_round_trip_keeps_the_owner():
    layout = [("float32", (3,))]
    owner = f"curve:{KEY_A} token:{token_digest('t')}"
    rec = StreamRecord([np.ones(3, np.float32)], 4, 7, [], owner)
    assert unpack_record(pack_record("s", rec, layout), layout).owner == owner
    plain = pack_record("s", StreamRecord([np.ones(3, np.float32)], 4, 7), layout)
    assert "owner" not in plain and unpack_record(plain, layout).owner is None
    with pytest.raises(CheckpointError):
        unpack_record({**plain, "owner": "root:me"}, layout)


@pytest.mark.parametrize("bad", [5, b"curve:x", "curve:é", "anyone", "curve:a " * 1000])
def test_owner_from_a_file_is_checked(bad):
    with pytest.raises(CheckpointError):
        check_owner(bad, "test")
    with pytest.raises(CheckpointError):
        load_owners({"s": bad}, "test")


def test_load_owners():
    assert load_owners(None, "x") == {}
    assert load_owners({"s": "token:ab"}, "x") == {"s": "token:ab"}
    for bad in ([1], {1: "token:ab"}):
        with pytest.raises(CheckpointError):
            load_owners(bad, "x")


def test_a_push_of_other_credentials_does_not_join_a_coalesced_run():
    """Only a run's first PUSH passes the owner check: a follower must have its key and
    token (an intruder's next seq is left to be checked, and refused, on its own)."""

    def push(seq: int, user: str | None, token: str | None = None) -> Work:
        header = {"stream": "s", "seq": seq, **({} if token is None else {"token": token})}
        return Work(b"peer", Message(MessageType.PUSH, header, {}), time.monotonic(),
                    chunk=np.zeros((2, 1), np.float32), user=user)

    def runs(*pushes: Work) -> list[int]:
        rounds = [Round(pushes=[w]) for w in pushes]
        return [len(run) for run in coalesce(rounds, 64)]

    assert runs(push(0, KEY_A), push(1, KEY_A)) == [2]
    assert runs(push(0, KEY_A), push(1, KEY_B)) == [1]
    assert runs(push(0, KEY_A), push(1, None)) == [1]
    assert runs(push(0, None, "t"), push(1, None, "u")) == [1]
    assert runs(push(0, None, "t"), push(1, None, "t")) == [2]
    assert push(0, KEY_A, "t").caller == Caller(KEY_A, "t", b"peer")
