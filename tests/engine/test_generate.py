"""Closed-loop generation through the engine vs the classic one-step-at-a-time recipe."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import streamrnn
from streamrnn.engine.generate import plan_feedback
from streamrnn.engine.token_ops import hash_uniform, pick_tokens
from streamrnn.errors import InvalidInputError, UnsupportedModelError
from streamrnn.protocol import ErrorCode

CELLS = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU, "simple": keras.layers.SimpleRNN}
VOCAB = 13


def token_model(cell: str, seed: int = 0, layers: int = 1, out: int = VOCAB) -> keras.Model:
    keras.utils.set_random_seed(seed)
    stack = [keras.Input((None,), dtype="int32"), keras.layers.Embedding(VOCAB, 8)]
    stack += [CELLS[cell](16, return_sequences=True) for _ in range(layers)]
    # large output weights: confident, well separated argmaxes (no float near-ties)
    stack.append(keras.layers.Dense(out, activation="softmax",
                                    kernel_initializer=keras.initializers.RandomNormal(0, 1.5)))
    return keras.Sequential(stack)


def onehot_model(cell: str, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((None, VOCAB)), CELLS[cell](16, return_sequences=True),
        keras.layers.Dense(VOCAB, activation="softmax",
                           kernel_initializer=keras.initializers.RandomNormal(0, 1.5)),
    ])


def regression_model(cell: str, seed: int = 0, features: int = 3, out: int = 3) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((None, features)), CELLS[cell](12, return_sequences=True),
        keras.layers.Dense(out),
    ])


def make_engine(model: keras.Model, slots: int, **kwargs) -> streamrnn.Engine:
    """Graph-mode (non-XLA) steps: same loop, compiles in a third of the time;
    test_xla_and_graph_loops_agree covers the XLA default."""
    return streamrnn.Engine.from_keras(model, slots=slots, **({"jit_compile": False} | kwargs))


def inference_model(model: keras.Model) -> tuple[keras.Model, list[tuple[int, ...]]]:
    """The classic recipe: the same layers with explicit state inputs and outputs, T=1."""
    chain = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    spec = model.inputs[0]
    x = keras.Input((1, *spec.shape[2:]), dtype=spec.dtype)
    state_inputs, state_outputs, shapes = [], [], []
    h = x
    for layer in chain:
        if not isinstance(layer, keras.layers.RNN):
            h = layer(h)
            continue
        config = layer.get_config() | {"return_sequences": True, "return_state": True}
        rnn = type(layer).from_config(config)
        n = 2 if isinstance(layer, keras.layers.LSTM) else 1
        ins = [keras.Input((layer.units,)) for _ in range(n)]
        h, *outs = rnn(h, initial_state=ins[0] if n == 1 else ins)
        rnn.set_weights(layer.get_weights())
        state_inputs += ins
        state_outputs += outs
        shapes += [(1, layer.units)] * n
    return keras.Model([x, *state_inputs], [h, *state_outputs]), shapes


def reference_generate(model: keras.Model, prompt: np.ndarray, steps: int, mode: str):
    """Prime with ``prompt`` one step at a time, then feed argmax/prediction back."""
    inf, shapes = inference_model(model)
    states = [np.zeros(s, np.float32) for s in shapes]

    def step(x):
        nonlocal states
        y, *new = inf([x[None, None], *states])
        states = [np.asarray(h) for h in new]
        return np.asarray(y)[0, 0]

    for x in prompt:
        y = step(x)
    out = []
    for _ in range(steps):
        if mode == "prediction":
            v = y
            y = step(v)
        else:
            v = int(np.argmax(y))
            y = step(np.eye(VOCAB, dtype=np.float32)[v] if mode == "onehot" else np.int32(v))
        out.append(v)
    return np.array(out)


@pytest.mark.parametrize("cell", ["lstm", "gru", "simple"])
@pytest.mark.parametrize("mode", ["tokens", "onehot", "prediction"])
def test_greedy_generation_equals_reference_loop(cell: str, mode: str) -> None:
    rng = np.random.default_rng(1)
    if mode == "tokens":
        model, prompt = token_model(cell), rng.integers(0, VOCAB, 7).astype(np.int32)
    elif mode == "onehot":
        model = onehot_model(cell)
        prompt = np.eye(VOCAB, dtype=np.float32)[rng.integers(0, VOCAB, 7)]
    else:
        model, prompt = regression_model(cell), rng.standard_normal((7, 3)).astype(np.float32)
    engine = make_engine(model, slots=4)
    engine.push("other", prompt[:3])  # a neighbour slot in use must not matter
    got = engine.generate("s", prompt, steps=24)
    want = reference_generate(model, prompt, 24, mode)
    if mode == "prediction":
        assert got.shape == (24, 3) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5)
    else:
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want)
    assert plan_feedback(engine.serving).mode == mode


def test_stacked_lstm_greedy_equals_reference_loop() -> None:
    model = token_model("lstm", seed=3, layers=2)
    prompt = np.array([1, 5, 2], np.int32)
    engine = make_engine(model, slots=2)
    got = engine.generate("s", prompt, steps=20)
    np.testing.assert_array_equal(got, reference_generate(model, prompt, 20, "tokens"))


def test_generate_then_push_continues_like_offline() -> None:
    """After generate the stream has consumed prompt + every returned token, the last too."""
    model = token_model("gru", seed=2)
    engine = make_engine(model, slots=3)
    first = np.array([3, 1, 4], np.int32)
    prompt = np.array([1, 5], np.int32)
    after = np.array([9, 2, 6], np.int32)
    neighbour = np.array([7, 7, 8, 2], np.int32)
    out_first = engine.push("s", first)
    engine.push("n", neighbour[:2])
    gen = engine.generate("s", prompt, steps=10)
    gen2 = engine.generate("s", np.array([4], np.int32), steps=5)
    out_after = engine.push("s", after)
    out_neighbour = engine.push("n", neighbour[2:])

    history = np.concatenate([first, prompt, gen, [4], gen2, after])
    full = np.asarray(model(history[None]))[0]
    np.testing.assert_allclose(out_first, full[:3], atol=1e-5)
    np.testing.assert_allclose(out_after, full[-3:], atol=1e-5)
    # each generated token is the argmax of the offline output one step before it
    start = len(first) + len(prompt)
    np.testing.assert_array_equal(np.argmax(full[start - 1: start + 9], -1), gen)
    np.testing.assert_allclose(out_neighbour, np.asarray(model(neighbour[None]))[0][2:],
                               atol=1e-5)
    assert engine.table.info("s").steps == len(history)


def test_long_generation_spans_several_compiled_calls() -> None:
    model = token_model("lstm", seed=4)
    engine = make_engine(model, slots=2, executor="keras")  # the compiled loop's path
    prompt = np.array([2, 3], np.int32)
    gen = engine.generate("s", prompt, steps=300)  # > LOOP_CHUNK: the loop is re-entered
    full = np.asarray(model(np.concatenate([prompt, gen])[None]))[0]
    np.testing.assert_array_equal(np.argmax(full[1:-1], -1), gen)
    traces = engine._generator.trace_count
    assert traces > 0
    engine.generate("t", prompt, steps=300)
    assert engine._generator.trace_count == traces  # no retrace for the same lengths


@pytest.mark.parametrize("sample,kwargs", [
    ("greedy", {}),
    ("temperature", {"temperature": 1.5}),
    ("top_k", {"top_k": 3, "temperature": 0.8}),
])
def test_batched_generation_equals_each_stream_alone(sample: str, kwargs: dict) -> None:
    model = token_model("lstm", seed=5)
    rng = np.random.default_rng(2)
    prompts = {f"s{i}": rng.integers(0, VOCAB, 1 + i).astype(np.int32) for i in range(6)}
    batched = make_engine(model, slots=8)
    together = batched.generate_many(prompts, steps=30, sample=sample, seed=11, **kwargs)

    alone = make_engine(model, slots=16)
    for k, (stream, prompt) in enumerate(reversed(prompts.items())):
        alone.push(f"filler{k}", np.array([k % VOCAB], np.int32))  # different slots
        got = alone.generate(stream, prompt, steps=30, sample=sample, seed=11, **kwargs)
        np.testing.assert_array_equal(got, together[stream])
        assert alone.table.slot_of(stream) != batched.table.slot_of(stream)


def test_more_streams_than_slots_generate_in_waves() -> None:
    model = token_model("simple", seed=13)
    rng = np.random.default_rng(6)
    prompts = {f"w{i}": rng.integers(0, VOCAB, 2 + i % 3).astype(np.int32) for i in range(7)}
    engine = make_engine(model, slots=3, max_streams=8)
    together = engine.generate_many(prompts, steps=12, sample="top_k", top_k=4, seed=3)
    assert len(engine.streams) == 7
    single = make_engine(model, slots=1)
    for stream, prompt in prompts.items():
        got = single.generate(stream, prompt, steps=12, sample="top_k", top_k=4, seed=3)
        np.testing.assert_array_equal(got, together[stream])
        single.close(stream)
    # every stream (swapped out or not) continues from prompt + generated
    after = engine.push_many({s: np.array([1], np.int32) for s in prompts})
    for s, p in prompts.items():
        seq = np.concatenate([p, together[s], [1]])
        np.testing.assert_allclose(after[s][-1], np.asarray(model(seq[None]))[0, -1], atol=1e-5)


def test_batched_regression_equals_alone() -> None:
    model = regression_model("lstm", seed=6)
    rng = np.random.default_rng(3)
    prompts = {f"r{i}": rng.standard_normal((4 + i, 3)).astype(np.float32) for i in range(5)}
    batched = make_engine(model, slots=5)
    together = batched.generate_many(prompts, steps=15)
    alone = make_engine(model, slots=5)
    for stream, prompt in prompts.items():
        np.testing.assert_allclose(alone.generate(stream, prompt, steps=15), together[stream],
                                   atol=1e-6)


def test_seeded_sampling_is_reproducible() -> None:
    model = token_model("gru", seed=7)
    prompt = np.array([1, 2, 3], np.int32)
    runs = []
    for seed in (42, 42, 43):
        engine = make_engine(model, slots=2)
        runs.append(engine.generate("s", prompt, steps=40, sample="temperature",
                                    temperature=3.0, seed=seed))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])
    greedy = make_engine(model, slots=2).generate("s", prompt, steps=40)
    assert not np.array_equal(runs[0], greedy)  # temperature 3 really samples


def test_sampler_matches_the_softmax_distribution() -> None:
    probs = np.array([0.5, 0.25, 0.15, 0.07, 0.03], np.float32)
    n = 20000
    y = tf.constant(np.tile(probs, (n, 1)))
    key = tf.constant(np.tile([[123, 456]], (n, 1)), tf.int64)
    counter = tf.range(n, dtype=tf.int64)
    ones = tf.ones([n], tf.float32)

    def draw(inv_t, top_k):
        return pick_tokens(y, True, tf.zeros([n], tf.bool), ones * inv_t,
                           tf.fill([n], top_k), key, counter).numpy()

    freq = np.bincount(draw(1.0, 0), minlength=5) / n
    np.testing.assert_allclose(freq, probs, atol=0.015)
    top2 = np.bincount(draw(1.0, 2), minlength=5) / n
    assert top2[2:].sum() == 0
    np.testing.assert_allclose(top2[:2], probs[:2] / probs[:2].sum(), atol=0.015)
    assert (draw(100.0, 0) == 0).mean() > 0.99  # temperature -> 0: argmax
    u = hash_uniform(key[:1000], counter[:1000], 64).numpy()
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


def test_end_token_stops_that_stream_while_others_go_on() -> None:
    model = token_model("lstm", seed=8)
    rng = np.random.default_rng(4)
    engine = make_engine(model, slots=16)
    prompts = {f"p{i}": rng.integers(0, VOCAB, 3).astype(np.int32) for i in range(12)}
    free = engine.generate_many(prompts, steps=20)
    # an end token that one stream emits early and another never emits
    stopper, runner, end = None, None, None
    for s, toks in free.items():
        for t in set(toks[:10].tolist()):
            others = [o for o in free if o != s and t not in free[o]]
            if others:
                stopper, runner, end = s, others[0], t
                break
        if stopper:
            break
    assert stopper is not None, "fixture: no usable end token"

    engine2 = make_engine(model, slots=4)  # a fresh engine: other slots, other batch
    got = engine2.generate_many({stopper: prompts[stopper], runner: prompts[runner]},
                                steps=20, end_token=end)
    cut = int(np.flatnonzero(free[stopper] == end)[0]) + 1
    np.testing.assert_array_equal(got[stopper], free[stopper][:cut])  # end token included
    np.testing.assert_array_equal(got[runner], free[runner])
    # the stopped stream consumed exactly prompt + its tokens (end token included)
    after = engine2.push(stopper, np.array([1, 2], np.int32))
    seq = np.concatenate([prompts[stopper], got[stopper], [1, 2]])
    np.testing.assert_allclose(after, np.asarray(model(seq[None]))[0][-2:], atol=1e-5)


def test_custom_feedback_callable() -> None:
    # 3 inputs, 2 outputs: the next input is [y0, y1, y0 * y1]
    model = regression_model("simple", seed=9, features=3, out=2)
    engine = make_engine(model, slots=2)
    prompt = np.random.default_rng(5).standard_normal((5, 3)).astype(np.float32)
    with pytest.raises(UnsupportedModelError) as info:
        engine.generate("s", prompt, steps=5)
    assert info.value.code == ErrorCode.NOT_SUPPORTED and "feedback" in str(info.value)
    assert "s" not in engine  # refused before any state change

    def feed(y):
        return tf.concat([y, y[:, :1] * y[:, 1:2]], axis=-1)

    got = engine.generate("s", prompt, steps=12, feedback=feed)
    seq = list(prompt)
    for _ in range(12):
        y = np.asarray(model(np.array(seq)[None]))[0, -1]
        seq.append(np.array([y[0], y[1], y[0] * y[1]], np.float32))
    np.testing.assert_allclose(got, np.array(seq[5:]), atol=1e-5)


def test_onehot_model_accepts_token_id_prompt() -> None:
    model = onehot_model("gru", seed=10)
    ids = np.array([3, 0, 7, 7], np.int32)
    a = make_engine(model, slots=2)
    b = make_engine(model, slots=2)
    np.testing.assert_array_equal(
        a.generate("s", ids, steps=10),
        b.generate("s", np.eye(VOCAB, dtype=np.float32)[ids], steps=10),
    )


def test_refused_requests_raise_clear_errors_and_change_nothing() -> None:
    tokens = make_engine(token_model("lstm", seed=11), slots=2)
    regression = make_engine(regression_model("gru", seed=11), slots=2)
    prompt = np.array([1, 2], np.int32)
    cases = [
        (tokens, {"steps": 0}, ErrorCode.BAD_VALUE, "steps"),
        (tokens, {"steps": 10**6}, ErrorCode.BAD_VALUE, "steps"),
        (tokens, {"sample": "beam"}, ErrorCode.BAD_VALUE, "sample"),
        (tokens, {"sample": "temperature", "temperature": 0.0}, ErrorCode.BAD_VALUE,
         "temperature"),
        (tokens, {"sample": "top_k"}, ErrorCode.BAD_VALUE, "top_k"),
        (tokens, {"sample": "top_k", "top_k": VOCAB + 1}, ErrorCode.BAD_VALUE, "top_k"),
        (tokens, {"end_token": VOCAB}, ErrorCode.BAD_VALUE, "end_token"),
        (tokens, {"feedback": "prediction"}, ErrorCode.NOT_SUPPORTED, "feedback"),
        (tokens, {"feedback": "nonsense"}, ErrorCode.BAD_VALUE, "feedback"),
        (tokens, {"feedback": lambda y: tf.argmax(y, -1)[:1]}, ErrorCode.BAD_SHAPE, "shape"),
        (tokens, {"feedback": lambda y: y[:, 0]}, ErrorCode.BAD_DTYPE, "int"),
        (regression, {"sample": "temperature"}, ErrorCode.BAD_VALUE, "token model"),
        (regression, {"end_token": 1}, ErrorCode.BAD_VALUE, "end_token"),
        (regression, {"feedback": "tokens"}, ErrorCode.NOT_SUPPORTED, "feedback"),
    ]
    for engine, kwargs, code, word in cases:
        p = prompt if engine is tokens else np.zeros((2, 3), np.float32)
        with pytest.raises(streamrnn.StreamRNNError) as info:
            engine.generate("s", p, **({"steps": 5} | kwargs))
        assert info.value.code == code, (kwargs, info.value)
        assert word in str(info.value), (kwargs, str(info.value))
        assert isinstance(info.value, InvalidInputError | UnsupportedModelError)
        assert "s" not in engine
    with pytest.raises(InvalidInputError) as info:  # bad prompts: the push path's checks
        tokens.generate("s", np.array([], np.int32), steps=3)
    assert info.value.code == ErrorCode.EMPTY_CHUNK
    with pytest.raises(InvalidInputError) as info:
        tokens.generate("s", np.array([1, VOCAB]), steps=3)
    assert info.value.code == ErrorCode.BAD_VALUE
    assert "s" not in tokens
    out_of_vocab = make_engine(token_model("gru", seed=12, out=5), slots=2)
    with pytest.raises(UnsupportedModelError, match="vocabulary"):
        out_of_vocab.generate("s", prompt, steps=3)


@pytest.mark.parametrize("kind", ["tokens", "prediction"])
def test_xla_and_graph_loops_agree(kind: str) -> None:
    """The CPU default compiles the loop with XLA; it must give the graph loop's tokens."""
    rng = np.random.default_rng(7)
    if kind == "tokens":
        model, prompt = token_model("lstm", seed=14), rng.integers(0, VOCAB, 4).astype(np.int32)
        kwargs = {"sample": "top_k", "top_k": 4, "seed": 9}
    else:
        model = regression_model("gru", seed=14)
        prompt, kwargs = rng.standard_normal((4, 3)).astype(np.float32), {}
    xla = streamrnn.Engine.from_keras(model, slots=2, executor="keras")
    assert xla.runner.jit_compile  # CPU default
    graph = make_engine(model, slots=2)
    a = xla.generate("s", prompt, steps=30, **kwargs)
    b = graph.generate("s", prompt, steps=30, **kwargs)
    if kind == "tokens":
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(xla.generate("s", prompt[:1], steps=5),
                                      reference_generate(model, np.concatenate(
                                          [prompt, a, prompt[:1]]), 5, "tokens"))
    else:
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_generate_over_zeromq_equals_in_process(tmp_path) -> None:
    """GENERATE through a real worker process and Client.generate == Engine.generate."""
    from streamrnn.cli.process import WorkerProcess

    model = token_model("gru", seed=15)
    path = tmp_path / "chars.keras"
    model.save(path)
    local = make_engine(model, slots=4)
    prompt = np.array([3, 1, 4, 1], np.int32)
    want_greedy = local.generate("g", prompt, steps=16)
    want_sampled = local.generate("t", prompt, steps=16, sample="top_k", top_k=4,
                                  temperature=0.9, seed=5)
    end = int(want_greedy[3])
    with WorkerProcess.start(path, 4, "--no-xla") as worker, \
            streamrnn.Client(worker.endpoint) as client:
        got = client.generate("g", prompt, steps=16)
        np.testing.assert_array_equal(got, want_greedy)
        got = client.generate("t", prompt, steps=16, sample="top_k", top_k=4,
                              temperature=0.9, seed=5)
        np.testing.assert_array_equal(got, want_sampled)
        # the stream keeps prompt + generated: a PUSH continues like offline
        after = client.push("g", np.array([2, 7], np.int32))
        seq = np.concatenate([prompt, want_greedy, [2, 7]])
        np.testing.assert_allclose(after, np.asarray(model(seq[None]))[0, -2:], atol=1e-5)
        stopped = client.generate("e", prompt, steps=16, end_token=end)
        cut = int(np.flatnonzero(want_greedy == end)[0]) + 1
        np.testing.assert_array_equal(stopped, want_greedy[:cut])
        with pytest.raises(streamrnn.RemoteError) as info:
            client.generate("bad", prompt, steps=4, end_token=VOCAB + 3)
        assert info.value.code == ErrorCode.BAD_VALUE


def test_mask_zero_models_never_pick_the_padding_id() -> None:
    keras.utils.set_random_seed(16)
    bias = np.zeros(VOCAB, np.float32)
    bias[0] = 5.0  # padding id is the most likely output
    model = keras.Sequential([
        keras.Input((None,), dtype="int32"), keras.layers.Embedding(VOCAB, 8, mask_zero=True),
        keras.layers.GRU(16, return_sequences=True),
        keras.layers.Dense(VOCAB, activation="softmax",
                           bias_initializer=keras.initializers.Constant(bias)),
    ])
    engine = make_engine(model, slots=2)
    prompt = np.array([3, 4], np.int32)
    got = engine.generate("s", prompt, steps=12)
    assert (got != 0).all()
    sampled = engine.generate("t", prompt, steps=30, sample="temperature", seed=1)
    assert (sampled != 0).all()
    with pytest.raises(InvalidInputError, match="padding"):
        engine.generate("u", prompt, steps=3, end_token=0)
    full = np.asarray(model(np.concatenate([prompt, got])[None]))[0]
    np.testing.assert_array_equal(np.argmax(full[1:-1, 1:], -1) + 1, got)


def test_concurrent_generates_through_a_worker_are_batched_and_equal_alone(tmp_path) -> None:
    """GENERATEs of distinct streams taken in one round run in one generate_many call per
    set of options (seeds may differ), and each result equals Engine.generate alone."""
    import threading

    from streamrnn.cli.process import WorkerProcess

    model = token_model("gru", seed=21)
    path = tmp_path / "chars.keras"
    model.save(path)
    rng = np.random.default_rng(4)
    sampled = {"sample": "top_k", "top_k": 4, "temperature": 0.9}
    jobs = {f"s{i}": (rng.integers(1, VOCAB, int(rng.integers(2, 6))).astype(np.int32),
                      {**sampled, "seed": i} if i < 5 else {}) for i in range(8)}
    want = {}
    for s, (prompt, options) in jobs.items():
        want[s] = make_engine(model, slots=1).generate(s, prompt, steps=12, **options)
    got: dict[str, np.ndarray] = {}
    errors: list[BaseException] = []
    with WorkerProcess.start(path, 9, "--no-xla", "--batch-window-us", "300000") as worker, \
            streamrnn.Client(worker.endpoint, timeout=120) as client:
        client.generate("warm", np.array([1], np.int32), steps=2)  # compile before timing
        barrier = threading.Barrier(len(jobs))

        def run(stream: str) -> None:
            try:
                prompt, options = jobs[stream]
                barrier.wait()
                got[stream] = client.generate(stream, prompt, steps=12, **options)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(s,)) for s in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        counts = client.stats()["counts"]
        after = client.push("s0", np.array([2, 5], np.int32))  # the state continues exactly
    for s in jobs:
        np.testing.assert_array_equal(got[s], want[s], err_msg=s)
    assert counts["applied_generate"] == len(jobs) + 1
    # 8 requests, two sets of options: far fewer engine calls than requests
    assert counts["generate_calls"] - 1 <= 4, counts
    seq = np.concatenate([jobs["s0"][0], want["s0"], [2, 5]])
    np.testing.assert_allclose(after, np.asarray(model(seq[None]))[0, -2:], atol=1e-5)


def test_batched_generates_keep_each_streams_order_and_own_errors() -> None:
    """Back to back in one batch: a stream's second GENERATE continues from its first, and
    a bad prompt fails only its own request."""
    import zmq

    from streamrnn.codec import decode_reply, encode
    from streamrnn.protocol import MessageType
    from streamrnn.serving.worker import StreamWorker, WorkerConfig

    model = token_model("lstm", seed=22)
    worker = StreamWorker(make_engine(model, slots=4),
                          WorkerConfig(bind="tcp://127.0.0.1:0", batch_window_us=300_000))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(worker.start())
    a, b = np.array([1, 2, 3], np.int32), np.array([4], np.int32)
    requests = [("a", 0, a), ("b", 0, b), ("a", 1, b), ("c", 0, np.array([VOCAB + 5], np.int32))]
    try:
        for rid, (stream, seq, prompt) in enumerate(requests):
            sock.send_multipart(encode(MessageType.GENERATE, {
                "rid": rid, "stream": stream, "seq": seq, "steps": 6, "seed": rid,
                "sample": "temperature"}, {"prompt": prompt}))
        replies = {}
        for _ in requests:
            assert sock.poll(60_000)
            reply = decode_reply(sock.recv_multipart())
            replies[reply.header["rid"]] = reply
        counts = worker.stats()["counts"]
    finally:
        sock.close()
        worker.stop()
        worker.join(10)
    local = make_engine(model, slots=4)
    for rid, (stream, _, prompt) in enumerate(requests[:3]):
        want = local.generate(stream, prompt, steps=6, seed=rid, sample="temperature")
        assert replies[rid].type == MessageType.OUTPUT
        np.testing.assert_array_equal(replies[rid].arrays["output"], want, err_msg=str(rid))
    assert replies[3].type == MessageType.ERROR
    assert replies[3].header["code"] == ErrorCode.BAD_VALUE
    assert counts["applied_generate"] == 3
    assert counts["generate_calls"] == 2  # a's first with b's, then a's second
