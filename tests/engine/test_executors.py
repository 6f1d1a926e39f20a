"""The engine over each executor: choosing one (auto, named, fallback with its reason) and
the contract across them: snapshots and checkpoints move between executors, weights pins
are converted once per version (no rebuild per step), and generation gives the same tokens
under every executor, each compared with one offline Keras call (max abs <= 1e-5).

The streaming contract itself (random chunking, interleaving, resets, swaps) runs for every
executor in tests/engine/test_engine.py; swaps and pins in tests/engine/test_weights.py.
"""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest

from streamrnn import Engine
from streamrnn.engine.weights import WeightsFollower, publish_weights
from streamrnn.errors import NotSupportedError, UnsupportedModelError
from tests.helpers.engines import EXECUTORS, engine_on, torch_installed
from tests.helpers.modelzoo import ModelSpec, build_model, offline, random_input
from tests.helpers.weights_helpers import D, model_with_seed, offline_with_swap

TOL = 1e-5


def make(model: keras.Model, executor: str, slots: int = 3, **options) -> Engine:
    """An engine on ``executor`` (torch: skipped where it is not installed)."""
    return engine_on(executor, model, slots, **({"jit_compile": False, "max_bucket": 8}
                                                | options))


def masking_models() -> list[keras.Model]:
    keras.utils.set_random_seed(0)
    tokens = keras.Sequential([keras.Input((None,), dtype="int32"),
                               keras.layers.Embedding(9, 4, mask_zero=True),
                               keras.layers.GRU(5, return_sequences=True),
                               keras.layers.Dense(2)])
    features = keras.Sequential([keras.Input((None, 3)), keras.layers.Masking(0.0),
                                 keras.layers.LSTM(5, return_sequences=True)])
    return [tokens, features]


def test_auto_runs_onnxruntime_on_cpu():
    engine = Engine.from_keras(build_model(ModelSpec("gru", layers=2)), slots=2)
    stats = engine.stats()
    assert engine.executor.name == stats["executor"] == "onnxruntime"
    assert stats["executor_fallback"] is None
    assert "onnxruntime" in engine.kernel and engine.kernel == stats["kernel"]


@pytest.mark.parametrize("which", ["mask_zero", "Masking"])
def test_auto_falls_back_to_keras_with_the_reason_and_named_executors_refuse(which, caplog):
    model = masking_models()[["mask_zero", "Masking"].index(which)]
    with caplog.at_level(logging.INFO, logger="streamrnn.engine"):
        engine = Engine.from_keras(model, slots=2, jit_compile=False)
    assert engine.executor.name == engine.stats()["executor"] == "keras"
    reason = engine.stats()["executor_fallback"]
    assert reason.startswith("onnxruntime: masking") and "layer '" in reason
    assert engine.executor_fallback == reason
    logged = [r for r in caplog.records if r.name == "streamrnn.engine"]
    assert len(logged) == 1 and logged[0].levelno == logging.INFO
    assert "keras" in logged[0].getMessage() and "masking" in logged[0].getMessage()
    with pytest.raises(UnsupportedModelError, match="executor='onnxruntime'.*masking"):
        Engine.from_keras(model, slots=2, executor="onnxruntime")
    keras_engine = Engine.from_keras(model, slots=2, executor="keras", jit_compile=False)
    assert keras_engine.executor_fallback is None  # named: nothing fell back


def test_named_torch_refuses_masking_too():
    pytest.importorskip("torch")
    with pytest.raises(UnsupportedModelError, match="executor='torch'.*mask"):
        Engine.from_keras(masking_models()[0], slots=2, executor="torch")


def test_unknown_executors_and_precisions_are_refused():
    model = build_model(ModelSpec("lstm"))
    with pytest.raises(ValueError, match="executor='tensorrt'"):
        Engine.from_keras(model, slots=2, executor="tensorrt")
    with pytest.raises(ValueError, match="precision='fp8'"):
        Engine.from_keras(model, slots=2, precision="fp8")
    for executor in ("onnxruntime", "keras"):
        with pytest.raises(NotSupportedError, match="torch executor only"):
            Engine.from_keras(model, slots=2, executor=executor, precision="bf16")
    try:  # auto with bf16 means torch: it runs there, or says why not (never float32 quietly)
        engine = Engine.from_keras(model, slots=2, precision="bf16")
    except NotSupportedError as exc:
        assert "bf16" in str(exc) or "torch" in str(exc)
    else:
        assert engine.executor.name == "torch"


def test_a_stream_moves_between_executors_by_snapshot_and_checkpoint():
    """Same state order everywhere: a stream started on Keras continues on ONNX Runtime
    from a snapshot, then on torch (or Keras again) from exported states."""
    spec = ModelSpec("lstm", layers=2)
    model = build_model(spec, seed=3)
    x = random_input(spec, 36, np.random.default_rng(3))
    first = make(model, "keras")
    outs = [first.push("s", x[:10])]
    second = make(model, "onnxruntime")
    second.push("other", x[:3])
    second.restore("s", first.snapshot("s"))
    outs.append(second.push("s", x[10:22]))
    last = "torch" if torch_installed() else "keras"
    third = make(model, last, max_streams=5)
    third.import_states(second.export_states())
    assert third.export_states()["s"][1] == 12  # step counts travel too (since the restore)
    outs.append(third.push("s", x[22:]))
    np.testing.assert_allclose(np.concatenate(outs), offline(model, x), atol=TOL, rtol=0)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_pinned_groups_alternate_without_rebuilding(executor, tmp_path):
    """Streams pinned to versions 0 and 1 and unpinned ones (version 2) step in every
    push_many: each pinned version is converted once (ONNX Runtime: one session), not per
    step, and every stream stays on its version."""
    w = [model_with_seed(k).get_weights() for k in range(3)]
    publish_weights(tmp_path, w[1], 1)
    publish_weights(tmp_path, w[2], 2)
    engine = make(model_with_seed(0), executor, slots=4)
    follower = WeightsFollower(engine, tmp_path, poll_s=3600.0)
    assert follower.weights_version == 2
    pins = {"zero": 0, "one": 1}
    for stream, version in pins.items():
        follower.pin(stream, version)
    rng = np.random.default_rng(1)
    seqs = {s: rng.standard_normal((24, D)).astype(np.float32) for s in ("zero", "one", "two")}
    before = engine.stats()["weight_conversions"]
    outs = {s: [] for s in seqs}
    for k in range(6):
        for s, y in follower.push_many({s: v[4 * k:4 * k + 4] for s, v in seqs.items()}
                                       ).items():
            outs[s].append(y)
    conversions = engine.stats()["weight_conversions"] - before
    assert conversions == (0 if executor == "keras" else 2)  # once per pinned version
    for s, version in {**pins, "two": 2}.items():
        want = offline_with_swap(w[version], w[version], seqs[s], 12)
        assert np.abs(np.concatenate(outs[s]) - want).max() <= TOL, s
    follower.unpin("zero")
    follower.close("one")
    assert engine.versions.kept == ([] if executor == "keras" else [2])


GEN_VOCAB = 12


def token_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((None,), dtype="int32"), keras.layers.Embedding(GEN_VOCAB, 6),
        keras.layers.GRU(10, return_sequences=True),
        keras.layers.Dense(GEN_VOCAB, activation="softmax",
                           kernel_initializer=keras.initializers.RandomNormal(0, 1.5)),
    ])


def _generate_on(executor: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Generation after a weights swap, beside an idle stream; returns the tokens and each
    stream's outputs for one more chunk (checked against offline here)."""
    served = token_model(1)
    engine = make(token_model(0), executor, slots=4)
    engine.set_weights(served.get_weights())  # generation must see them too
    rng = np.random.default_rng(2)
    prompts = {"a": rng.integers(0, GEN_VOCAB, 5), "b": rng.integers(0, GEN_VOCAB, 3)}
    idle = rng.integers(0, GEN_VOCAB, 4).astype(np.int32)
    engine.push("idle", idle)
    idle_rows = engine.snapshot("idle")
    tokens = engine.generate_many(prompts, steps=9, sample="top_k", top_k=4, seed=7)
    for got, want in zip(engine.snapshot("idle"), idle_rows, strict=True):
        np.testing.assert_array_equal(got, want)  # generation moved no other row
    after = {}
    tail = rng.integers(0, GEN_VOCAB, 4).astype(np.int32)
    for s, prompt in prompts.items():
        history = np.concatenate([prompt, tokens[s], tail]).astype(np.int32)
        after[s] = engine.push(s, tail)
        np.testing.assert_allclose(after[s], offline(served, history)[-len(tail):],
                                   atol=TOL, rtol=0)
    return tokens, after


def test_generation_gives_the_same_tokens_under_every_executor():
    reference, _ = _generate_on("keras")
    for executor in ("onnxruntime", "torch"):
        if executor == "torch" and not torch_installed():
            continue
        tokens, _ = _generate_on(executor)
        for s in reference:
            np.testing.assert_array_equal(tokens[s], reference[s], err_msg=executor)


def test_pinned_generation_runs_the_pinned_weights_on_onnxruntime(tmp_path):
    """Generation runs on the Keras clone: a pinned stream's loop gets its version's
    weights there, and the latest are back for everyone else afterwards."""
    w0, w1 = token_model(0).get_weights(), token_model(1).get_weights()
    publish_weights(tmp_path, w1, 1)
    results = {}
    for executor in ("keras", "onnxruntime"):
        follower = WeightsFollower(make(token_model(0), executor), tmp_path, poll_s=3600.0)
        follower.pin("old", 0)
        prompt = np.array([3, 1, 4], np.int32)
        results[executor] = follower.generate_many({"old": prompt, "new": prompt}, steps=6)
        for got, want in zip(follower.serving.get_weights(), w1, strict=True):
            np.testing.assert_array_equal(got, want)
    for s in ("old", "new"):
        np.testing.assert_array_equal(results["onnxruntime"][s], results["keras"][s])
    reference = Engine.from_keras(token_model(0), slots=2, executor="keras", jit_compile=False)
    reference.set_weights(w0)
    np.testing.assert_array_equal(
        results["keras"]["old"], reference.generate("old", np.array([3, 1, 4]), steps=6))
