"""Character-level name generation: train a small char LSTM, then sample names in a batch.

The names are pseudo-names made by a small syllable grammar (so there is no download and
there is an exact notion of a *valid* name): a name is 2-3 syllables, each an onset, a vowel
and an optional coda. A char model (Embedding -> LSTM -> Dense softmax) learns to spell them;
then :meth:`streamrnn.Engine.generate_many` samples 64 names at once, every stream primed
with the start character and stopped by the end character in the same compiled steps.
Prints some names, the fraction that are valid under the grammar, and how many are new.

    python examples/char_names.py [--epochs 12] [--temperature 0.7]
"""

from __future__ import annotations

import argparse
import os
import re
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import streamrnn  # noqa: E402

ONSETS = ["b", "d", "k", "l", "m", "n", "r", "s", "t", "v", "z", "th", "sh"]
VOWELS = ["a", "e", "i", "o", "u", "ae", "ia"]
CODAS = ["", "", "", "n", "r", "l", "s"]
SYLLABLE = f"(?:{'|'.join(ONSETS)})(?:{'|'.join(VOWELS)})(?:{'|'.join(c for c in CODAS if c)})?"
VALID = re.compile(f"(?:{SYLLABLE}){{2,3}}")

PAD, END = 0, 1  # id 1 ("\n") starts and ends every name
LETTERS = sorted(set("".join(ONSETS + VOWELS + CODAS)))
CHARS = ["", "\n", *LETTERS]
VOCAB = len(CHARS)
MAX_LEN = 14


def make_names(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    names: set[str] = set()
    while len(names) < n:
        syllables = rng.integers(2, 4)
        name = "".join(
            ONSETS[rng.integers(len(ONSETS))] + VOWELS[rng.integers(len(VOWELS))]
            + CODAS[rng.integers(len(CODAS))]
            for _ in range(syllables)
        )
        if len(name) < MAX_LEN:
            names.add(name)
    return sorted(names)


def tensors(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``"\\n" + name`` and targets ``name + "\\n"``, padded with 0: ``(n, MAX_LEN)``."""
    x = np.zeros((len(names), MAX_LEN), np.int32)
    y = np.zeros((len(names), MAX_LEN), np.int32)
    for i, name in enumerate(names):
        ids = [CHARS.index(c) for c in name]
        x[i, : len(ids) + 1] = [END, *ids]
        y[i, : len(ids) + 1] = [*ids, END]
    return x, y


def build_model(units: int = 96) -> keras.Model:
    return keras.Sequential([
        keras.Input((None,), dtype="int32"),
        keras.layers.Embedding(VOCAB, 24, mask_zero=True),
        keras.layers.LSTM(units, return_sequences=True),
        keras.layers.Dense(VOCAB, activation="softmax"),
    ], name="char_names")


def run(epochs: int = 12, n_names: int = 3000, samples: int = 64, temperature: float = 0.7,
        seed: int = 0, verbose: int = 0):
    """Train, then sample ``samples`` names in one batch; returns (valid, novel, names)."""
    keras.utils.set_random_seed(seed)
    names = make_names(n_names, seed)
    x, y = tensors(names)
    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(5e-3), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=verbose)

    valid, sampled = sample_names(model, samples, temperature, seed)
    novel = float(np.mean([s not in set(names) for s in sampled]))
    return valid, novel, sampled


def sample_names(model: keras.Model, samples: int, temperature: float, seed: int = 0):
    """``samples`` names generated in one batch; returns (fraction valid, names)."""
    engine = streamrnn.Engine.from_keras(model, slots=samples)
    prompts = {f"name-{i}": np.array([END], np.int32) for i in range(samples)}
    out = engine.generate_many(prompts, steps=MAX_LEN, sample="temperature",
                               temperature=temperature, seed=seed, end_token=END)
    sampled = ["".join(CHARS[t] for t in ids if t != END) for ids in out.values()]
    finished = [ids[-1] == END for ids in out.values()]  # stopped by the end character
    ok = [bool(VALID.fullmatch(s)) and f for s, f in zip(sampled, finished, strict=True)]
    return float(np.mean(ok)), sampled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args()
    t0 = time.perf_counter()
    valid, novel, sampled = run(args.epochs, samples=args.samples,
                                temperature=args.temperature, verbose=2)
    keras.utils.set_random_seed(1)
    baseline, _ = sample_names(build_model(), args.samples, args.temperature)
    print("sampled names:", ", ".join(sampled[:16]))
    print(f"valid under the syllable grammar: {valid:.1%} of {len(sampled)} "
          f"(untrained model: {baseline:.1%}); not in the training list: {novel:.1%} "
          f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
