"""Planning one compute round of a worker (pure: no TensorFlow, no sockets, no engine).

The compute thread takes every request that arrived within the batching window (a *batch*)
and asks :func:`plan_batch` what to do with it. The answer is a :class:`Plan`:

* ``stats``: the STATS requests (answered first, with the worker's counters);
* ``before``: the RESET/CLOSE/OPEN/GENERATE requests of the first round, in order, with the
  GENERATEs of distinct streams that share their options gathered into a
  :class:`GenerateGroup` (one batched ``engine.generate_many`` call);
* ``runs``: the PUSH runs of the one batched step: each stream's first PUSH, followed by the
  same stream's next PUSHes when they can share its step (:func:`coalesce`);
* :meth:`Plan.carry`: everything else, in arrival order, for the next batch.

Rounds: within one batch the requests of a stream keep their order. Its n-th PUSH goes into
the n-th round, and its other requests run before the PUSHes of the round that follows its
previous PUSH. Only the first round runs now; the later rounds are carried into the next
batch (ahead of newly arrived requests), so each step is filled with as many distinct
streams as possible.

Example::

    plan = plan_batch(batch, coalesce_steps=64, group_generates=True)
    for item in plan.before: ...          # a Work, or a GenerateGroup
    outputs = engine.push_many({run[0].stream: concat(run) for run in plan.runs})
    carry = plan.carry(put_back=[])       # the next batch starts with these
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamrnn.codec import Message
from streamrnn.errors import StreamRNNError
from streamrnn.protocol import F_REQUEST_ID, F_SEQ, F_STEPS, F_STREAM, F_TOKEN, MessageType
from streamrnn.serving.owners import Caller

__all__ = [
    "GenerateGroup",
    "GenerateOptions",
    "Plan",
    "Round",
    "Work",
    "coalesce",
    "generate_options",
    "group_generates_in",
    "plan_batch",
    "prefix",
    "split_rounds",
]

#: Engine.generate's defaults of the options GENERATEs must share to run in one call
#: ("seed" may differ per stream).
_GENERATE_DEFAULTS = {"sample": "greedy", "temperature": 1.0, "top_k": None, "end_token": None}

GenerateOptions = tuple[int, tuple[tuple[str, Any], ...]]
"""``(steps, ((option, value), ...))``: what GENERATEs batched together must share."""


@dataclass(slots=True)
class Work:
    """One decoded request on its way to the compute thread.

    ``chunk`` is a PUSH's validated chunk ``(T, D)`` (or ``(T,)`` tokens), or ``invalid``
    says why it is unusable (the I/O thread checks every PUSH on arrival, so a PUSH has
    exactly one of the two).
    """

    identity: bytes  # the client's ROUTER identity
    msg: Message
    received: float  # time.monotonic() on arrival
    chunk: np.ndarray | None = None
    invalid: StreamRNNError | None = None
    batched: bool = False  # came in a BATCH envelope: its reply goes in a BATCH_REPLY
    user: str | None = None  # the client's CURVE public key (z85 ZAP User-Id); None: no CURVE

    @property
    def type(self) -> MessageType:
        return self.msg.type

    @property
    def stream(self) -> str:
        return self.msg.header[F_STREAM]

    @property
    def seq(self) -> int:
        return self.msg.header[F_SEQ]

    @property
    def rid(self) -> int | None:
        return self.msg.header.get(F_REQUEST_ID)

    @property
    def caller(self) -> Caller:
        """Who sent it (CURVE key, ``token`` field, connection): see serving.owners."""
        return Caller(self.user, self.msg.header.get(F_TOKEN), self.identity)


@dataclass
class Round:
    """The requests of one round: at most one PUSH per stream."""

    before: list[Work] = field(default_factory=list)  # RESET/CLOSE/OPEN/GENERATE, in order
    pushes: list[Work] = field(default_factory=list)


@dataclass(frozen=True)
class GenerateGroup:
    """GENERATEs of distinct streams with the same options, to run in one batched call
    (the compute thread still checks each one's sequence number and pin first)."""

    options: GenerateOptions
    works: tuple[Work, ...]


@dataclass
class Plan:
    """What one compute round does with a batch (see the module docstring)."""

    stats: list[Work] = field(default_factory=list)
    before: list[Work | GenerateGroup] = field(default_factory=list)
    runs: list[list[Work]] = field(default_factory=list)
    later: list[Work] = field(default_factory=list)  # later rounds' requests not in a run
    batch: list[Work] = field(default_factory=list, repr=False)  # arrival order

    def carry(self, put_back: Iterable[Work] = ()) -> list[Work]:
        """The requests for the next batch, in arrival order: :attr:`later` plus
        ``put_back`` (the rest of a run whose first PUSH was not applied)."""
        keep = {id(w) for w in self.later} | {id(w) for w in put_back}
        if not keep:
            return []
        return [w for w in self.batch if id(w) in keep]


def split_rounds(batch: list[Work]) -> tuple[list[Work], list[Round]]:
    """``(STATS requests, rounds)`` of a batch (see the module docstring)."""
    stats: list[Work] = []
    rounds: list[Round] = []
    next_round: dict[str, int] = {}
    for work in batch:
        if work.type == MessageType.STATS:
            stats.append(work)
            continue
        stream = work.stream
        index = next_round.get(stream, 0)
        while len(rounds) <= index:
            rounds.append(Round())
        if work.type == MessageType.PUSH:
            rounds[index].pushes.append(work)
            next_round[stream] = index + 1
        else:
            rounds[index].before.append(work)
    return stats, rounds


def plan_batch(batch: list[Work], coalesce_steps: int, group_generates: bool = True) -> Plan:
    """Plan the round that runs now (see :class:`Plan`).

    Args:
        batch: the requests taken, in arrival order.
        coalesce_steps: a stream's PUSH run holds at most this many timesteps (0: one PUSH
            per stream per step).
        group_generates: whether the engine batches GENERATEs (``generate_many``); without
            it every GENERATE is applied on its own.
    """
    stats, rounds = split_rounds(batch)
    if not rounds:
        return Plan(stats=stats, batch=batch)
    first = rounds[0].before
    before = group_generates_in(first) if group_generates else list(first)
    runs = coalesce(rounds, coalesce_steps)
    taken = {id(w) for run in runs for w in run}
    later = {id(w) for r in rounds[1:] for w in (*r.before, *r.pushes)} - taken
    return Plan(stats=stats, before=before, runs=runs,
                later=[w for w in batch if id(w) in later], batch=batch)


def group_generates_in(works: list[Work]) -> list[Work | GenerateGroup]:
    """``works`` in order, with GENERATEs of distinct streams sharing options gathered.

    A group is closed (placed at that point) when a stream it holds comes again, so that
    stream's earlier GENERATE is applied first; the other requests stay where they are.
    """
    steps: list[Work | GenerateGroup] = []
    groups: dict[GenerateOptions, list[Work]] = {}
    pending: set[str] = set()
    for work in works:
        if work.stream in pending:
            steps += [GenerateGroup(key, tuple(group)) for key, group in groups.items()]
            groups.clear()
            pending.clear()
        if work.type == MessageType.GENERATE:
            groups.setdefault(generate_options(work.msg.header), []).append(work)
            pending.add(work.stream)
        else:
            steps.append(work)
    steps += [GenerateGroup(key, tuple(group)) for key, group in groups.items()]
    return steps


def generate_options(header: dict[str, Any]) -> GenerateOptions:
    """The options GENERATE requests must share to run in one batched call (hashable)."""
    return header[F_STEPS], tuple((k, header.get(k, v)) for k, v in _GENERATE_DEFAULTS.items())


def prefix(run: list[Work], length: int) -> tuple[int, int]:
    """``(PUSHes, timesteps)`` of the longest prefix of ``run`` within ``length`` timesteps
    (the first PUSH always counts)."""
    count, total = 1, len(run[0].chunk)
    for work in run[1:]:
        if total + len(work.chunk) > length:
            break
        count, total = count + 1, total + len(work.chunk)
    return count, total


def coalesce(rounds: list[Round], limit: int) -> list[list[Work]]:
    """The PUSH runs of this step: each round-0 PUSH, followed by the same stream's PUSHes
    of the next rounds when they can share its step.

    A queued PUSH joins its stream's run when it is valid, its seq follows the run's last,
    no RESET/CLOSE/OPEN/GENERATE of the stream comes between them, and the run stays within
    ``limit`` timesteps. The step then carries a longer slice of each stream for the same
    per-step cost (dispatch, packing, replies): under backlog, throughput moves toward that
    of long chunks, and each chunk still gets its own reply. Runs are cut to the padded
    length ``B`` (a power of two) that the chunks fill best, the longest among equals, so
    coalescing never adds masked timesteps.
    """
    runs = [[work] for work in rounds[0].pushes]
    if limit <= 0 or len(rounds) == 1:
        return runs
    valid = [run for run in runs if run[0].invalid is None]  # a PUSH has chunk xor invalid
    _extend_runs(valid, rounds, limit)
    if not any(len(run) > 1 for run in valid):
        return runs
    best = _best_length(valid, limit)
    for run in valid:
        del run[prefix(run, best)[0]:]
    return runs


def _extend_runs(valid: list[list[Work]], rounds: list[Round], limit: int) -> None:
    """Append to each run its stream's following PUSHes of the later rounds (in place)."""
    blocked = [{w.stream for w in r.before} for r in rounds]
    pushes = [{w.stream: w for w in r.pushes} for r in rounds]
    for run in valid:
        stream, total = run[0].stream, len(run[0].chunk)
        for i in range(1, len(rounds)):
            follower = pushes[i].get(stream)
            if (stream in blocked[i] or follower is None or follower.invalid is not None
                    or follower.seq != run[-1].seq + 1 or not _same_caller(follower, run[0])
                    or total + len(follower.chunk) > limit):
                break
            run.append(follower)
            total += len(follower.chunk)


def _best_length(valid: list[list[Work]], limit: int) -> int:
    """The padded length (a power of two up to ``limit``, at least every run's first
    chunk) that the runs' prefixes fill best; the longest among equals."""
    ends = [list(itertools.accumulate(len(w.chunk) for w in run)) for run in valid]
    longest_first = max(e[0] for e in ends)
    best_fill, best_length = 0.0, longest_first
    length = 1
    while length <= limit:
        if length >= longest_first:
            # a run's prefix within `length` (prefix()): up to its last chunk ending there
            # (the ends never fall; the first always counts: it ends <= length)
            used = sum(e[bisect.bisect_right(e, length) - 1] for e in ends)
            fill = used / (length * len(valid))
            if fill >= best_fill:
                best_fill, best_length = fill, length
        length *= 2
    return best_length


def _same_caller(work: Work, first: Work) -> bool:
    """Whether ``work`` has ``first``'s credentials (CURVE key and token), so it may join
    the run whose first PUSH passed the owner check (serving.owners)."""
    return work.user == first.user and \
        work.msg.header.get(F_TOKEN) == first.msg.header.get(F_TOKEN)
