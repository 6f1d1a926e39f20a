"""The pure round planner of the worker (streamrnn.serving.batching): rounds, GENERATE
groups and what is carried into the next batch. No TensorFlow, no sockets: fake requests.

The choice of coalesced PUSH runs is tested in test_coalesce.py.
"""

from __future__ import annotations

import numpy as np

from streamrnn.codec import Message
from streamrnn.protocol import MessageType
from streamrnn.serving.batching import (
    GenerateGroup,
    Work,
    generate_options,
    group_generates_in,
    plan_batch,
    split_rounds,
)


def _req(kind: MessageType, stream: str = "", seq: int = 0, steps: int = 4, **header) -> Work:
    fields = {"stream": stream, "seq": seq, **header} if kind != MessageType.STATS else {}
    if kind == MessageType.GENERATE:
        fields.setdefault("steps", 6)
    chunk = np.zeros((steps, 2), np.float32) if kind == MessageType.PUSH else None
    return Work(b"id", Message(kind, fields, {}), 0.0, chunk=chunk)


def push(stream: str, seq: int, steps: int = 4) -> Work:
    return _req(MessageType.PUSH, stream, seq, steps)


def gen(stream: str, seq: int, **options) -> Work:
    return _req(MessageType.GENERATE, stream, seq, **options)


def _names(items) -> list:
    return [[(w.stream, w.seq) for w in item.works] if isinstance(item, GenerateGroup)
            else (item.type.name, item.stream, item.seq) for item in items]


def test_rounds_keep_each_streams_order():
    reset = _req(MessageType.RESET, "a", 1)
    stats = _req(MessageType.STATS)
    batch = [push("a", 0), stats, push("b", 0), reset, push("a", 2), push("b", 1)]
    got_stats, rounds = split_rounds(batch)
    assert got_stats == [stats]
    assert [[(w.stream, w.seq) for w in r.pushes] for r in rounds] == [
        [("a", 0), ("b", 0)], [("a", 2), ("b", 1)]]
    assert rounds[0].before == [] and rounds[1].before == [reset]  # after a's first PUSH


def test_only_the_first_round_runs_and_the_rest_is_carried_in_arrival_order():
    batch = [push("a", 0), push("a", 1), push("b", 0), _req(MessageType.CLOSE, "a", 2)]
    plan = plan_batch(batch, coalesce_steps=0)
    assert [[w.seq for w in run] for run in plan.runs] == [[0], [0]]
    assert plan.carry() == [batch[1], batch[3]]
    # a run's rest that could not run goes back too, still in arrival order
    assert plan.carry(put_back=[batch[2]]) == batch[1:]


def test_coalesced_pushes_are_not_carried():
    batch = [push("a", 0), push("a", 1), push("a", 2, steps=60)]
    plan = plan_batch(batch, coalesce_steps=16)
    assert [[w.seq for w in run] for run in plan.runs] == [[0, 1]]
    assert plan.carry() == [batch[2]]


def test_a_batch_of_only_stats_plans_nothing_else():
    stats = _req(MessageType.STATS)
    plan = plan_batch([stats], coalesce_steps=64)
    assert plan.stats == [stats] and not plan.before and not plan.runs and plan.carry() == []


def test_generates_with_the_same_options_form_one_group():
    batch = [gen("a", 0), gen("b", 0), gen("c", 0, sample="temperature"),
             _req(MessageType.OPEN, "d"), gen("e", 0)]
    plan = plan_batch(batch, coalesce_steps=64)
    # the OPEN runs where it is; the groups run once no stream of theirs comes again
    assert _names(plan.before) == [("OPEN", "d", 0), [("a", 0), ("b", 0), ("e", 0)],
                                   [("c", 0)]]


def test_a_group_closes_before_its_stream_comes_again():
    batch = [gen("a", 0), gen("b", 0), _req(MessageType.RESET, "a", 1), gen("a", 2),
             gen("c", 0)]
    assert _names(group_generates_in(batch)) == [
        [("a", 0), ("b", 0)], ("RESET", "a", 1), [("a", 2), ("c", 0)]]


def test_without_batched_generation_every_request_stands_alone():
    batch = [gen("a", 0), gen("b", 0)]
    plan = plan_batch(batch, coalesce_steps=64, group_generates=False)
    assert plan.before == batch


def test_generate_options_fill_in_the_engines_defaults():
    assert generate_options({"steps": 5}) == generate_options(
        {"steps": 5, "sample": "greedy", "temperature": 1.0, "seed": 3})
    assert generate_options({"steps": 5}) != generate_options({"steps": 6})
    assert generate_options({"steps": 5}) != generate_options({"steps": 5, "top_k": 2})
