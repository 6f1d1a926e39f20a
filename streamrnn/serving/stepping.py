"""The batched step of a compute round: one ``engine.push_many`` over the streams' PUSH runs.

A *run* is a stream's first PUSH of the round followed by the PUSHes coalesced with it
(:func:`~streamrnn.serving.batching.coalesce`): its chunks are concatenated into one slice
``(T1 + T2 + ..., D)`` for the step, and each PUSH is answered with its own part of the
outputs. A run whose first PUSH is not applied (a duplicate, a gap, a bad chunk, no room
for a new stream) is answered and the rest of it goes back to the next batch.

Example::

    step = PushStep(applier)
    put_back = step.run([[push_a0, push_a1], [push_b0]])
"""

from __future__ import annotations

import logging
import time

import numpy as np

from streamrnn.errors import StreamRNNError
from streamrnn.protocol import A_OUTPUT, F_SEQ, F_STEPS, F_STREAM, ErrorCode, MessageType
from streamrnn.serving.applying import Applier
from streamrnn.serving.batching import Work
from streamrnn.serving.sequencing import CachedReply
from streamrnn.serving.stats import Count

__all__ = ["PushStep"]

log = logging.getLogger("streamrnn.worker")


class PushStep:
    """Runs the PUSH runs of a round through the engine and answers every PUSH."""

    def __init__(self, applier: Applier):
        self._applier = applier
        self._engine = applier.engine
        self._reply = applier.reply
        self._stats = applier.stats

    def run(self, runs: list[list[Work]]) -> list[Work]:
        """Step the runs' streams once; returns the PUSHes to carry into the next batch."""
        ready, carry = self._admit(runs)
        if ready:
            carry += self._refuse_beyond_room(ready)
        if not ready:
            return carry
        chunks = {stream: run[0].chunk if len(run) == 1
                  else np.concatenate([w.chunk for w in run]) for stream, run in ready.items()}
        began = time.monotonic()
        outputs, failed = self._push(chunks, ready)
        carry += failed
        self._stats.step(time.monotonic() - began, len(ready) / self._engine.slots)
        store = self._applier.store
        if store is not None:
            store.count_step()
        self._answer(ready, outputs)
        return carry

    def _admit(self, runs: list[list[Work]]) -> tuple[dict[str, list[Work]], list[Work]]:
        """``(stream -> run, carry)``: the runs whose first PUSH may be applied."""
        ready: dict[str, list[Work]] = {}
        carry: list[Work] = []
        for run in runs:
            work = run[0]
            expected = self._applier.admit(work)
            if expected is None:
                carry += run[1:]
                continue
            if work.invalid is not None:
                self._reply.error(work, work.invalid.code, str(work.invalid), expected)
                continue
            ready[work.stream] = run
        return ready, carry

    def _refuse_beyond_room(self, ready: dict[str, list[Work]]) -> list[Work]:
        """Answer ENGINE_FULL to the new streams beyond the engine's room (removed from
        ``ready``); returns the rest of their runs."""
        engine = self._engine
        carry: list[Work] = []
        new_streams = [s for s in ready if s not in engine]
        room = engine.capacity_left  # free slots plus host-memory swap room
        for stream in new_streams[room:]:
            work, *rest = ready.pop(stream)
            carry += rest
            self._reply.error(work, ErrorCode.ENGINE_FULL,
                              f"worker is full: {len(engine.streams)} streams live "
                              f"(slots={engine.slots}, max_streams={engine.max_streams}); "
                              "close a stream or retry later", work.seq)
        return carry

    def _push(self, chunks: dict[str, np.ndarray], ready: dict[str, list[Work]]
              ) -> tuple[dict[str, np.ndarray], list[Work]]:
        """``(stream -> outputs, carry)``: one batched push, or each stream alone if it
        fails (a stream that fails alone too is answered with its error)."""
        try:
            return self._engine.push_many(chunks, validated=True), []
        except Exception:
            log.exception("batched push failed; retrying the %d streams one by one", len(ready))
        outputs: dict[str, np.ndarray] = {}
        carry: list[Work] = []
        for stream, run in ready.items():
            try:
                outputs[stream] = self._engine.push(stream, chunks[stream])
                continue
            except StreamRNNError as exc:
                code, message = exc.code, str(exc)
            except Exception as exc:
                log.exception("push of stream %r failed", stream)
                code, message = ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"
            self._reply.error(run[0], code, message, run[0].seq)
            carry += run[1:]
        return outputs, carry

    def _answer(self, ready: dict[str, list[Work]], outputs: dict[str, np.ndarray]) -> None:
        """Count the applied PUSHes and answer each with its slice of its stream's outputs."""
        applied = [run for stream, run in ready.items() if stream in outputs]
        self._stats.add(Count.APPLIED_PUSH, sum(len(run) for run in applied))
        self._stats.add(Count.COALESCED_PUSH, sum(len(run) - 1 for run in applied))
        self._stats.add(Count.TIMESTEPS, sum(len(o) for o in outputs.values()))
        table = self._applier.table
        for stream, out in outputs.items():
            start = 0
            for work in ready[stream]:
                steps = len(work.chunk)
                reply: CachedReply = (MessageType.OUTPUT,
                                      {F_STREAM: stream, F_SEQ: work.seq, F_STEPS: steps},
                                      {A_OUTPUT: out[start:start + steps]})
                start += steps
                table.applied(stream, work.seq, reply)
                self._reply.send(work, *reply)
                self._stats.chunk_done(work.received)
