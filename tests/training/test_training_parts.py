"""The trainer's parts on their own: the config rules, the checkpoint file format (pure
numpy, no model), and the online trainer as an EngineLike (a real small trainer)."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from streamrnn.engine.interface import (
    Capabilities,
    EngineLike,
    SupportsGeneration,
    SupportsPins,
    SupportsSnapshots,
    capabilities_of,
)
from streamrnn.errors import InvalidInputError
from streamrnn.protocol import ErrorCode
from streamrnn.training.checkpoint import CHECKPOINT_FORMAT, TrainerCheckpoint, table_from
from streamrnn.training.config import TrainConfig
from streamrnn.training.online import OnlineTrainer
from streamrnn.training.trainer import FreeRunningTrainer
from tests.helpers.trainer_process import sample_checkpoint as _checkpoint

# ---- config ----------------------------------------------------------------------------


def test_config_names_every_problem_at_once_in_rule_order():
    with pytest.raises(InvalidInputError) as err:
        TrainConfig(mode="x", warmup=0, schedule="exponential", schedule_k=3.0,
                    learning_rate=0.0).validate()
    assert err.value.code == ErrorCode.BAD_VALUE
    assert str(err.value).split("; ") == [
        "mode must be one of ('free', 'teacher', 'scheduled'), got 'x'",
        "warmup must be >= 1 observed step, got 0",
        "exponential schedule needs 0 < schedule_k < 1, got 3.0",
        "learning_rate must be > 0, got 0.0",
    ]
    TrainConfig().validate()  # the defaults are usable
    TrainConfig(schedule="exponential", schedule_k=0.5, sample="top_k", top_k=3).validate()


# ---- the trainer's checkpoint file -----------------------------------------------------


def test_checkpoint_arrays_round_trip_and_layout(tmp_path):
    ck = _checkpoint()
    arrays = ck.to_arrays()
    assert list(arrays) == ["weight/0", "weight/1", "optimizer/0", "optimizer/1", "state/0",
                            "pending/1", "meta"]  # pending/i: the i-th stream ("a")
    meta = json.loads(bytes(arrays["meta"]).decode())
    assert meta == {"format": CHECKPOINT_FORMAT, "step": 7, "version": 2, "timesteps": 42,
                    "last_loss": 0.25, "config": {"mode": "free"},
                    "streams": [["b", 2, 30], ["a", 0, 12]], "optimizer": "Adam"}
    ck.save(tmp_path / "t.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]  # no temp file left
    back = TrainerCheckpoint.load(tmp_path / "t.npz")
    assert back is not None and TrainerCheckpoint.load(tmp_path / "missing.npz") is None
    for got, want in zip(back.weights + back.optimizer + back.states,
                         ck.weights + ck.optimizer + ck.states, strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert back.streams == ck.streams and back.pending.keys() == {"a"}
    assert np.array_equal(back.pending["a"], ck.pending["a"])
    assert (back.step, back.version, back.timesteps, back.last_loss) == (7, 2, 42, 0.25)


def test_checkpoint_of_another_format_is_refused():
    arrays = _checkpoint().to_arrays()
    meta = json.loads(bytes(arrays["meta"]).decode())
    arrays["meta"] = np.frombuffer(json.dumps({**meta, "format": 99}).encode(), np.uint8)
    with pytest.raises(InvalidInputError) as err:
        TrainerCheckpoint.from_arrays(arrays)
    assert err.value.code == ErrorCode.NOT_SUPPORTED


def test_table_puts_each_stream_back_in_its_slot():
    table = _checkpoint().table(slots=4)
    assert table.slot_of("b") == 2 and table.slot_of("a") == 0
    assert table.info("b").steps == 30 and table.free == 2
    assert sorted(table) == ["a", "b"]
    for bad in ([("a", 4, 0)], [("a", 1, 0), ("b", 1, 0)]):
        with pytest.raises(InvalidInputError) as err:
            table_from(4, bad)
        assert err.value.code == ErrorCode.BAD_VALUE


# ---- the online trainer as an EngineLike -----------------------------------------------


def _online(slots: int = 2) -> OnlineTrainer:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((None, 2)), keras.layers.GRU(4, return_sequences=True),
                              keras.layers.Dense(2)])
    return OnlineTrainer(FreeRunningTrainer(model, slots=slots, config=TrainConfig(warmup=2)))


def test_online_trainer_is_an_engine_like_without_optional_capabilities():
    online = _online()
    assert EngineLike in type(online).__mro__  # declared, not only structurally alike
    assert isinstance(online, EngineLike)
    assert not isinstance(online, SupportsGeneration | SupportsPins | SupportsSnapshots)
    assert capabilities_of(online) == Capabilities(generation=False, pins=False,
                                                   snapshots=False)
    assert (online.slots, online.max_streams, online.capacity_left) == (2, 2, 2)
    assert (online.input_kind, online.input_dim, online.output_dim) == ("features", 2, 2)
    assert online.weights_version == 0 and online.streams == []


def test_online_trainer_engine_verbs():
    online = _online()
    chunk = np.random.default_rng(0).standard_normal((6, 2)).astype(np.float32)
    assert online.validate(chunk) is not None
    with pytest.raises(InvalidInputError) as err:
        online.validate(np.zeros((6, 3), np.float32))
    assert err.value.code == ErrorCode.BAD_SHAPE
    out = online.push("a", chunk)
    assert out.shape == (6, 2) and np.isnan(out[0]).all() and np.isfinite(out[1:]).all()
    outs = online.push_many({"a": chunk, "b": chunk}, validated=True)
    assert {s: o.shape for s, o in outs.items()} == {"a": (6, 2), "b": (6, 2)}
    assert "a" in online and online.is_resident("a") and not online.is_resident("z")
    assert online.streams == ["a", "b"] and online.capacity_left == 0
    stats = online.stats()
    assert (stats["slots"], stats["free_slots"], stats["steps"], stats["streams"]) == (2, 0, 2, 2)
    online.reset("a")
    online.close("b")
    assert online.streams == ["a"] and online.capacity_left == 1 and "b" not in online
