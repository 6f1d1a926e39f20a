"""docs/protocol.md against a live worker: the error-code table and the STATS key lists
name exactly what the worker has, and the promises a client written from the document
alone relies on hold (rid echoed whenever the header is readable, ``expected`` on a
too-long chunk's TOO_LARGE, PONG's ``generate`` only when GENERATE can work, the rid of an
envelope-level error).

The worker is the suite's shared one (the ``worker`` and ``dealer`` fixtures of
tests/conftest.py: 5 features -> 3 outputs, which cannot generate).
"""

from __future__ import annotations

import re
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from streamrnn.codec import decode_reply, encode, encode_batch
from streamrnn.protocol import ErrorCode, MessageType
from tests.helpers.shared_worker import SPEC
from tests.helpers.wire_helpers import data

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


# ---- reading the document -------------------------------------------------------------


def _section(text: str, heading: str) -> str:
    """The text under ``heading`` (a whole heading line) up to the next heading of the
    same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines))
                if re.match(rf"#{{1,{level}}} ", lines[i])), len(lines))
    return "\n".join(lines[start:end])


def _tables(section: str) -> list[list[list[str]]]:
    """The markdown tables of ``section``: rows of cells, without header and rule."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*section.splitlines(), ""]:
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if current:
            tables.append(current[2:])
            current = []
    return tables


def _key(cell: str) -> str:
    match = re.fullmatch(r"`([a-z_]+)`", cell)
    assert match, f"a key cell must be one `name`: {cell!r}"
    return match.group(1)


def doc_error_codes() -> dict[int, str]:
    (table,) = _tables(_section(DOC.read_text(), "## 7. Error codes"))
    return {int(row[0]): row[1] for row in table}


def doc_stats_keys() -> dict[str, tuple[set[str], set[str]]]:
    """``{"stats" | "counts" | "engine": (keys always there, keys only sometimes)}``."""
    top, counts, engine = _tables(_section(DOC.read_text(), "### STATS"))
    out = {}
    for name, table in (("stats", top), ("counts", counts), ("engine", engine)):
        sometimes = {_key(row[0]) for row in table if row[1].startswith("only with")}
        out[name] = ({_key(row[0]) for row in table} - sometimes, sometimes)
    return out


# ---- the live worker ------------------------------------------------------------------


def ask(sock: zmq.Socket, frames: list) -> object:
    sock.send_multipart(frames)
    return decode_reply(sock.recv_multipart())


def header_frame(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def test_error_code_table_names_every_code_and_only_those():
    assert doc_error_codes() == {int(c): c.name for c in ErrorCode}


def test_stats_keys_are_the_documented_ones(dealer):
    reply = ask(dealer, encode(MessageType.STATS, {"rid": 1}))
    stats = reply.header["stats"]
    keys = doc_stats_keys()
    for name, live in (("stats", stats), ("counts", stats["counts"]),
                       ("engine", stats["engine"])):
        always, sometimes = keys[name]
        assert always <= set(live), f"{name}: documented but missing: {always - set(live)}"
        extra = set(live) - always - sometimes
        assert not extra, f"{name}: in a live worker's STATS but not in the doc: {extra}"


def test_pong_says_generate_only_when_the_model_can(dealer):
    # 5 features -> 3 outputs: no feedback rule fits, GENERATE answers NOT_SUPPORTED
    pong = ask(dealer, encode(MessageType.PING, {"rid": 2}))
    assert pong.type == MessageType.PONG
    assert pong.header["worker"]["generate"] is False
    prompt = data(2, 0)
    reply = ask(dealer, encode(MessageType.GENERATE, {"rid": 3, "stream": "doc-gen", "seq": 0,
                                                      "steps": 2}, {"prompt": prompt}))
    assert reply.header["code"] == ErrorCode.NOT_SUPPORTED


@pytest.mark.parametrize("stream, seq", [(5, -1), ("ok", None), (None, 2**63), ("", "3")])
def test_a_ping_echoes_only_well_typed_matching_fields(dealer, stream, seq):
    # PING has no stream or seq of its own: ill-typed ones must not be echoed (found by
    # bench/fuzz_hostile.py), or decode_reply refuses the PONG
    for header in ({"v": 1, "rid": 9, "stream": stream, "seq": seq},
                   {"v": 99, "rid": 9, "stream": stream, "seq": seq}):
        reply = ask(dealer, encode(MessageType.PING, header))
        assert reply.header["rid"] == 9
        assert "seq" not in reply.header
        assert reply.header.get("stream") in (None, "ok")


@pytest.mark.parametrize("case", ["seven-frames", "long-string", "long-list", "bin", "ext"])
def test_rid_is_echoed_whenever_the_header_is_readable(dealer, case):
    header = {"v": 1, "rid": 4242, "stream": "doc-rid", "seq": 0}
    frames = [bytes([MessageType.PUSH])]
    code = ErrorCode.MALFORMED
    if case == "seven-frames":
        frames += [header_frame(header), *[b"\0" * 4] * 5]
        code = ErrorCode.TOO_LARGE
    elif case == "long-string":
        frames.append(header_frame({**header, "note": "x" * 5000}))
    elif case == "long-list":
        frames.append(header_frame({**header, "note": list(range(1100))}))
    elif case == "bin":
        frames.append(header_frame({**header, "note": b"raw bytes"}))
    else:
        frames.append(header_frame({**header, "note": msgpack.ExtType(5, b"x")}))
    reply = ask(dealer, frames)
    assert reply.type == MessageType.ERROR
    assert reply.header["code"] == code
    assert reply.header.get("rid") == 4242, reply.header
    assert reply.header.get("stream") == "doc-rid" and reply.header.get("seq") == 0


def test_too_long_chunk_is_too_large_with_expected(dealer):
    stream = "doc-long-chunk"
    first = ask(dealer, encode(MessageType.PUSH, {"rid": 5, "stream": stream, "seq": 0},
                               {"chunk": data(3, 1)}))
    assert first.type == MessageType.OUTPUT
    long = np.zeros((65537, SPEC.features), np.float32)
    reply = ask(dealer, encode(MessageType.PUSH, {"rid": 6, "stream": stream, "seq": 1},
                               {"chunk": long}))
    assert reply.header["code"] == ErrorCode.TOO_LARGE
    assert reply.header.get("expected") == 1, reply.header
    assert reply.header.get("rid") == 6
    # the number was not consumed: seq 1 is still next
    again = ask(dealer, encode(MessageType.PUSH, {"rid": 7, "stream": stream, "seq": 1},
                               {"chunk": data(2, 2)}))
    assert again.type == MessageType.OUTPUT
    ask(dealer, encode(MessageType.CLOSE, {"rid": 8, "stream": stream, "seq": 2}))


def test_an_envelope_level_error_echoes_the_envelope_rid(dealer):
    frames = encode_batch(MessageType.BATCH, [
        (MessageType.PUSH, {"rid": 11, "stream": "doc-env", "seq": 0}, {"chunk": data(2, 3)})])
    envelope = msgpack.unpackb(frames[1])
    envelope["rid"] = 10
    envelope["parts"][0][2] = [[0, 10**6]]  # a region outside the payload
    reply = ask(dealer, [frames[0], header_frame(envelope), frames[2]])
    assert reply.type == MessageType.ERROR and reply.header["code"] == ErrorCode.MALFORMED
    assert reply.header.get("rid") == 10
