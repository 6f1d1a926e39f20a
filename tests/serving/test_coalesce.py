"""Coalescing: under backlog, a stream's queued consecutive PUSHes share one step.

The worker CLI coalesces up to ``--max-bucket`` timesteps per stream (the shared worker
runs with the default). Every chunk still gets its own reply, and streaming still equals
offline; a RESET, a bad chunk or a sequence gap ends a run.
"""

from __future__ import annotations

import time

import numpy as np

import streamrnn
from streamrnn.codec import Message, encode_batch
from streamrnn.errors import InvalidInputError
from streamrnn.protocol import ErrorCode, MessageType
from streamrnn.serving.batching import Round, Work, coalesce
from tests.helpers.modelzoo import offline
from tests.helpers.wire_helpers import collect_replies, data, push

TOL = 1e-5


def _coalesced_count(worker) -> int:
    with streamrnn.Client(worker.endpoint, timeout=10) as client:
        return client.stats()["counts"].get("coalesced_push", 0)


def _close(dealer, next_seqs: dict[str, int]) -> None:
    """Close the streams (the shared worker's slots are shared by every test)."""
    dealer.send_multipart(encode_batch(MessageType.BATCH, [
        (MessageType.CLOSE, {"rid": 900 + i, "stream": s, "seq": seq}, None)
        for i, (s, seq) in enumerate(next_seqs.items())]))
    acks = collect_replies(dealer, len(next_seqs))
    assert {p.type for p in acks.values()} == {MessageType.ACK}, acks


# ---- the choice of runs (the pure batching.coalesce, fake requests) --------------------


def _work(stream: str, seq: int, steps: int | None, invalid: bool = False) -> Work:
    msg = Message(MessageType.PUSH, {"stream": stream, "seq": seq}, {})
    chunk = None if steps is None else np.zeros((steps, 2), np.float32)
    return Work(b"id", msg, time.monotonic(), chunk=chunk,
                invalid=InvalidInputError("bad", ErrorCode.BAD_VALUE) if invalid else None)


def _runs(rounds: list[Round], limit: int = 64) -> list[list[tuple[str, int]]]:
    return [[(w.stream, w.seq) for w in run] for run in coalesce(rounds, limit)]


def _rounds(*per_round: list[Work], before: dict[int, list[Work]] | None = None
            ) -> list[Round]:
    return [Round(before=(before or {}).get(i, []), pushes=list(pushes))
            for i, pushes in enumerate(per_round)]


def test_runs_are_cut_to_the_padded_length_they_fill_best():
    # three 16-step chunks per stream: 48 would pad to 64 (a quarter masked), 32 fills it
    rounds = _rounds(*[[_work(s, i, 16) for s in "ab"] for i in range(3)])
    assert _runs(rounds) == [[("a", 0), ("a", 1)], [("b", 0), ("b", 1)]]
    # one stream with a single chunk: two chunks for the other would leave half masked
    rounds = _rounds([_work("a", 0, 16), _work("b", 0, 16)], [_work("a", 1, 16)])
    assert _runs(rounds) == [[("a", 0)], [("b", 0)]]
    # uneven chunks: 10 + 10 + 10 and 16 + 16 fill a 32-step batch better than 16 does
    rounds = _rounds([_work("a", 0, 10), _work("b", 0, 16)],
                     [_work("a", 1, 10), _work("b", 1, 16)], [_work("a", 2, 10)])
    assert _runs(rounds) == [[("a", 0), ("a", 1), ("a", 2)], [("b", 0), ("b", 1)]]


def test_a_run_stops_at_a_reset_a_bad_chunk_a_gap_or_the_limit():
    reset = _work("a", 1, None)
    reset.msg = Message(MessageType.RESET, {"stream": "a", "seq": 1}, {})
    assert _runs(_rounds([_work("a", 0, 4)], [_work("a", 2, 4)], before={1: [reset]})) == [
        [("a", 0)]]
    assert _runs(_rounds([_work("b", 0, 4)], [_work("b", 1, 4, invalid=True)])) == [[("b", 0)]]
    assert _runs(_rounds([_work("c", 0, 4)], [_work("c", 2, 4)])) == [[("c", 0)]]
    four = _rounds(*[[_work("d", i, 4)] for i in range(4)])
    assert _runs(four) == [[("d", 0), ("d", 1), ("d", 2), ("d", 3)]]
    assert _runs(four, limit=8) == [[("d", 0), ("d", 1)]]
    assert _runs(four, limit=0) == [[("d", 0)]]


# ---- a real worker --------------------------------------------------------------------


def test_queued_chunks_share_a_step_and_still_equal_offline(worker, dealer):
    """Two streams with four chunks each in one envelope (the shared worker's queue holds
    8): each stream's chunks run in one step, each gets its own reply and seq."""
    x = {"qa": data(16, 1), "qb": data(16, 2)}
    cuts = {"qa": [4, 8, 12], "qb": [3, 8, 10]}
    pieces = {s: np.split(v, cuts[s]) for s, v in x.items()}
    before = _coalesced_count(worker)
    parts, rid_of = [], {}
    for seq in range(4):
        for s in x:
            rid_of[(s, seq)] = rid = len(parts) + 1
            parts.append(push(s, seq, pieces[s][seq], rid))
    dealer.send_multipart(encode_batch(MessageType.BATCH, parts))
    got = collect_replies(dealer, len(parts))
    for s in x:
        outs = []
        for seq in range(4):
            reply = got[rid_of[(s, seq)]]
            assert reply.type is MessageType.OUTPUT, reply.header
            assert (reply.header["seq"], reply.header["steps"]) == (seq, len(pieces[s][seq]))
            outs.append(reply.arrays["output"])
        np.testing.assert_allclose(np.concatenate(outs), offline(worker.model, x[s]), atol=TOL)
    assert _coalesced_count(worker) > before  # some chunks did share a step
    _close(dealer, {"qa": 4, "qb": 4})


def test_a_reset_and_a_bad_chunk_end_a_run_on_a_real_worker(worker, dealer):
    first, fresh = data(10, 3), data(6, 4)
    good, nan = data(9, 5), data(3, 6)
    nan[0, 0] = np.nan
    dealer.send_multipart(encode_batch(MessageType.BATCH, [
        push("qc", 0, first[:5], 1), push("qc", 1, first[5:], 2),
        (MessageType.RESET, {"rid": 3, "stream": "qc", "seq": 2}, None),
        push("qc", 3, fresh, 4),
        push("qd", 0, good[:4], 5), push("qd", 1, nan, 6), push("qd", 2, good[4:], 7)]))
    got = collect_replies(dealer, 7)
    np.testing.assert_allclose(np.concatenate([got[1].arrays["output"], got[2].arrays["output"]]),
                               offline(worker.model, first), atol=TOL)
    assert got[3].type is MessageType.ACK
    np.testing.assert_allclose(got[4].arrays["output"], offline(worker.model, fresh), atol=TOL)
    assert got[5].type is MessageType.OUTPUT
    assert got[6].header["code"] == ErrorCode.NON_FINITE and got[6].header["expected"] == 1
    assert got[7].header["code"] == ErrorCode.SEQ_GAP and got[7].header["expected"] == 1
    # nothing after the bad chunk was applied: the stream goes on from seq 1
    dealer.send_multipart(encode_batch(MessageType.BATCH, [push("qd", 1, good[4:], 8)]))
    np.testing.assert_allclose(
        np.concatenate([got[5].arrays["output"], collect_replies(dealer, 1)[8].arrays["output"]]),
        offline(worker.model, good), atol=TOL)
    _close(dealer, {"qc": 4, "qd": 2})
