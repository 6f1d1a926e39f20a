"""Seq2seq with an exact answer: "53+61" -> "114", served by a derived encoder/decoder.

Trains the usual teacher-forced encoder-decoder (Embedding -> LSTM(return_state=True) ->
decoder LSTM(initial_state=...) -> Dense softmax) on generated sums, then lets
:class:`streamrnn.engine.seq2seq.Seq2SeqEngine` derive the inference encoder and decoder from the
training model (same layers, same weights) and greedily decode held-out questions in one
batched compiled call. Prints a few answers and the exact-match accuracy.

    python examples/seq2seq_addition.py [--digits 2] [--epochs 20] [--cell lstm|gru]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from streamrnn.engine.seq2seq import Seq2SeqEngine  # noqa: E402

CHARS = " 0123456789+^$"  # pad, digits, plus, start, end
PAD, START, END = 0, CHARS.index("^"), CHARS.index("$")
VOCAB = len(CHARS)


def encode(text: str, length: int, fill: int) -> np.ndarray:
    ids = [CHARS.index(c) for c in text]
    return np.array(ids + [fill] * (length - len(ids)), np.int32)


def decode_text(ids: np.ndarray) -> str:
    return "".join(CHARS[i] for i in ids)


def make_pairs(digits: int, seed: int = 0, held_out: float = 0.2):
    """Every ``a+b`` with ``a, b < 10**digits``, split into train / held-out question sets."""
    n = 10**digits
    pairs = [(a, b) for a in range(n) for b in range(n)]
    rng = np.random.default_rng(seed)
    rng.shuffle(pairs)
    cut = int(len(pairs) * (1 - held_out))
    return pairs[:cut], pairs[cut:]


def tensors(pairs, digits: int):
    """Encoder ids ``(n, 2*digits+1)``, decoder input and target ids ``(n, digits+2)``."""
    q_len, a_len = 2 * digits + 1, digits + 2
    enc = np.stack([encode(f"{a}+{b}", q_len, PAD) for a, b in pairs])
    answers = [str(a + b) for a, b in pairs]
    dec_in = np.stack([encode("^" + s, a_len, END) for s in answers])
    target = np.stack([encode(s + "$", a_len, END) for s in answers])
    return enc, dec_in, target, answers


def build_model(cell: str = "lstm", units: int = 128, embed: int = 32) -> keras.Model:
    rnn = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU}[cell]
    enc_in = keras.Input((None,), dtype="int32", name="question")
    dec_in = keras.Input((None,), dtype="int32", name="answer_so_far")
    embedding = keras.layers.Embedding(VOCAB, embed, name="chars")  # shared
    _, *states = rnn(units, return_state=True, name="encoder")(embedding(enc_in))
    seq = rnn(units, return_sequences=True, name="decoder")(embedding(dec_in),
                                                            initial_state=states)
    out = keras.layers.Dense(VOCAB, activation="softmax", name="next_char")(seq)
    return keras.Model([enc_in, dec_in], out, name=f"addition_{cell}")


def train(model: keras.Model, pairs, digits: int, epochs: int, batch: int = 64,
          seed: int = 0, verbose: int = 0) -> None:
    keras.utils.set_random_seed(seed)
    enc, dec_in, target, _ = tensors(pairs, digits)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit([enc, dec_in], target, batch_size=batch, epochs=epochs, verbose=verbose)


def exact_match(engine: Seq2SeqEngine, pairs, digits: int) -> tuple[float, list[str]]:
    enc, _, _, answers = tensors(pairs, digits)
    got = [decode_text(ids) for ids in engine.decode(list(enc))]
    accuracy = float(np.mean([g == a for g, a in zip(got, answers, strict=True)]))
    return accuracy, got


def run(digits: int = 2, epochs: int = 20, cell: str = "lstm", units: int = 128,
        seed: int = 0, verbose: int = 0):
    """Train, derive the inference models, decode the held-out set; returns (acc, engine)."""
    keras.utils.set_random_seed(seed)
    train_pairs, test_pairs = make_pairs(digits, seed)
    model = build_model(cell, units)
    train(model, train_pairs, digits, epochs, seed=seed, verbose=verbose)
    engine = Seq2SeqEngine.from_keras(model, start_token=START, end_token=END,
                                      max_length=digits + 2)
    accuracy, got = exact_match(engine, test_pairs, digits)
    return accuracy, engine, test_pairs, got, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--cell", choices=["lstm", "gru"], default="lstm")
    parser.add_argument("--units", type=int, default=128)
    args = parser.parse_args()
    t0 = time.perf_counter()
    accuracy, _, pairs, got, _ = run(args.digits, args.epochs, args.cell, args.units, verbose=2)
    for (a, b), g in list(zip(pairs, got, strict=True))[:8]:
        print(f"{a:>{args.digits}}+{b:<{args.digits}} = {g:<{args.digits + 1}} "
              f"({'ok' if g == str(a + b) else 'expected ' + str(a + b)})")
    print(f"held-out exact match: {accuracy:.1%} of {len(pairs)} questions "
          f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
