"""Hostile messages for bench/fuzz_hostile.py, each with the replies docs/protocol.md requires.

A :class:`Case` is one or more :class:`Step` s sent in order on one attacker connection; a
step is the frames sent and, per reply the document requires, an :class:`Expect`: the reply
types and error codes allowed (BUSY may answer any request, section 6) and the ``rid`` it
must echo. This module makes the cases that need no stream: frame-level garbage, header
fields of the wrong type or range, bad arrays and NaN, BATCH envelopes that do not decode,
random headers from tests/helpers/codec_strategies.py; bench/fuzz_streams.py makes the ones
about streams (the attacker's own, other identities') and picks kinds.

Example::

    ctx = Context(rng, features=4, honest=["h0"], generate=False)
    step = field_case("seq-negative", ctx)   # step.frames, step.expects[0].allowed
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from streamrnn.codec import encode
from streamrnn.protocol import ErrorCode as E
from streamrnn.protocol import MessageType as M

__all__ = ["ANY", "ATTACKER_TOKEN", "Case", "Context", "Expect", "Step", "array_case", "envelope",
           "envelope_case", "err", "field_case", "frames_case", "header_pool", "ok", "one",
           "packable", "packed", "random_case", "readable_rid", "special_case"]

ANY = frozenset({"any"})  # any reply type (random headers): exactly one reply, no INTERNAL
ATTACKER_TOKEN = "attacker-token"


@dataclass
class Expect:
    """One reply the document requires: ``allowed`` holds ``(type, code)`` pairs (code None
    for replies other than ERROR) or :data:`ANY`; ``rid``: the rid it must echo."""

    allowed: frozenset
    rid: int | None = None
    forbid_fields: tuple[str, ...] = ()  # header fields the reply must not carry


@dataclass
class Step:
    frames: list
    expects: list[Expect]
    effect: Callable[[Any], None] | None = None  # called with the reply of a 1-reply step
    fresh_socket: bool = False  # sent on a throwaway connection (ZeroMQ may disconnect it)


@dataclass
class Case:
    kind: str
    steps: list[Step]


@dataclass
class Context:
    """What a case may use: the rng, the model's input, honest stream ids (owned by another
    identity), whether GENERATE works, and the attacker's own stream (id, next seq)."""

    rng: np.random.Generator
    features: int
    honest: list[str]
    generate: bool
    rid: int = 1
    own: str | None = None
    own_next: int = 0
    own_last: tuple[int, Any] | None = None  # (type of seq own_next-1, its chunk)
    serial: int = 0
    pool: list[dict] = field(default_factory=list)

    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    def fresh_id(self, prefix: str = "atk") -> str:
        self.serial += 1
        return f"{prefix}-{self.serial}-{int(self.rng.integers(1 << 30))}"

    def chunk(self, steps: int | None = None) -> np.ndarray:
        t = int(self.rng.integers(1, 9)) if steps is None else steps
        return self.rng.standard_normal((t, self.features)).astype(np.float32)


def err(*codes: E) -> frozenset:
    return frozenset({(M.ERROR, int(c)) for c in codes} | {(M.BUSY, None)})


def ok(*types: M) -> frozenset:
    return frozenset({(t, None) for t in types} | {(M.BUSY, None)})


def _header(ctx: Context, msg: M, **fields: Any) -> tuple[dict, int]:
    rid = ctx.next_rid()
    return {"v": 1, "rid": rid, **fields}, rid


def one(ctx: Context, msg: M, allowed: frozenset, arrays: dict | None = None,
         raw: Callable[[list], list] | None = None, **fields: Any) -> Step:
    """A well-formed message (optionally bent by ``raw(frames)``) and one required reply."""
    header, rid = _header(ctx, msg, **fields)
    frames = encode(msg, header, arrays)
    return Step(raw(frames) if raw else frames, [Expect(allowed, rid)])


def packed(header: Any) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


# ---- frame-level and header-level garbage --------------------------------------------------

def frames_case(kind: str, ctx: Context) -> Step:
    rid = ctx.next_rid()
    good = {"v": 1, "rid": rid, "stream": ctx.fresh_id(), "seq": 0}
    readable = Expect(err(E.MALFORMED), rid)
    variants: dict[str, tuple[list, Expect]] = {
        "one-frame": ([bytes([M.PUSH])], Expect(err(E.MALFORMED))),
        "type-2-bytes": ([b"\x02\x02", packed(good)], readable),
        "type-empty": ([b"", packed(good)], readable),
        "type-unknown": ([b"\x7f", packed(good)], readable),
        "type-reply": ([bytes([M.OUTPUT]), packed(good)], readable),
        "header-garbage": ([bytes([M.OPEN]), bytes(ctx.rng.integers(0, 256, 40, np.uint8))],
                           Expect(err(E.MALFORMED))),
        "header-list": ([bytes([M.OPEN]), packed([1, 2, 3])], Expect(err(E.MALFORMED))),
        "header-huge": ([bytes([M.OPEN]), packed({**good, "x": "a" * 70000})],
                        Expect(err(E.TOO_LARGE, E.MALFORMED))),
        "seven-frames": ([bytes([M.PUSH]), packed(good), *[b"\0" * 4] * 5],
                         Expect(err(E.TOO_LARGE), rid)),
        "long-string": ([bytes([M.OPEN]), packed({**good, "x": "a" * 5000})], readable),
        "long-list": ([bytes([M.OPEN]), packed({**good, "x": list(range(1100))})], readable),
        "bin-value": ([bytes([M.OPEN]), packed({**good, "x": b"\x00\x01"})], readable),
        "stream-bin": ([bytes([M.OPEN]), packed({"v": 1, "rid": rid, "stream": b"s"})],
                       readable),
    }
    frames, expect = variants[kind]
    return Step(frames, [expect])


def field_case(kind: str, ctx: Context) -> Step:
    sid = ctx.fresh_id()
    push = {"stream": sid, "seq": 0}
    chunk = {"chunk": ctx.chunk()}
    table: dict[str, tuple[M, dict, dict | None, frozenset]] = {
        "no-stream": (M.PUSH, {"seq": 0}, chunk, err(E.MALFORMED)),
        "stream-int": (M.PUSH, {"stream": 5, "seq": 0}, chunk, err(E.MALFORMED)),
        "stream-empty": (M.PUSH, {"stream": "", "seq": 0}, chunk, err(E.BAD_VALUE)),
        "stream-300": (M.PUSH, {"stream": "s" * 300, "seq": 0}, chunk, err(E.BAD_VALUE)),
        "seq-negative": (M.PUSH, {**push, "seq": -1}, chunk, err(E.BAD_VALUE)),
        "seq-2^63": (M.PUSH, {**push, "seq": 2**63}, chunk, err(E.BAD_VALUE)),
        "seq-bool": (M.PUSH, {**push, "seq": True}, chunk, err(E.MALFORMED)),
        "seq-missing": (M.PUSH, {"stream": sid}, chunk, err(E.MALFORMED)),
        "version-99": (M.PUSH, {**push, "v": 99}, chunk, err(E.UNSUPPORTED_VERSION)),
        "token-int": (M.PUSH, {**push, "token": 7}, chunk, err(E.MALFORMED)),
        "token-300": (M.PUSH, {**push, "token": "t" * 300}, chunk, err(E.BAD_VALUE)),
        "token-empty": (M.PUSH, {**push, "token": ""}, chunk, err(E.BAD_VALUE)),
        "unknown-reset": (M.RESET, {**push, "seq": 3}, None, err(E.UNKNOWN_STREAM)),
        "unknown-close": (M.CLOSE, {**push, "seq": 1}, None, err(E.UNKNOWN_STREAM)),
        "unknown-push": (M.PUSH, {**push, "seq": 7}, chunk, err(E.UNKNOWN_STREAM)),
        "unknown-open": (M.OPEN, {"stream": sid}, None, ok(M.ACK)),
        "open-pin-999": (M.OPEN, {"stream": sid, "pin_version": 999},
                         None, err(E.NOT_SUPPORTED, E.BAD_VALUE)),
        "generate-steps-huge": (M.GENERATE, {**push, "steps": 10**6},
                                {"prompt": ctx.chunk()}, err(E.BAD_VALUE, E.NOT_SUPPORTED)),
        "generate-steps-zero": (M.GENERATE, {**push, "steps": 0},
                                {"prompt": ctx.chunk()}, err(E.BAD_VALUE, E.NOT_SUPPORTED)),
        "stats": (M.STATS, {}, None, ok(M.ACK)),
        "ping": (M.PING, {}, None, ok(M.PONG)),
        "ping-v99": (M.PING, {"v": 99, "versions": [99]}, None, err(E.UNSUPPORTED_VERSION)),
    }
    msg, fields, arrays, allowed = table[kind]
    return one(ctx, msg, allowed, arrays, **fields)


def _descriptor(frames: list, **desc: Any) -> list:
    header = msgpack.unpackb(frames[1])
    header["arrays"]["chunk"].update(desc)
    return [frames[0], packed(header), *frames[2:]]


def array_case(kind: str, ctx: Context) -> Step:
    """Bad arrays on fresh ids at seq 0 (errors never create a stream)."""
    push = {"stream": ctx.fresh_id(), "seq": 0}
    x = ctx.chunk()
    t = len(x)
    nan = x.copy()
    nan[0, 0] = np.nan
    inf = x.copy()
    inf[-1, -1] = -np.inf
    bent: dict[str, tuple[Any, Callable | None, frozenset]] = {
        "dtype-complex": (x, lambda f: _descriptor(f, dtype="complex64"), err(E.BAD_DTYPE)),
        "dtype-big-endian": (x, lambda f: _descriptor(f, dtype=">f4"), err(E.BAD_DTYPE)),
        "dtype-int-for-features": (x.astype(np.int32), None, err(E.BAD_DTYPE)),
        "dtype-int": (x, lambda f: _descriptor(f, dtype=7), err(E.BAD_DTYPE)),
        "shape-1d": (x.reshape(-1), None, err(E.BAD_SHAPE)),
        "shape-wrong-d": (np.zeros((t, ctx.features + 1), np.float32), None,
                          err(E.BAD_SHAPE)),
        "shape-negative": (x, lambda f: _descriptor(f, shape=[-t, ctx.features]),
                           err(E.BAD_SHAPE)),
        "shape-5d": (x, lambda f: _descriptor(f, shape=[1, 1, 1, t, ctx.features]),
                     err(E.BAD_SHAPE)),
        "frame-length": (x, lambda f: [*f[:2], bytes(f[2])[:-4]], err(E.BAD_SHAPE)),
        "frame-missing": (x, lambda f: f[:2], err(E.MALFORMED)),
        "frame-extra": (x, lambda f: [*f, b"\0" * 8], err(E.MALFORMED)),
        "frame-index": (x, lambda f: _descriptor(f, frame=3), err(E.MALFORMED)),
        "descriptor-list": (x, lambda f: _descriptor(f, dtype=[1] * 3), err(E.BAD_DTYPE,
                                                                           E.MALFORMED)),
        "nan": (nan, None, err(E.NON_FINITE)),
        "inf": (inf, None, err(E.NON_FINITE)),
        "empty-chunk": (np.zeros((0, ctx.features), np.float32), None, err(E.EMPTY_CHUNK)),
        "chunk-65537": (np.zeros((65537, ctx.features), np.float32), None, err(E.TOO_LARGE)),
        "float64-fresh": (x.astype(np.float64), None,
                          ok(M.OUTPUT) | err(E.QUOTA_EXCEEDED, E.ENGINE_FULL)),
    }
    array, raw, allowed = bent[kind]
    if kind == "float64-fresh":  # leaves an attacker stream behind: the quota bounds them
        push["token"] = ATTACKER_TOKEN
    # The document does not order the per-identity quota (5d) and the chunk checks: a PUSH
    # at seq 0 of a fresh id from an identity at its quota may get either.
    allowed |= err(E.QUOTA_EXCEEDED)
    return one(ctx, M.PUSH, allowed, {"chunk": array}, raw, **push)


# ---- BATCH envelopes -----------------------------------------------------------------------

def envelope(ctx: Context, parts: list, payload: bytes = b"") -> tuple[list, int]:
    rid = ctx.next_rid()
    return [bytes([M.BATCH]), packed({"v": 1, "rid": rid, "parts": parts}), payload], rid


def envelope_case(kind: str, ctx: Context) -> Step:
    """Envelopes that do not decode as a whole: one ERROR echoing the envelope's rid."""
    opened = [[int(M.OPEN), {"v": 1, "rid": ctx.next_rid(), "stream": ctx.fresh_id()}, []]]
    if kind == "batch-garbage":
        frames = [bytes([M.BATCH]), bytes(ctx.rng.integers(0, 256, 64, np.uint8)), b""]
        return Step(frames, [Expect(err(E.MALFORMED))])
    frames, rid = {
        "batch-two-frames": lambda: (envelope(ctx, opened)[0][:2], ctx.rid),
        "batch-257-parts": lambda: envelope(ctx, opened * 257),
        "batch-zero-parts": lambda: envelope(ctx, []),
        "batch-region-outside": lambda: envelope(
            ctx, [[int(M.PUSH), {"v": 1, "stream": "x", "seq": 0, "arrays": {"chunk": {
                "dtype": "float32", "shape": [1, ctx.features], "frame": 0}}},
                [[0, 4 * ctx.features]]]], b"\0" * 4),
        "batch-parts-not-list": lambda: envelope(ctx, {"a": 1}),
        "batch-part-not-list": lambda: envelope(ctx, [*opened, 5]),
        "batch-part-header-list": lambda: envelope(ctx, [*opened, [int(M.RESET), [1, 2], []]]),
    }[kind]()
    allowed = err(E.TOO_LARGE) if kind == "batch-257-parts" else err(E.MALFORMED, E.TOO_LARGE)
    return Step(frames, [Expect(allowed, rid)])


def readable_rid(header: Any) -> bool:
    rid = header.get("rid") if isinstance(header, dict) else None
    return type(rid) is int and 0 <= rid < 2**64


def random_case(ctx: Context) -> Step:
    header = ctx.pool[int(ctx.rng.integers(len(ctx.pool)))]
    msg = int(ctx.rng.choice([1, 2, 3, 4, 5, 6, 7]))
    body = _packed_or_invalid(header)
    extra = [] if ctx.rng.random() < 0.5 else [ctx.chunk().tobytes()]
    rid = header.get("rid") if body != b"\xc1" and readable_rid(header) else None
    return Step([bytes([msg]), body, *extra], [Expect(ANY, rid)])


def _packed_or_invalid(header: dict) -> bytes:
    from tests.helpers.codec_strategies import encoded

    return encoded(header)


def packable(header: dict) -> bool:
    """True if msgpack can pack ``header`` (random headers may hold integers it cannot)."""
    return _packed_or_invalid(header) != b"\xc1"


def header_pool(size: int, seed: int) -> list[dict]:
    """``size`` random request headers from tests/helpers/codec_strategies.py."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests.helpers.codec_strategies import STRUCTURED_HEADER

    out: list[dict] = []

    @settings(max_examples=size, database=None, derandomize=True, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.just(seed), STRUCTURED_HEADER)
    def draw(_seed: int, header: dict) -> None:
        out.append(header)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        draw()
    return out


def special_case(kind: str, ctx: Context) -> Step:
    if kind == "frame-33mib":  # ZeroMQ disconnects the peer: no reply of any kind
        header = {"v": 1, "stream": ctx.fresh_id(), "seq": 0}
        return Step([bytes([M.PUSH]), packed(header), bytes(33 * 1024 * 1024)], [],
                    fresh_socket=True)
    allowed = (ok(M.OUTPUT) if ctx.generate else err(E.NOT_SUPPORTED)) | err(
        E.QUOTA_EXCEEDED, E.ENGINE_FULL)
    return one(ctx, M.GENERATE, allowed, {"prompt": ctx.chunk()}, stream=ctx.fresh_id(),
                seq=0, steps=3, token=ATTACKER_TOKEN)


