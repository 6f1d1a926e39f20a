"""The streaming-equals-offline contract for the in-process Engine.

For random models, chunkings, interleavings (more streams than slots over time), resets and
closes, each stream's concatenated outputs equal one full-sequence call of the original
model from the initial state (max abs difference <= 1e-5). The contract tests run under
every executor (Keras, ONNX Runtime, torch where installed); the Keras executor's own
mechanics (traces, compact steps, XLA) are checked with ``executor="keras"``.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamrnn import Engine, EngineFullError
from tests.helpers.engines import EXECUTORS, engine_on
from tests.helpers.modelzoo import ModelSpec, build_model, random_input
from tests.helpers.modelzoo import offline as offline_call

TOL = 1e-5
_MODELS: dict[tuple[ModelSpec, int], keras.Model] = {}
_OFFLINE: dict[tuple[int, bytes, bool], tuple[keras.Model, np.ndarray]] = {}


def model_of(spec: ModelSpec, seed: int = 0) -> keras.Model:
    """``build_model(spec, seed)``, built once per module (the executors share it)."""
    if (spec, seed) not in _MODELS:
        _MODELS[(spec, seed)] = build_model(spec, seed=seed)
    return _MODELS[(spec, seed)]


def offline(model: keras.Model, seq: np.ndarray, return_sequences: bool = True) -> np.ndarray:
    """The offline reference, computed once per model and sequence (the same schedules run
    under every executor)."""
    key = (id(model), seq.tobytes(), return_sequences)
    if key not in _OFFLINE:  # holds the model, so its id stays unique
        _OFFLINE[key] = (model, offline_call(model, seq, return_sequences))
    return _OFFLINE[key][1]

SPECS = [
    ModelSpec("lstm", layers=1),
    ModelSpec("gru", layers=2),
    ModelSpec("simple", layers=3, units=6),
    ModelSpec("lstm", layers=2, tokens=True, features=11),
    ModelSpec("gru", layers=1, tokens=True, features=7, return_sequences=False),
    ModelSpec("lstm", layers=2, return_sequences=False),
    ModelSpec("lstm", layers=1, generic_cell=True),
    ModelSpec("gru", layers=2, generic_cell=True, tokens=True, features=9),
]


def run_schedule(engine: Engine, model: keras.Model, spec: ModelSpec, seed: int) -> None:
    """Drive random interleaved chunks, resets and closes; check every stream vs offline."""
    rng = np.random.default_rng(seed)
    n_streams = engine.slots + 3  # more streams than slots: some must close before others open
    lengths = rng.integers(5, 40, size=n_streams)
    sequences = [random_input(spec, int(n), rng) for n in lengths]
    # Random resets split a stream's sequence into independent segments.
    reset_at = [set(rng.choice(np.arange(1, n), size=rng.integers(0, 2), replace=False).tolist())
                for n in lengths]
    position = [0] * n_streams
    outputs: list[list[np.ndarray]] = [[] for _ in range(n_streams)]
    waiting = list(range(n_streams))
    live: list[int] = []
    checked = 0
    while waiting or live:
        while waiting and len(live) < engine.slots:
            live.append(waiting.pop(0))
        batch = {}
        for i in live:
            if rng.random() < 0.3:
                continue  # this stream sends nothing in this step
            start = position[i]
            stop = min(int(lengths[i]), start + int(rng.integers(1, 13)))
            cut = [r for r in reset_at[i] if start < r < stop]
            if cut:
                stop = cut[0]
            batch[f"s{i}"] = sequences[i][start:stop]
        for name, out in engine.push_many(batch).items():
            i = int(name[1:])
            assert out.shape == (len(batch[name]), spec.out)
            outputs[i].append(out)
            position[i] += len(out)
        for i in list(live):
            if position[i] in reset_at[i]:
                check_segment(model, spec, sequences[i], outputs[i], position[i])
                reset_at[i].discard(position[i])
                engine.reset(f"s{i}")
            elif position[i] == lengths[i]:
                check_segment(model, spec, sequences[i], outputs[i], position[i])
                engine.close(f"s{i}")
                live.remove(i)
                checked += 1
    assert checked == n_streams


def check_segment(model, spec, sequence, pieces, end):
    """Compare the outputs since the last reset with offline on that segment."""
    streamed = np.concatenate(pieces)
    start = end - len(streamed)
    expected = offline(model, sequence[start:end], spec.return_sequences)
    np.testing.assert_allclose(streamed, expected, atol=TOL, rtol=0)
    pieces.clear()


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: repr(s)[9:-1].replace(" ", ""))
def test_streaming_equals_offline(spec, executor):
    model = model_of(spec, seed=1)
    engine = engine_on(executor, model, slots=4, max_bucket=8)
    run_schedule(engine, model, spec, seed=2)
    assert engine.stats()["executor"] == executor
    if executor != "keras":
        return
    runner = engine.runner
    # one trace per bucket, for the full step and for each compact (gathered-rows) step
    assert runner.trace_count <= len(runner.buckets) * (1 + len(runner.row_buckets))
    if not spec.generic_cell:  # fused: steps with at most 2 chunks ran on 2 gathered rows
        assert runner.row_buckets == [2] and 0 < runner.compact_steps_run < runner.steps_run


@pytest.mark.parametrize("executor", ["onnxruntime", "keras"])
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cell=st.sampled_from(["lstm", "gru", "simple"]),
    layers=st.integers(1, 3),
    tokens=st.booleans(),
    return_sequences=st.booleans(),
    slots=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_streaming_equals_offline_random_models(executor, cell, layers, tokens,
                                                return_sequences, slots, seed):
    spec = ModelSpec(cell, layers=layers, tokens=tokens, features=9 if tokens else 4,
                     return_sequences=return_sequences)
    model = build_model(spec, seed=seed)
    engine = Engine.from_keras(model, slots=slots, max_bucket=4, jit_compile=False,
                               executor=executor)
    run_schedule(engine, model, spec, seed=seed)
    assert engine.stats()["executor"] == executor


def test_compact_steps_equal_full_steps_under_xla_and_plain():
    """A step with few chunks gathers their slots' rows (a quarter or half of the slots),
    steps them and scatters their states back: the same outputs as computing every row,
    with and without XLA, and no other slot's state moves."""
    spec = ModelSpec("lstm", layers=2, units=16)
    model = build_model(spec, seed=4)
    rng = np.random.default_rng(4)
    xs = {f"c{i}": random_input(spec, 30, rng) for i in range(16)}
    for jit in (True, False):
        engine = Engine.from_keras(model, slots=16, max_bucket=16, jit_compile=jit,
                                   executor="keras")
        assert engine.runner.row_buckets == [4, 8]
        outs = {s: [engine.push(s, x[:3])] for s, x in xs.items()}  # every slot holds a state
        before = engine.snapshot("c0")
        for round_ in range(6):
            few = [f"c{i}" for i in range(1, 16) if (i + round_) % 3]  # 10 of 16 slots
            for group in (few[:4], few[4:10]):  # 4 chunks -> 4 rows, 6 chunks -> 8 rows
                chunks = {}
                for s in group:
                    done = sum(len(o) for o in outs[s])
                    chunks[s] = xs[s][done:done + 1 + (round_ + len(s)) % 5]
                for s, y in engine.push_many(chunks).items():
                    outs[s].append(y)
        assert engine.runner.compact_steps_run == 16 + 12  # the 16 single pushes too
        for row, row_before in zip(engine.snapshot("c0"), before, strict=True):
            np.testing.assert_array_equal(row, row_before)  # never in a compact step
        for s in outs:
            got = np.concatenate(outs[s])
            np.testing.assert_allclose(got, offline(model, xs[s][: len(got)]), atol=TOL,
                                       rtol=0, err_msg=s)


def test_xla_and_plain_steps_agree():
    spec = ModelSpec("lstm", layers=2, units=16)
    model = build_model(spec, seed=3)
    x = random_input(spec, 50, np.random.default_rng(0))
    outs = []
    for jit in (True, False):
        engine = Engine.from_keras(model, slots=2, max_bucket=16, jit_compile=jit,
                                   executor="keras")
        outs.append(np.concatenate([engine.push("a", x[:13]), engine.push("a", x[13:])]))
    np.testing.assert_allclose(outs[0], outs[1], atol=TOL, rtol=0)
    np.testing.assert_allclose(outs[0], offline(model, x), atol=TOL, rtol=0)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_long_chunk_is_split_across_steps_transparently(executor):
    spec = ModelSpec("gru", layers=1)
    model = model_of(spec)
    engine = engine_on(executor, model, slots=2, max_bucket=8)
    x = random_input(spec, 100, np.random.default_rng(1))  # 100 > 8: split into 13 steps
    np.testing.assert_allclose(engine.push("a", x), offline(model, x), atol=TOL, rtol=0)
    assert engine.stats()["steps"] == 13


def test_retracing_is_bounded_by_buckets():
    model = build_model(ModelSpec("lstm"))
    engine = Engine.from_keras(model, slots=3, max_bucket=16, executor="keras")
    rng = np.random.default_rng(0)
    for _ in range(40):
        engine.push_many({f"s{k}": rng.standard_normal((int(rng.integers(1, 40)), 5))
                          .astype(np.float32) for k in range(3)})
    assert engine.runner.row_buckets == []  # 3 slots: too few to gather a smaller batch
    assert engine.runner.trace_count <= len(engine.runner.buckets) == 5


@pytest.mark.parametrize("executor", EXECUTORS)
def test_reset_and_close_leave_other_streams_untouched(executor):
    spec = ModelSpec("lstm", layers=2)
    model = model_of(spec)
    engine = engine_on(executor, model, slots=3, max_bucket=8)
    rng = np.random.default_rng(4)
    a, b = random_input(spec, 20, rng), random_input(spec, 20, rng)
    out_a = [engine.push("a", a[:10])]
    engine.push("b", b[:10])
    before = engine.snapshot("a")
    engine.reset("b")
    engine.close("b")
    engine.push("c", b[:3])  # reuses b's slot
    for got, want in zip(engine.snapshot("a"), before, strict=True):
        np.testing.assert_array_equal(got, want)
    out_a.append(engine.push("a", a[10:]))
    np.testing.assert_allclose(np.concatenate(out_a), offline(model, a), atol=TOL, rtol=0)
    # A reused slot starts from the initial state, not from the closed stream's state.
    np.testing.assert_allclose(engine.push("d", b[:4]), offline(model, b[:4]), atol=TOL, rtol=0)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_snapshot_restore_moves_a_stream_between_slots(executor):
    spec = ModelSpec("gru", layers=2)
    model = model_of(spec)
    engine = engine_on(executor, model, slots=4, max_bucket=8)
    x = random_input(spec, 30, np.random.default_rng(5))
    first = engine.push("a", x[:12])
    snap = engine.snapshot("a")
    engine.close("a")
    engine.push("filler", x[:2])  # takes the freed slot, so "a" comes back elsewhere
    engine.restore("a", snap)
    assert engine.table.slot_of("a") != engine.table.slot_of("filler")
    rest = engine.push("a", x[12:])
    np.testing.assert_allclose(np.concatenate([first, rest]), offline(model, x), atol=TOL, rtol=0)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_from_keras_accepts_saved_file_and_stateful_models_of_any_batch(tmp_path, executor):
    keras.utils.set_random_seed(0)
    trained = keras.Sequential([
        keras.Input((None, 4), batch_size=7),
        keras.layers.LSTM(8, stateful=True, return_sequences=True),
        keras.layers.Dropout(0.3),
        keras.layers.LayerNormalization(),
        keras.layers.TimeDistributed(keras.layers.Dense(5)),
        keras.layers.Dense(2, activation="tanh"),
    ])
    path = tmp_path / "m.keras"
    trained.save(path)
    engine = engine_on(executor, str(path), slots=3)
    x = np.random.default_rng(0).standard_normal((25, 4)).astype(np.float32)
    reference = keras.Sequential([
        keras.Input((None, 4)),
        keras.layers.LSTM(8, return_sequences=True),
        keras.layers.Dropout(0.3),
        keras.layers.LayerNormalization(),
        keras.layers.TimeDistributed(keras.layers.Dense(5)),
        keras.layers.Dense(2, activation="tanh"),
    ])
    reference.set_weights(trained.get_weights())
    got = np.concatenate([engine.push("s", x[:9]), engine.push("s", x[9:])])
    np.testing.assert_allclose(got, offline(reference, x), atol=TOL, rtol=0)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_functional_chain_with_stacked_cells_streams(executor):
    keras.utils.set_random_seed(0)
    inp = keras.Input((None, 3))
    cells = [keras.layers.LSTMCell(6), keras.layers.GRUCell(5)]
    h = keras.layers.RNN(keras.layers.StackedRNNCells(cells), return_sequences=True)(inp)
    out = keras.layers.Dense(2)(h)
    model = keras.Model(inp, out)
    engine = engine_on(executor, model, slots=2, max_bucket=4)
    x = np.random.default_rng(0).standard_normal((17, 3)).astype(np.float32)
    got = np.concatenate([engine.push("s", x[:5]), engine.push("s", x[5:])])
    np.testing.assert_allclose(got, offline(model, x), atol=TOL, rtol=0)
    assert len(engine.state_layout) == 3  # LSTM h, c and GRU h
    if executor == "keras":
        assert len(engine.bank.variables) == 3


def test_mask_zero_embedding_streams_like_offline():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((None,), dtype="int32"),
        keras.layers.Embedding(10, 4, mask_zero=True),
        keras.layers.LSTM(6, return_sequences=True),
        keras.layers.Dense(3),
    ])
    engine = Engine.from_keras(model, slots=2, max_bucket=8)
    assert engine.stats()["executor"] == "keras"  # auto: ONNX Runtime cannot mask
    ids = np.array([3, 1, 0, 0, 5, 9, 0, 2, 2, 7, 1, 0, 4], dtype=np.int32)
    # Chunks never start on a masked token (see README: outputs at masked steps carry).
    got = np.concatenate([engine.push("s", ids[:4]), engine.push("s", ids[4:7]),
                          engine.push("s", ids[7:])])
    np.testing.assert_allclose(got, offline(model, ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_more_streams_than_slots_swap_to_host_and_back_with_identical_outputs(executor):
    spec = ModelSpec("lstm", layers=2)
    model = model_of(spec)
    engine = engine_on(executor, model, slots=3, max_bucket=8, max_streams=12)
    rng = np.random.default_rng(7)
    sequences = {f"s{i}": random_input(spec, 30, rng) for i in range(10)}
    position = dict.fromkeys(sequences, 0)
    segment_start = dict.fromkeys(sequences, 0)
    outputs = {s: [] for s in sequences}
    while any(p < 30 for p in position.values()):
        # Random arrival order; sometimes more streams in one call than there are slots.
        pending = [s for s in sequences if position[s] < 30]
        chosen = rng.choice(pending, size=min(len(pending), int(rng.integers(1, 6))),
                            replace=False)
        batch = {}
        for s in chosen:
            n = int(rng.integers(1, 9))
            batch[s] = sequences[s][position[s]:position[s] + n]
            position[s] += len(batch[s])
        for s, out in engine.push_many(batch).items():
            outputs[s].append(out)
        if rng.random() < 0.2:
            victim = str(rng.choice(engine.streams))
            engine.reset(victim)  # may be swapped out at this moment
            outputs[victim] = []
            segment_start[victim] = position[victim]
    for s, seq in sequences.items():
        if segment_start[s] == len(seq):  # reset after its last chunk
            assert outputs[s] == []
            continue
        expected = offline(model, seq[segment_start[s]:])
        np.testing.assert_allclose(np.concatenate(outputs[s]), expected, atol=TOL, rtol=0)
    stats = engine.stats()
    assert stats["swaps_out"] > 0 and stats["swaps_in"] > 0
    assert stats["streams"] == 10 and stats["swapped_streams"] == 7


def test_max_streams_limit_is_a_clear_error():
    engine = Engine.from_keras(build_model(ModelSpec("gru")), slots=2, max_streams=3)
    for s in "abc":
        engine.push(s, np.zeros((1, 5), np.float32))
    with pytest.raises(EngineFullError, match="max_streams=3"):
        engine.push("d", np.zeros((1, 5), np.float32))
    engine.close("a")  # a swapped-out stream can be closed too
    engine.push("d", np.zeros((1, 5), np.float32))
    assert sorted(engine.streams) == ["b", "c", "d"]
