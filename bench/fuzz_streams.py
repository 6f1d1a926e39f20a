"""Hostile messages about streams for bench/fuzz_hostile.py, and the kinds the fuzz draws from.

The attacker's own stream (owned by its token): duplicates (the cached OUTPUT, identical),
gaps (SEQ_GAP with ``expected``), a duplicate ``seq`` of another type (SEQ_STALE), NaN
(NON_FINITE), no token (FORBIDDEN), CLOSE then PUSH of the same ``seq`` (UNKNOWN_STREAM,
``expected`` 0). Other identities' streams (the honest streams): OPEN, PUSH (reading the
reply cache), RESET, CLOSE, GENERATE without their token or with a wrong one, alone and
at the end of a BATCH of 255 RESETs (the BUSY-latch poisoning shape): FORBIDDEN, telling
nothing. BATCH envelopes whose parts are garbage: one reply per part.

Example::

    ctx = Context(np.random.default_rng(0), features=4, honest=["h0"], generate=False)
    case = make_case("own-gap", ctx)   # Case("own-gap", [Step(frames, expects, effect)])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from bench.fuzz_cases import (
    ANY,
    ATTACKER_TOKEN,
    Case,
    Context,
    Expect,
    Step,
    array_case,
    envelope,
    envelope_case,
    err,
    field_case,
    frames_case,
    ok,
    one,
    packable,
    random_case,
    readable_rid,
    special_case,
)
from streamrnn.protocol import ErrorCode as E
from streamrnn.protocol import MessageType as M

__all__ = ["KINDS", "make_case"]

_SECRET = ("expected", "next_seq", "arrays")  # a FORBIDDEN reply tells nothing of these


def _own(ctx: Context, msg: M, seq: int, allowed: frozenset, arrays: dict | None = None,
         token: str | None = ATTACKER_TOKEN) -> Step:
    fields: dict[str, Any] = {"stream": ctx.own, "seq": seq}
    if token is not None:
        fields["token"] = token
    return one(ctx, msg, allowed, arrays, **fields)


def _expected_is(value: int) -> Callable[[Any], str | None]:
    def check(reply: Any) -> str | None:
        if reply.type == M.BUSY:
            return "stop"
        got = reply.header.get("expected")
        return None if got == value else f"expected={got!r}, the doc says {value}"
    return check


def _pushed(ctx: Context, seq: int, x: np.ndarray) -> Callable[[Any], str | None]:
    def effect(reply: Any) -> str | None:
        if reply.type == M.OUTPUT:
            ctx.own_next = seq + 1
            ctx.own_last = (M.PUSH, x, np.array(reply.arrays["output"]))
        elif seq == 0:
            ctx.own = None  # not created (quota, full, busy)
        return None
    return effect


def _create(ctx: Context, e: int) -> Step:
    ctx.own, x = ctx.fresh_id("own"), ctx.chunk()
    step = _own(ctx, M.PUSH, 0, ok(M.OUTPUT) | err(E.QUOTA_EXCEEDED, E.ENGINE_FULL),
                {"chunk": x})
    step.effect = _pushed(ctx, 0, x)
    return step


def _push(ctx: Context, e: int) -> Step:
    x = ctx.chunk()
    step = _own(ctx, M.PUSH, e, ok(M.OUTPUT), {"chunk": x})
    step.effect = _pushed(ctx, e, x)
    return step


def _dup(ctx: Context, e: int) -> Step:
    last_type, last_chunk, last_out = ctx.own_last
    if last_type != M.PUSH:
        return _push(ctx, e)
    step = _own(ctx, M.PUSH, e - 1, ok(M.OUTPUT) | err(E.SEQ_STALE), {"chunk": last_chunk})

    def same(reply: Any) -> str | None:
        if reply.type == M.OUTPUT and not np.array_equal(reply.arrays["output"], last_out):
            return "a duplicate's cached OUTPUT differs from the first reply"
        return None
    step.effect = same
    return step


def _wrong_type(ctx: Context, e: int) -> Step:
    """A cached reply answers only a request of its own type: SEQ_STALE."""
    other = (M.RESET, None) if ctx.own_last[0] == M.PUSH else (M.PUSH, {"chunk": ctx.chunk()})
    step = _own(ctx, other[0], e - 1, err(E.SEQ_STALE), other[1])
    step.effect = _expected_is(e)
    return step


def _gap(ctx: Context, e: int) -> Step:
    step = _own(ctx, M.PUSH, e + 1 + int(ctx.rng.integers(0, 50)), err(E.SEQ_GAP),
                {"chunk": ctx.chunk()})
    step.effect = _expected_is(e)
    return step


def _nan(ctx: Context, e: int) -> Step:
    x = ctx.chunk()
    x[-1, 0] = np.nan
    step = _own(ctx, M.PUSH, e, err(E.NON_FINITE), {"chunk": x})
    step.effect = _expected_is(e)
    return step


def _no_token(ctx: Context, e: int) -> Step:
    step = _own(ctx, M.PUSH, e, err(E.FORBIDDEN), {"chunk": ctx.chunk()}, token=None)
    step.expects[0].forbid_fields = _SECRET
    return step


def _reset(ctx: Context, e: int) -> Step:
    step = _own(ctx, M.RESET, e, ok(M.ACK))

    def reset(reply: Any) -> str | None:
        if reply.type != M.ACK:
            return None
        ctx.own_next, ctx.own_last = e + 1, (M.RESET, None, None)
        got = reply.header.get("next_seq")
        return None if got == e + 1 else f"RESET ACK next_seq={got!r}, not {e + 1}"
    step.effect = reset
    return step


def _close_push(ctx: Context, e: int) -> list[Step]:
    """CLOSE seq e, then PUSH seq e: UNKNOWN_STREAM with expected 0 (section 5)."""
    sid = ctx.own
    close = _own(ctx, M.CLOSE, e, ok(M.ACK))

    def closed(reply: Any) -> str | None:
        if reply.type != M.ACK:
            return "stop"
        ctx.own = None
        return None
    close.effect = closed
    push = one(ctx, M.PUSH, err(E.UNKNOWN_STREAM), {"chunk": ctx.chunk()}, stream=sid, seq=e,
               token=ATTACKER_TOKEN)
    push.effect = _expected_is(0)
    return [close, push]


_OWN_STEPS: dict[str, Callable[[Context, int], Step | list[Step]]] = {
    "own-push": _push, "own-dup": _dup, "own-wrong-type": _wrong_type, "own-gap": _gap,
    "own-nan": _nan, "own-no-token": _no_token, "own-reset": _reset,
    "own-close-push": _close_push}


def _own_case(kind: str, ctx: Context) -> list[Step]:
    build = _create if ctx.own is None or ctx.own_last is None else _OWN_STEPS[kind]
    steps = build(ctx, ctx.own_next)
    return steps if isinstance(steps, list) else [steps]


def _other_case(kind: str, ctx: Context) -> Step:
    """A request on an honest stream without its owner's token: FORBIDDEN, telling nothing."""
    h = ctx.honest[int(ctx.rng.integers(len(ctx.honest)))]
    seq = int(ctx.rng.integers(0, 40))
    token = {} if ctx.rng.random() < 0.5 else {"token": f"guess-{ctx.rng.integers(99)}"}
    msg, fields, arrays = {
        "other-open": (M.OPEN, {}, None),
        "other-read-cache": (M.PUSH, {"seq": seq}, {"chunk": ctx.chunk()}),
        "other-push-far": (M.PUSH, {"seq": 10**6}, {"chunk": ctx.chunk()}),
        "other-reset": (M.RESET, {"seq": seq}, None),
        "other-close": (M.CLOSE, {"seq": seq}, None),
        "other-generate": (M.GENERATE, {"seq": seq, "steps": 2}, {"prompt": ctx.chunk()}),
    }[kind]
    step = one(ctx, msg, err(E.FORBIDDEN), arrays, stream=h, **fields, **token)
    step.expects[0].forbid_fields = _SECRET
    return step


def _part(ctx: Context, msg: int, header: Any) -> tuple[Any, int | None]:
    """``[type, header, []]`` with a fresh rid in a map header (else no rid to match)."""
    if not isinstance(header, dict):
        return [msg, header, []], None
    rid = ctx.next_rid()
    return [msg, {"v": 1, "rid": rid, **header}, []], rid


def _mixed_parts(ctx: Context) -> list[tuple[Any, int | None, frozenset]]:
    parts: list[tuple[Any, int | None, frozenset]] = []
    for msg, header, allowed in [
            (M.OPEN, {"stream": ctx.fresh_id()}, ok(M.ACK)),
            (M.PING, {}, err(E.MALFORMED)),
            (M.BATCH, {"parts": []}, err(E.MALFORMED)),
            (M.OUTPUT, {"stream": "x", "seq": 0}, err(E.MALFORMED)),
            (M.RESET, {"stream": ctx.fresh_id(), "seq": 2}, err(E.UNKNOWN_STREAM)),
            (M.PUSH, {"stream": ctx.fresh_id(), "seq": -3}, err(E.BAD_VALUE, E.MALFORMED))]:
        parts.append((*_part(ctx, int(msg), header), allowed))
    return parts


def _batch_parts_case(kind: str, ctx: Context) -> Step:
    """Envelopes that decode: every part gets its own reply (matched by rid where it has
    one; a BATCH of 256 parts is at the limit)."""
    if kind == "batch-mixed":
        parts = _mixed_parts(ctx)
    elif kind == "batch-resets-then-victim":  # the BUSY-latch poisoning shape (issue 16, 2)
        parts = [(*_part(ctx, int(M.RESET), {"stream": ctx.fresh_id(), "seq": 0}),
                  err(E.UNKNOWN_STREAM)) for _ in range(255)]
        victim = ctx.honest[int(ctx.rng.integers(len(ctx.honest)))]
        parts.append((*_part(ctx, int(M.RESET), {"stream": victim, "seq": 0}),
                      err(E.FORBIDDEN)))
    else:  # batch-random: parts with random headers (tests/helpers/codec_strategies.py)
        parts = []
        for _ in range(int(ctx.rng.integers(1, 12))):
            header = ctx.pool[int(ctx.rng.integers(len(ctx.pool)))]
            if not packable(header) or _has_bytes(header):  # bin: the envelope is MALFORMED
                continue
            rid = header.get("rid") if readable_rid(header) else None
            parts.append(([int(ctx.rng.choice([1, 2, 3, 4, 5])), header, []], rid, ANY))
    if not parts:  # every random header drawn was unusable: one OPEN instead
        parts = [(*_part(ctx, int(M.OPEN), {"stream": ctx.fresh_id()}), ok(M.ACK))]
    frames, _ = envelope(ctx, [p for p, _, _ in parts])
    return Step(frames, [Expect(allowed, rid) for _, rid, allowed in parts])


def _has_bytes(value: Any) -> bool:
    if isinstance(value, bytes):
        return True
    if isinstance(value, dict):
        return any(_has_bytes(k) or _has_bytes(v) for k, v in value.items())
    return isinstance(value, list) and any(_has_bytes(v) for v in value)


_FRAMES = ["one-frame", "type-2-bytes", "type-empty", "type-unknown", "type-reply",
           "header-garbage", "header-list", "header-huge", "seven-frames", "long-string",
           "long-list", "bin-value", "stream-bin"]
_FIELDS = ["no-stream", "stream-int", "stream-empty", "stream-300", "seq-negative", "seq-2^63",
           "seq-bool", "seq-missing", "version-99", "token-int", "token-300", "token-empty",
           "unknown-reset", "unknown-close", "unknown-push", "unknown-open", "open-pin-999",
           "generate-steps-huge", "generate-steps-zero", "stats", "ping", "ping-v99"]
_ARRAYS = ["dtype-complex", "dtype-big-endian", "dtype-int-for-features", "dtype-int",
           "shape-1d", "shape-wrong-d", "shape-negative", "shape-5d", "frame-length",
           "frame-missing", "frame-extra", "frame-index", "descriptor-list", "nan", "inf",
           "empty-chunk", "chunk-65537", "float64-fresh"]
_OTHER = ["other-open", "other-read-cache", "other-push-far", "other-reset", "other-close",
          "other-generate"]
_ENVELOPES = ["batch-garbage", "batch-two-frames", "batch-257-parts", "batch-zero-parts",
              "batch-region-outside", "batch-parts-not-list", "batch-part-not-list",
              "batch-part-header-list"]
_PARTS = ["batch-mixed", "batch-resets-then-victim", "batch-random"]

#: kind -> weight (how often the driver draws it)
KINDS: dict[str, float] = {
    **dict.fromkeys(_FRAMES, 1.0), **dict.fromkeys(_FIELDS, 1.0),
    **dict.fromkeys(_ARRAYS, 1.0), **dict.fromkeys(_OWN_STEPS, 2.0),
    **dict.fromkeys(_OTHER, 2.0), **dict.fromkeys(_ENVELOPES, 1.0), "batch-mixed": 1.0,
    "batch-resets-then-victim": 0.1, "batch-random": 1.0, "random-header": 6.0,
    "own-generate": 0.5, "frame-33mib": 0.02,
}


def make_case(kind: str, ctx: Context) -> Case:
    """A fresh case of ``kind`` (a key of :data:`KINDS`)."""
    if kind in _OWN_STEPS:
        return Case(kind, _own_case(kind, ctx))
    for names, build in ((_FRAMES, frames_case), (_FIELDS, field_case),
                         (_ARRAYS, array_case), (_OTHER, _other_case),
                         (_ENVELOPES, envelope_case), (_PARTS, _batch_parts_case)):
        if kind in names:
            return Case(kind, [build(kind, ctx)])
    if kind == "random-header":
        return Case(kind, [random_case(ctx)])
    return Case(kind, [special_case(kind, ctx)])
