"""Checkpoint files: atomic, checksummed, refused when corrupt; engine states round-trip."""

import numpy as np
import pytest

from streamrnn import Engine
from streamrnn.serving.checkpoint import (
    Checkpoint,
    CheckpointError,
    StreamRecord,
    load_checkpoint,
    save_checkpoint,
)
from tests.helpers.modelzoo import ModelSpec, build_model, offline, random_input

TOL = 1e-5


def sample_checkpoint() -> Checkpoint:
    rng = np.random.default_rng(0)
    layout = [("float32", (4,)), ("float32", (4,))]
    streams = {f"s{i}": StreamRecord([rng.standard_normal(4).astype(np.float32)
                                      for _ in layout], next_seq=i * 3, steps=i * 10)
               for i in range(5)}
    return Checkpoint("m", layout, streams, weights_version=7)


def test_roundtrip(tmp_path):
    ckpt = sample_checkpoint()
    save_checkpoint(tmp_path / "c.ckpt", ckpt)
    back = load_checkpoint(tmp_path / "c.ckpt", expect_layout=ckpt.layout)
    assert back.weights_version == 7 and back.model == "m"
    assert back.streams.keys() == ckpt.streams.keys()
    for name, rec in ckpt.streams.items():
        assert (back.streams[name].next_seq, back.streams[name].steps) == (rec.next_seq,
                                                                          rec.steps)
        for a, b in zip(back.streams[name].state, rec.state, strict=True):
            np.testing.assert_array_equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["c.ckpt"]  # no temp files left


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic", "empty"])
def test_corrupt_or_truncated_file_is_refused(tmp_path, damage):
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, sample_checkpoint())
    blob = bytearray(path.read_bytes())
    if damage == "flip":
        blob[len(blob) // 2] ^= 0xFF
    elif damage == "truncate":
        blob = blob[: len(blob) - 7]
    elif damage == "magic":
        blob[:8] = b"NOTACKPT"
    else:
        blob = bytearray()
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupted|truncated|not a streamrnn"):
        load_checkpoint(path)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    save_checkpoint(tmp_path / "c.ckpt", sample_checkpoint())
    with pytest.raises(CheckpointError, match="another model"):
        load_checkpoint(tmp_path / "c.ckpt", expect_layout=[("float32", (8,))])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_engine_states_survive_a_checkpoint_into_a_new_engine(tmp_path):
    spec = ModelSpec("lstm", layers=2)
    model = build_model(spec)
    rng = np.random.default_rng(3)
    seqs = {f"s{i}": random_input(spec, 24, rng) for i in range(5)}
    first = Engine.from_keras(model, slots=3, max_streams=6)  # two streams end up swapped
    head = {s: first.push(s, x[:10]) for s, x in seqs.items()}
    ckpt = Checkpoint("m", first.state_layout, {
        s: StreamRecord(state, next_seq=1, steps=steps)
        for s, (state, steps) in first.export_states().items()
    })
    save_checkpoint(tmp_path / "c.ckpt", ckpt)

    second = Engine.from_keras(model, slots=3, max_streams=6)
    loaded = load_checkpoint(tmp_path / "c.ckpt", expect_layout=second.state_layout)
    second.import_states({s: (r.state, r.steps) for s, r in loaded.streams.items()})
    assert sorted(second.streams) == sorted(seqs)
    for s, x in seqs.items():
        got = np.concatenate([head[s], second.push(s, x[10:])])
        np.testing.assert_allclose(got, offline(model, x), atol=TOL, rtol=0)
