"""Applying a round's plan to the engine (the compute thread): sequence checks, the requests
that run before the step, and the batched step itself.

:class:`Applier` takes a :class:`~streamrnn.serving.batching.Plan`'s parts in order:

* :meth:`Applier.before`: OPEN (pins), RESET, CLOSE and GENERATE, each stream's in order;
  a :class:`~streamrnn.serving.batching.GenerateGroup` runs its admitted GENERATEs of the
  same weights version in one ``engine.generate_many`` call;
* :meth:`Applier.pushes`: one ``engine.push_many`` over the streams' PUSH runs (a run's
  chunks concatenated, each chunk still answered with its own slice of the outputs).

Sequenced requests pass the exactly-once check first (:meth:`Applier.admit`, see
:mod:`streamrnn.serving.sequencing`). What the engine can do beyond
:class:`~streamrnn.engine.interface.EngineLike` (generation, pins) was decided once, when
the worker was built (:func:`~streamrnn.engine.interface.capabilities_of`).

Example::

    applier = Applier(engine, capabilities_of(engine), table, responder, stats, None, describe)
    applier.before(plan.before)
    put_back = applier.pushes(plan.runs)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

import numpy as np

from streamrnn.engine.interface import (
    Capabilities,
    EngineLike,
    SupportsGeneration,
    SupportsPins,
)
from streamrnn.errors import InvalidInputError, NotSupportedError, StreamRNNError
from streamrnn.protocol import (
    A_OUTPUT,
    A_PROMPT,
    F_EXPECTED,
    F_MESSAGE,
    F_NEXT_SEQ,
    F_PIN,
    F_SEQ,
    F_STEPS,
    F_STREAM,
    GENERATE_OPTIONS,
    ErrorCode,
    MessageType,
)
from streamrnn.serving.batching import GenerateGroup, GenerateOptions, Work
from streamrnn.serving.owners import permits
from streamrnn.serving.replies import Responder
from streamrnn.serving.sequencing import CachedReply, SequenceTable, Verdict
from streamrnn.serving.stats import Count, WorkerStats
from streamrnn.serving.store import StreamStore

__all__ = ["Applier"]

log = logging.getLogger("streamrnn.worker")


class Applier:
    """Applies planned requests to ``engine`` and answers each one (compute thread only)."""

    def __init__(self, engine: EngineLike, caps: Capabilities, table: SequenceTable,
                 responder: Responder, stats: WorkerStats,
                 store: StreamStore | None,
                 describe: Callable[[], dict[str, Any]]):
        self.engine = engine
        #: the engine as its optional protocols, when it meets them (else None)
        self.generator = cast(SupportsGeneration, engine) if caps.generation else None
        self.pins = cast(SupportsPins, engine) if caps.pins else None
        self.table = table
        self.reply = responder
        self.stats = stats
        self.store = store
        self.describe = describe

    # ---- sequence check ----------------------------------------------------------------

    def admit(self, work: Work) -> int | None:
        """Owner check, then sequence check; answers duplicates/errors itself. Returns the
        expected seq or None."""
        if self._forbidden(work):
            return None
        decision = self.table.check(work.stream, work.seq, work.type)
        if decision.verdict is Verdict.APPLY:
            return decision.expected if self._may_create(work, decision.expected) else None
        if decision.verdict is Verdict.REPLAY:
            self.stats.add(Count.DUPLICATES_REPLAYED)
            assert decision.reply is not None
            if work.type == MessageType.CLOSE and self.reply.close_pending(work.stream):
                # a resent CLOSE (same batch as the first, or the write failed): its ACK
                # too must wait until the close is on disk
                self.reply.hold(work, decision.reply)
            else:
                self.reply.send(work, *decision.reply)
        elif decision.verdict is Verdict.EXPIRED:
            self.stats.add(Count.EXPIRED_REPLIES)
            self.reply.send(work, MessageType.EXPIRED, {
                F_STREAM: work.stream, F_SEQ: work.seq, F_EXPECTED: decision.expected,
                F_MESSAGE: decision.message})
        else:
            assert decision.code is not None
            self.reply.error(work, decision.code, decision.message, decision.expected)
        return None

    def _forbidden(self, work: Work) -> bool:
        """Answer ERROR FORBIDDEN (True) when ``work``'s caller is not its stream's owner
        (serving.owners); checked before anything else, so nothing about the stream leaks.
        A closed or expired stream's id may be started over (and OPENed) by anyone."""
        owner, live = self.table.owner(work.stream)
        if owner is None or permits(owner, work.caller):
            return False
        if not live and (work.type == MessageType.OPEN or (
                work.seq == 0 and work.type in (MessageType.PUSH, MessageType.GENERATE))):
            return False
        self.reply.error(work, ErrorCode.FORBIDDEN,
                         f"stream {work.stream!r} belongs to another client identity (the "
                         "CURVE key or stream token that created it)")
        return True

    def _may_create(self, work: Work, expected: int) -> bool:
        """True unless ``work`` creates a stream beyond its identity's limit of open
        streams (then answered ERROR QUOTA_EXCEEDED)."""
        if work.stream in self.table or self.table.owners.claim(work.stream, work.caller):
            return True
        self.reply.error(work, ErrorCode.QUOTA_EXCEEDED,
                         f"this client identity has {self.table.owners.limit} open streams, "
                         "its limit (--max-streams-per-identity): close one first", expected)
        return False

    # ---- before the step: OPEN, RESET, CLOSE, GENERATE ---------------------------------

    def before(self, items: list[Work | GenerateGroup]) -> None:
        """Apply the plan's requests that run before the step, in order."""
        self.table.owners.drop_claims()  # the claims of the last round did their work
        for item in items:
            if isinstance(item, GenerateGroup):
                self._generate_group(item)
            elif item.type == MessageType.OPEN:
                self._open(item)
            else:
                expected = self.admit(item)
                if expected is not None:
                    self._apply_admitted(item, expected)

    def _open(self, work: Work) -> None:
        stream = work.stream
        if self._forbidden(work):
            return
        if F_PIN in work.msg.header:
            try:
                self._set_pin(stream, work.msg.header[F_PIN])
            except StreamRNNError as exc:
                self.reply.error(work, exc.code, str(exc))
                return
        pinned = self.pins.pinned(stream) if self.pins is not None else None
        self.reply.send(work, MessageType.ACK, {
            F_STREAM: stream, F_NEXT_SEQ: self.table.next_seq(stream), F_PIN: pinned,
            "worker": self.describe()})

    def _set_pin(self, stream: str, version: int | None) -> None:
        """Pin ``stream`` to a published weights version (None: follow the latest)."""
        if self.pins is None:
            raise NotSupportedError("weights version pins need a worker that follows published "
                                    "weights (streamrnn worker --weights-from DIR)")
        if version is None:
            self.pins.unpin(stream)
            return
        try:
            self.pins.pin(stream, version)
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidInputError(f"cannot pin {stream!r} to weights version {version}: {exc}",
                                    ErrorCode.BAD_VALUE) from exc

    def _apply_admitted(self, work: Work, expected: int) -> None:
        """Apply a sequenced RESET/CLOSE/GENERATE that passed the sequence check."""
        try:
            reply = self._run_sequenced(work)
        except StreamRNNError as exc:
            self.reply.error(work, exc.code, str(exc), expected)
            return
        except ValueError as exc:
            self.reply.error(work, ErrorCode.BAD_VALUE, str(exc), expected)
            return
        except Exception as exc:
            log.exception("%s of stream %r failed", work.type.name, work.stream)
            self.reply.error(work, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", expected)
            return
        if reply is not None:
            self.stats.add(Count.applied(work.type))
            self.reply.send(work, *reply)

    def _run_sequenced(self, work: Work) -> CachedReply | None:
        """Run a RESET/CLOSE/GENERATE on the engine; its reply, or None when it is held."""
        stream, seq = work.stream, work.seq
        if work.type == MessageType.RESET:
            if stream in self.engine:  # a stream without a slot is in its initial state
                self.engine.reset(stream)
            reply: CachedReply = (MessageType.ACK,
                                  {F_STREAM: stream, F_SEQ: seq, F_NEXT_SEQ: seq + 1}, {})
            self.table.applied(stream, seq, reply)
            return reply
        if work.type == MessageType.CLOSE:
            if stream in self.engine:
                self.engine.close(stream)
            reply = (MessageType.ACK, {F_STREAM: stream, F_SEQ: seq, F_NEXT_SEQ: 0}, {})
            self.table.closed(stream, seq, reply)
            if self.store is None:
                return reply
            # ACK only once the close is on disk: a restart must not resurrect the stream
            # under an id the client may already reuse from seq 0
            self.stats.add(Count.APPLIED_CLOSE)
            self.reply.hold(work, reply)
            return None
        reply = self._generate(work)
        self.table.applied(stream, seq, reply, MessageType.GENERATE)
        return reply

    # ---- GENERATE ----------------------------------------------------------------------

    def _generate(self, work: Work) -> CachedReply:
        if work.invalid is not None:  # over a limit (streamrnn.serving.quotas.over_limits)
            raise work.invalid
        if self.generator is None:
            raise NotSupportedError("this worker's engine does not support GENERATE yet")
        header = work.msg.header
        options = {k: header[k] for k in GENERATE_OPTIONS if k in header}
        out = self.generator.generate(work.stream, work.msg.arrays[A_PROMPT], steps=header[F_STEPS],
                              **options)
        self.stats.add(Count.GENERATE_CALLS)
        return _generate_reply(work, out)

    def _generate_group(self, group: GenerateGroup) -> None:
        """Admit each GENERATE of ``group``; run those of the same weights version together
        (each call is then one ``engine.generate_many`` that refuses bad input before
        changing any state)."""
        by_pin: dict[int | None, dict[str, Work]] = {}
        for work in group.works:
            if self.admit(work) is None:
                continue
            if work.invalid is not None:  # over a limit: answered alone, with its error
                self._apply_admitted(work, work.seq)
                continue
            pin = self.pins.pinned(work.stream) if self.pins is not None else None
            by_pin.setdefault(pin, {})[work.stream] = work
        for members in by_pin.values():
            self._generate_many(group.options, members)

    def _generate_many(self, options: GenerateOptions, group: dict[str, Work]) -> None:
        """Run admitted GENERATEs of distinct streams sharing options and pin in one call."""
        if len(group) == 1:
            (work,) = group.values()
            self._apply_admitted(work, work.seq)
            return
        steps, rest = options
        seeds = {s: int(w.msg.header.get("seed") or 0) for s, w in group.items()}
        prompts = {s: w.msg.arrays[A_PROMPT] for s, w in group.items()}
        assert self.generator is not None  # groups are planned only for generating engines
        try:
            outputs = self.generator.generate_many(prompts, steps=steps, seed=seeds, **dict(rest))
        except (StreamRNNError, ValueError):
            # refused before any state changed (a bad prompt, no room for all): run each
            # alone, so every request gets its own answer
            for work in group.values():
                self._apply_admitted(work, work.seq)
            return
        except Exception as exc:
            log.exception("batched GENERATE of %d streams failed", len(group))
            for work in group.values():
                self.reply.error(work, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}",
                                 work.seq)
            return
        self.stats.add(Count.GENERATE_CALLS)
        self.stats.add(Count.APPLIED_GENERATE, len(group))
        for stream, work in group.items():
            reply = _generate_reply(work, outputs[stream])
            self.table.applied(stream, work.seq, reply, MessageType.GENERATE)
            self.reply.send(work, *reply)


def _generate_reply(work: Work, out: Any) -> CachedReply:
    out = np.asarray(out)
    return (MessageType.OUTPUT, {F_STREAM: work.stream, F_SEQ: work.seq,
                                 F_STEPS: int(out.shape[0]) if out.ndim else 0},
            {A_OUTPUT: out})
