"""Weights versions: publishing, hot swaps that keep every stream's state, and pins (swaps,
refusals and pins under every executor)."""

from __future__ import annotations

import numpy as np
import pytest

import streamrnn
from streamrnn.engine.weights import (
    WeightsFollower,
    latest_version,
    list_versions,
    load_weights,
    publish_weights,
)
from streamrnn.errors import InvalidInputError
from streamrnn.protocol import ErrorCode, MessageType
from streamrnn.serving.checkpoint import load_checkpoint, save_checkpoint
from streamrnn.serving.durability import WorkerCheckpointer
from streamrnn.serving.sequencing import SequenceTable
from tests.helpers.engines import EXECUTORS, engine_on
from tests.helpers.weights_helpers import D, model_with_seed, offline_with_swap


@pytest.mark.parametrize("executor", EXECUTORS)
def test_swap_mid_stream_keeps_every_state(executor):
    old, new = model_with_seed(0).get_weights(), model_with_seed(1).get_weights()
    engine = engine_on(executor, model_with_seed(0), slots=4, jit_compile=False)
    rng = np.random.default_rng(0)
    seqs = {s: rng.standard_normal((n, D)).astype(np.float32)
            for s, n in [("a", 30), ("b", 22), ("c", 40)]}
    split = {"a": 13, "b": 9, "c": 21}
    before = engine.push_many({s: seqs[s][: split[s]] for s in seqs})
    assert engine.weights_version == 0
    engine.set_weights(new, version=7)
    assert engine.weights_version == 7
    after = {s: engine.push(s, seqs[s][split[s]:]) for s in seqs}
    for s, seq in seqs.items():
        got = np.concatenate([before[s], after[s]])
        want = offline_with_swap(old, new, seq, split[s])
        assert np.abs(got - want).max() <= 1e-5, s
        # and it is not simply the old or the new model on the whole stream
        assert np.abs(got - np.asarray(model_with_seed(1)(seq[None]))[0]).max() > 1e-3


@pytest.mark.parametrize("executor", EXECUTORS)
def test_bad_weights_are_refused_before_anything_changes(executor):
    engine = engine_on(executor, model_with_seed(0), slots=2, jit_compile=False)
    x = np.ones((5, D), np.float32)
    engine.push("a", x)
    snap = engine.snapshot("a")
    weights = model_with_seed(1).get_weights()
    for bad in (weights[:-1], [*weights[:-1], np.zeros(3, np.float32)]):
        with pytest.raises(InvalidInputError) as err:
            engine.set_weights(bad)
        assert err.value.code == ErrorCode.BAD_SHAPE
    assert engine.weights_version == 0
    assert all(np.array_equal(a, b) for a, b in zip(engine.snapshot("a"), snap, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(
        engine.serving.get_weights(), model_with_seed(0).get_weights(), strict=True))


def test_publish_directory_layout(tmp_path):
    assert latest_version(tmp_path) is None
    for v in range(1, 8):
        publish_weights(tmp_path, model_with_seed(v).get_weights(), v, {"step": 10 * v}, keep=3)
    assert latest_version(tmp_path) == 7
    assert list_versions(tmp_path) == [5, 6, 7]
    weights, meta = load_weights(tmp_path)
    assert meta["version"] == 7 and meta["step"] == 70
    assert all(np.array_equal(a, b) for a, b in zip(weights, model_with_seed(7).get_weights(),
                                                    strict=True))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    with pytest.raises(InvalidInputError):
        load_weights(tmp_path, 2)


def test_follower_polls_at_most_every_poll_s(tmp_path):
    base = streamrnn.Engine.from_keras(model_with_seed(0), slots=2, jit_compile=False)
    follower = WeightsFollower(base, tmp_path, poll_s=3600.0)
    assert follower.weights_version == 0  # nothing published yet: serves the model as loaded
    publish_weights(tmp_path, model_with_seed(1).get_weights(), 1)
    follower.push("a", np.ones((3, D), np.float32))
    assert follower.weights_version == 0  # the next poll is an hour away
    assert follower.poll(force=True) and follower.weights_version == 1
    assert not follower.poll(force=True)  # nothing newer


@pytest.mark.parametrize("executor", EXECUTORS)
def test_pinned_stream_stays_on_its_version(tmp_path, executor):
    w1, w2 = model_with_seed(1).get_weights(), model_with_seed(2).get_weights()
    publish_weights(tmp_path, w1, 1)
    follower = WeightsFollower(
        engine_on(executor, model_with_seed(0), slots=3, jit_compile=False), tmp_path,
        poll_s=0.0)
    rng = np.random.default_rng(5)
    a, b = (rng.standard_normal((20, D)).astype(np.float32) for _ in range(2))
    follower.pin("b", 1)
    first = follower.push_many({"a": a[:8], "b": b[:8]})
    publish_weights(tmp_path, w2, 2)
    second = follower.push_many({"a": a[8:], "b": b[8:]})
    assert follower.weights_version == 2 and follower.stats()["pinned_streams"] == 1
    got_a = np.concatenate([first["a"], second["a"]])
    got_b = np.concatenate([first["b"], second["b"]])
    assert np.abs(got_a - offline_with_swap(w1, w2, a, 8)).max() <= 1e-5
    assert np.abs(got_b - offline_with_swap(w1, w1, b, 8)).max() <= 1e-5
    # the pin's swap-back restored the latest weights for everyone else
    assert all(np.array_equal(x, y) for x, y in zip(follower.serving.get_weights(), w2,
                                                    strict=True))
    follower.unpin("b")
    third = follower.push("b", b[:4])
    assert third.shape == (4, 2)
    with pytest.raises(InvalidInputError):
        follower.pin("c", 9)


def test_pins_survive_a_checkpoint_and_restore(tmp_path):
    """A worker checkpoint keeps every stream's pin (version 0 too, the model file's own
    weights, which are never published), so a restarted worker keeps serving the pinned
    streams with their versions; files without pins still load."""
    w0, w1 = model_with_seed(0).get_weights(), model_with_seed(1).get_weights()
    pub = tmp_path / "pub"
    rng = np.random.default_rng(3)
    x = {s: rng.standard_normal((16, D)).astype(np.float32) for s in ("zero", "one", "free")}

    def follower() -> WeightsFollower:
        engine = streamrnn.Engine.from_keras(model_with_seed(0), slots=3, jit_compile=False)
        return WeightsFollower(engine, pub, poll_s=0)

    first = follower()  # serving version 0
    first.pin("zero", 0)
    publish_weights(pub, w1, 1)
    head = first.push_many({s: v[:6] for s, v in x.items()})  # polls: v1 from here on
    first.pin("one", 1)
    table = SequenceTable()
    for s in x:
        table.applied(s, 0, (MessageType.OUTPUT, {}, {}))
    WorkerCheckpointer(tmp_path / "ckpt").save(first, table)
    publish_weights(pub, model_with_seed(2).get_weights(), 2)

    second = follower()  # a restart: starts at the latest published version, 2
    assert second.weights_version == 2
    assert WorkerCheckpointer(tmp_path / "ckpt").restore(second, SequenceTable()) == 3
    assert second.pins() == {"zero": 0, "one": 1}
    tail = second.push_many({s: v[6:] for s, v in x.items()})
    got = {s: np.concatenate([head[s], tail[s]]) for s in x}
    assert np.abs(got["zero"] - offline_with_swap(w0, w0, x["zero"], 6)).max() <= 1e-5
    assert np.abs(got["one"] - offline_with_swap(w1, w1, x["one"], 6)).max() <= 1e-5
    w2 = model_with_seed(2).get_weights()
    assert np.abs(got["free"] - offline_with_swap(w1, w2, x["free"], 6)).max() <= 1e-5

    # a checkpoint written before pins were saved (no "pins" entry) restores unpinned
    path = tmp_path / "ckpt" / "worker.ckpt"
    old = load_checkpoint(path)
    del old.extra["pins"]
    save_checkpoint(path, old)
    third = follower()
    assert WorkerCheckpointer(tmp_path / "ckpt").restore(third, SequenceTable()) == 3
    assert third.pins() == {}
