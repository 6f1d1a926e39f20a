"""Generated tokens/s: Engine.generate_many vs the per-step ``predict`` recipe.

    pytest bench/test_bench_generate.py -q -s [--benchmark-json ...]
    STREAMRNN_GEN_EXECUTORS=keras STREAMRNN_GEN_STEPS=64 pytest bench/test_bench_generate.py

Model: a char-level LM (Embedding 64 -> 32, LSTM 128, Dense 64 softmax). For 1, 8 and 64
concurrent streams:

* ``engine[executor]``: one ``Engine`` with 64 slots (a worker's fixed batch) on each
  executor of ``$STREAMRNN_GEN_EXECUTORS`` (default ``onnxruntime,keras``),
  ``generate_many`` of STEPS (``$STREAMRNN_GEN_STEPS``, default 256) greedy tokens per
  stream: ``onnxruntime`` runs one batched ONNX Runtime call per token (only the generating
  slots' rows), ``keras`` the compiled while_loop on the serving clone (XLA on CPU, idle
  slots masked).
* ``engine top_k[executor]``: 64 streams sampling with top_k=8 (the sampling path's cost).
* ``interleaved``: the first two executors listed (default ONNX Runtime's per-token loop and
  the compiled Keras loop) alternating round by round, greedy and top_k: the ratio of their
  rates per stream count, as the median of per-round ratios (the other cases run one after
  the other, so their rates drift apart with the machine's load).
* ``recipe``: the classic inference model with explicit state inputs/outputs, called with
  ``model.predict([x, h, c])`` once per step for all streams batched together (the most
  favourable form of the recipe: one stream at a time would be n times slower), argmax in
  numpy.

Writes ``bench/results/generate.json`` (or ``$BENCH_OUT``) with tokens/s per executor and
the ratios to the recipe (``ratio``: the first executor listed).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

VOCAB, EMBED, UNITS = 64, 32, 128
STEPS = int(os.environ.get("STREAMRNN_GEN_STEPS", "256"))  # engine tokens/stream/round
EXECUTORS = [e for e in os.environ.get("STREAMRNN_GEN_EXECUTORS", "onnxruntime,keras"
                                         ).split(",") if e]
RECIPE_STEPS = 24  # predict() calls per round (each ~ms); enough for a stable rate
STREAMS = (1, 8, 64)
RESULTS: dict[int, dict[str, float]] = {}


def _model():
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((None,), dtype="int32"),
        keras.layers.Embedding(VOCAB, EMBED),
        keras.layers.LSTM(UNITS, return_sequences=True),
        keras.layers.Dense(VOCAB, activation="softmax"),
    ])


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module", params=EXECUTORS)
def engine(request, model):
    from streamrnn.engine.engine import Engine

    return Engine.from_keras(model, slots=64, executor=request.param)


def _record(n: int, name: str, executor: str, rate: float) -> None:
    """``{name}_{executor}`` per executor; the first executor listed also as ``name``."""
    RESULTS.setdefault(n, {})[f"{name}_{executor}"] = rate
    if executor == EXECUTORS[0]:
        RESULTS[n][name] = rate


def _recipe_model(model):
    import keras

    embedding, lstm, dense = model.layers
    x = keras.Input((1,), dtype="int32")
    h_in, c_in = keras.Input((UNITS,)), keras.Input((UNITS,))
    step = keras.layers.LSTM(UNITS, return_sequences=True, return_state=True)
    y, h, c = step(embedding(x), initial_state=[h_in, c_in])
    step.set_weights(lstm.get_weights())
    return keras.Model([x, h_in, c_in], [dense(y), h, c])


@pytest.mark.parametrize("n", STREAMS)
def test_engine_generate_tokens_per_s(benchmark, engine, n):
    prompts = {f"g{i}": np.array([i % VOCAB, (3 * i) % VOCAB], np.int32) for i in range(n)}
    engine.generate_many(prompts, steps=STEPS)  # compile (prompt bucket + loop)

    def round_():
        for s in prompts:
            engine.reset(s)
        return engine.generate_many(prompts, steps=STEPS)

    benchmark.pedantic(round_, rounds=5, iterations=1, warmup_rounds=1)
    rate = n * STEPS / benchmark.stats["median"]
    _record(n, "engine_tokens_per_s", engine.executor.name, rate)
    benchmark.extra_info["tokens_per_s"] = rate
    print(f"\nengine.generate_many [{engine.executor.name}], {n:>2} streams: "
          f"{rate:,.0f} tokens/s")


def test_engine_sampled_tokens_per_s(benchmark, engine):
    """64 streams, top-k sampling (sort + Gumbel noise per step) instead of argmax."""
    prompts = {f"g{i}": np.array([i % VOCAB], np.int32) for i in range(64)}  # reuse slots
    kwargs = {"steps": STEPS, "sample": "top_k", "top_k": 8, "temperature": 0.8}
    engine.generate_many(prompts, **kwargs)

    def round_():
        for s in prompts:
            engine.reset(s)
        return engine.generate_many(prompts, **kwargs)

    benchmark.pedantic(round_, rounds=5, iterations=1, warmup_rounds=1)
    rate = 64 * STEPS / benchmark.stats["median"]
    _record(64, "engine_top_k_tokens_per_s", engine.executor.name, rate)
    benchmark.extra_info["tokens_per_s"] = rate
    print(f"\nengine.generate_many [{engine.executor.name}], 64 streams, top_k=8: "
          f"{rate:,.0f} tokens/s")


def _alternate(engines: dict, names: tuple[str, str], n: int, kwargs: dict,
               rounds: int = 7) -> list[float]:
    """Per round, ``names[0]``'s rate over ``names[1]``'s for ``n`` streams; the order
    alternates round by round."""
    prompts = {f"i{n}_{i}": np.array([i % VOCAB, 1], np.int32) for i in range(n)}
    for engine in engines.values():
        engine.generate_many(prompts, **kwargs)  # compile, open the streams
    out = []
    for r in range(rounds):
        rate = {}
        for name in names if r % 2 == 0 else names[::-1]:
            for s in prompts:
                engines[name].reset(s)
            time.sleep(0.1)  # the other runtime's pool threads stop spinning first
            start = time.perf_counter()
            engines[name].generate_many(prompts, **kwargs)
            rate[name] = n * STEPS / (time.perf_counter() - start)
        out.append(rate[names[0]] / rate[names[1]])
    for engine in engines.values():
        for s in prompts:
            engine.close(s)
    return out


@pytest.mark.parametrize("sample", ["greedy", "top_k"])
def test_executors_interleaved(benchmark, model, sample):
    """The executors' loops alternating round by round (the order rotates), so their
    ratio sees the same load: per stream count, the median of per-round ratios of the
    first executor listed to the second."""
    from streamrnn.engine.engine import Engine

    if len(EXECUTORS) < 2:
        pytest.skip("needs two executors in STREAMRNN_GEN_EXECUTORS")
    first, second = EXECUTORS[:2]
    engines = {e: Engine.from_keras(model, slots=64, executor=e) for e in (first, second)}
    kwargs = {"steps": STEPS} | ({"sample": "top_k", "top_k": 8, "temperature": 0.8}
                                 if sample == "top_k" else {})
    ratios: dict[int, list[float]] = {n: [] for n in STREAMS}

    def rounds() -> None:
        for n in STREAMS:
            ratios[n] = _alternate(engines, (first, second), n, kwargs)

    benchmark.pedantic(rounds, rounds=1, iterations=1)
    for n in STREAMS:
        ratio = float(np.median(ratios[n]))
        RESULTS.setdefault(n, {})[f"interleaved_{sample}_{first}_vs_{second}"] = ratio
        RESULTS[n][f"interleaved_{sample}_per_round"] = [round(x, 2) for x in ratios[n]]
        print(f"\n{sample}, {n:>2} streams: {first} / {second} = {ratio:.2f} "
              f"(per round {', '.join(f'{x:.2f}' for x in ratios[n])})")


@pytest.mark.parametrize("n", STREAMS)
def test_predict_recipe_tokens_per_s(benchmark, model, n):
    inf = _recipe_model(model)
    tokens = np.arange(n, dtype=np.int32)[:, None] % VOCAB
    zeros = np.zeros((n, UNITS), np.float32)
    inf.predict([tokens, zeros, zeros], verbose=0)  # build predict's function

    def round_():
        x, h, c = tokens, zeros, zeros
        for _ in range(RECIPE_STEPS):
            y, h, c = inf.predict([x, h, c], verbose=0)
            x = np.argmax(y[:, -1], axis=-1).astype(np.int32)[:, None]
        return x

    benchmark.pedantic(round_, rounds=3, iterations=1, warmup_rounds=1)
    rate = n * RECIPE_STEPS / benchmark.stats["median"]
    RESULTS.setdefault(n, {})["recipe_tokens_per_s"] = rate
    benchmark.extra_info["tokens_per_s"] = rate
    print(f"\npredict() recipe,      {n:>2} streams: {rate:,.0f} tokens/s")


def test_write_ratio():
    rows = {}
    for n in STREAMS:
        r = RESULTS.get(n, {})
        if "engine_tokens_per_s" in r and "recipe_tokens_per_s" in r:
            r["ratio"] = r["engine_tokens_per_s"] / r["recipe_tokens_per_s"]
            for e in EXECUTORS:
                if f"engine_tokens_per_s_{e}" in r:
                    r[f"ratio_{e}"] = r[f"engine_tokens_per_s_{e}"] / r["recipe_tokens_per_s"]
            rows[str(n)] = r
            engines = ", ".join(f"{e} {r[f'engine_tokens_per_s_{e}']:,.0f}" for e in EXECUTORS
                                if f"engine_tokens_per_s_{e}" in r)
            print(f"\n{n:>2} streams: engine ({engines}) tokens/s, "
                  f"predict recipe {r['recipe_tokens_per_s']:,.0f} tokens/s, "
                  f"ratio {r['ratio']:.0f}x")
    if not rows:
        pytest.skip("run the whole module to get ratios")
    out = Path(os.environ.get("BENCH_OUT", Path(__file__).parent / "results" / "generate.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": f"Embedding({VOCAB},{EMBED}) LSTM({UNITS}) Dense({VOCAB}, softmax)",
        "engine_slots": 64, "executors": EXECUTORS, "engine_steps_per_round": STEPS,
        "recipe_steps_per_round": RECIPE_STEPS, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average": os.getloadavg()[0], "results": rows,
    }, indent=2))
