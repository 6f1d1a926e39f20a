"""The declared engine interfaces: Engine and WeightsFollower (real objects, small models)
meet EngineLike and their optional capabilities, the Keras executor meets Executor and the
state bank StateRows; the pure engine modules import no TensorFlow."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from streamrnn import Engine
from streamrnn.engine.interface import (
    Capabilities,
    EngineLike,
    Executor,
    StateRows,
    SupportsGeneration,
    SupportsPins,
    SupportsSnapshots,
    TakesStepWeights,
    capabilities_of,
)
from streamrnn.engine.weights import WeightsFollower, publish_weights
from tests.helpers.engines import EXECUTORS, engine_on
from tests.helpers.modelzoo import ModelSpec, build_model
from tests.helpers.weights_helpers import D, model_with_seed


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_keras(build_model(ModelSpec("lstm", features=4)), slots=2,
                             jit_compile=False, executor="keras")


def test_engine_meets_enginelike_with_generation_and_snapshots(engine):
    assert isinstance(engine, EngineLike)
    assert isinstance(engine, SupportsGeneration)
    assert isinstance(engine, SupportsSnapshots)
    assert not isinstance(engine, SupportsPins)
    assert capabilities_of(engine) == Capabilities(generation=True, pins=False, snapshots=True)


def test_engine_executor_and_state_rows_meet_their_protocols(engine):
    assert isinstance(engine.executor, Executor)
    assert engine.executor.name == "keras"
    assert engine.executor.device in ("CPU", "GPU")
    assert engine.executor.kernel == engine.kernel
    assert engine.runner is engine.executor  # the older name still works
    assert isinstance(engine.bank, StateRows) and engine.bank is engine.executor.state
    layout = engine.state_layout
    initial = engine.initial_state()
    assert [(str(r.dtype), r.shape) for r in initial] == layout
    initial[0][...] = 7.0  # a copy: the engine's own initial rows are untouched
    assert not np.any(engine.initial_state()[0] == 7.0)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_every_executor_meets_executor_with_its_rows_in_the_same_layout(executor):
    model = build_model(ModelSpec("lstm", features=4))
    engine = engine_on(executor, model, slots=2, jit_compile=False)
    assert isinstance(engine.executor, Executor) and engine.executor.name == executor
    assert isinstance(engine.bank, StateRows) and engine.bank is engine.executor.state
    # weights travel with a step (converted once per version) everywhere but on Keras
    assert isinstance(engine.executor, TakesStepWeights) == (executor != "keras")
    assert engine.state_layout == [("float32", (8,)), ("float32", (8,))]  # LSTM h, c
    assert isinstance(engine, EngineLike) and engine.kernel == engine.executor.kernel


def test_weights_follower_meets_every_protocol_without_getattr(tmp_path):
    base = Engine.from_keras(model_with_seed(0), slots=2, jit_compile=False)
    follower = WeightsFollower(base, tmp_path, poll_s=0.0)
    assert not hasattr(WeightsFollower, "__getattr__")
    assert isinstance(follower, EngineLike)
    assert capabilities_of(follower) == Capabilities(generation=True, pins=True,
                                                     snapshots=True)
    x = np.ones((4, D), np.float32)
    assert follower.validate(x).dtype == np.float32
    follower.push("a", x)
    assert "a" in follower and follower.is_resident("a") and follower.streams == ["a"]
    assert (follower.slots, follower.max_streams, follower.capacity_left) == (2, 2, 1)
    assert (follower.input_kind, follower.input_dim, follower.output_dim) == ("features", D, 2)
    assert follower.kernel == base.kernel and follower.serving is base.serving
    assert follower.state_layout == base.state_layout
    states = follower.export_states()
    assert list(states) == ["a"] and states["a"][1] == 4
    publish_weights(tmp_path, model_with_seed(1).get_weights(), 1)
    follower.pin("a", 0)
    assert follower.pinned("a") == 0 and follower.pins() == {"a": 0}
    follower.push("a", x)  # polls: v1 is served to the others, "a" stays on v0
    assert follower.weights_version == 1
    follower.reset("a")
    assert follower.export_states()["a"][1] == 0
    follower.close("a")
    assert "a" not in follower and follower.pins() == {}
    follower.import_states(states)
    assert np.allclose(follower.snapshot("a")[0], states["a"][0][0])
    assert follower.stats()["weights_version"] == 1


PURE = [
    "streamrnn.engine.interface",
    "streamrnn.engine.residency",
    "streamrnn.engine.sampling",
    "streamrnn.engine.slots",
    "streamrnn.engine.validation",
    "streamrnn.executors.buckets",
    "streamrnn.executors.rows",
]


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_tensorflow(module):
    code = (f"import sys, {module}; "
            "bad = [m for m in ('tensorflow', 'keras', 'zmq') if m in sys.modules]; "
            "print(*bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout or done.stderr
