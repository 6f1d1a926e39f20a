"""The checkpoint directory meets :class:`~streamrnn.serving.store.StreamStore` unchanged.

A file store holds every stream, its lease never lapses, ``acquire`` restores nothing; a
worker given the store as an argument behaves as one given ``checkpoint_dir``. Real
sockets, a real TF model, an in-process worker.
"""

from __future__ import annotations

import numpy as np
import pytest

import streamrnn
from streamrnn import Engine
from streamrnn.serving.checkpoint import load_checkpoint
from streamrnn.serving.durability import WorkerCheckpointer, checkpoint_path
from streamrnn.serving.sequencing import SequenceTable
from streamrnn.serving.store import StreamStore
from streamrnn.serving.worker import StreamWorker, WorkerConfig
from tests.helpers.durable_helpers import SPEC
from tests.helpers.modelzoo import build_model, offline, random_input


def test_file_store_meets_the_protocol_and_holds_every_stream(tmp_path):
    store = WorkerCheckpointer(tmp_path, name="w1")
    assert isinstance(store, StreamStore)
    assert store.where == str(checkpoint_path(tmp_path, "w1")) == str(store.path)
    table = SequenceTable()
    assert store.lease_valid() and store.holds("anything")
    assert store.acquire(["a", "b", "a"], None, table) == {"a", "b"}
    assert len(table) == 0 and store.durable == {}  # nothing restored, nothing claimed
    assert store.report() == {}
    store.close()  # nothing to let go
    assert not checkpoint_path(tmp_path, "w1").exists()


def test_worker_given_a_file_store_serves_and_writes_as_with_checkpoint_dir(tmp_path):
    model = build_model(SPEC, seed=4)
    x = random_input(SPEC, 12, np.random.default_rng(2))
    engine = Engine.from_keras(model, slots=2, jit_compile=False)
    with pytest.raises(ValueError, match="not both"):
        StreamWorker(engine, WorkerConfig(checkpoint_dir=str(tmp_path)),
                     store=WorkerCheckpointer(tmp_path))
    store = WorkerCheckpointer(tmp_path, name="w9", every_steps=1)
    worker = StreamWorker(engine, WorkerConfig(bind="tcp://127.0.0.1:0", name="w9"),
                          store=store)
    assert worker.store is store and worker.checkpointer is store and not worker.fenced
    endpoint = worker.start()
    try:
        with streamrnn.Client(endpoint) as client:
            got = np.concatenate([client.push("a", x[:5]), client.push("a", x[5:])])
            stats = client.stats()
    finally:
        worker.stop()
        assert worker.join(30)
    assert np.abs(got - offline(model, x)).max() <= 1e-5
    assert stats["checkpoint"]["path"] == store.where and stats["checkpoint"]["written"] >= 1
    assert load_checkpoint(store.path).streams["a"].next_seq == 2  # the last write on stop
    assert not worker.fenced
