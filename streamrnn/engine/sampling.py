"""Closed-loop generation's pure rules: feedback plans, sampling arguments, stream keys.

No TensorFlow here (numpy only): what :mod:`streamrnn.engine.generate` compiles is decided
and checked by these functions first, so a bad argument fails before any state changes and
the rules are unit-tested in milliseconds.

- :func:`choose_feedback` decides how a model's outputs become its next inputs (the
  *feedback rule*: ``"tokens"``, ``"onehot"``, ``"prediction"`` or a user callable) from
  the model's input kind and sizes; see :mod:`streamrnn.engine.generate`.
- :func:`check_params` checks ``steps``, ``sample``, ``temperature``, ``top_k``, ``seed``
  and ``end_token`` against that rule and returns :class:`SamplingParams`.
- :func:`stream_key` turns ``(seed, stream id)`` into the two 32-bit words that key a
  stream's random numbers, so its samples do not depend on its slot or its batch.

Example::

    plan = choose_feedback(None, kind="tokens", input_dim=13, output_dim=13, probs=True)
    params = check_params(plan, serving, steps=50, sample="top_k", temperature=1.0,
                          top_k=5, seed=1, end_token=None)
    key = stream_key(seed_of(1, "s"), "s")     # (word0, word1)
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamrnn.engine.interface import ModelDims
from streamrnn.errors import InvalidInputError, UnsupportedModelError
from streamrnn.protocol import MAX_GENERATE_STEPS, ErrorCode

__all__ = [
    "FeedbackPlan",
    "M32",
    "SAMPLERS",
    "SamplingParams",
    "check_params",
    "choose_feedback",
    "seed_of",
    "stream_key",
]

SAMPLERS = ("greedy", "temperature", "top_k", "sample")  # "sample" == "temperature"
#: mask of one 32-bit word
M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class FeedbackPlan:
    """How outputs become inputs for one serving model.

    Attributes:
        mode: ``"tokens"``, ``"onehot"``, ``"prediction"`` or ``"custom"``.
        probs: the model outputs probabilities (softmax), so logits are ``log(y)``.
        fn: the user's feedback callable (mode ``"custom"``), ``y (slots, output_dim)`` ->
            next input, written in TF ops.
    """

    mode: str
    probs: bool
    fn: Callable[[Any], Any] | None = None
    #: Embedding(mask_zero=True): id 0 is padding (a masked step), never picked.
    no_zero: bool = False

    @property
    def picks_tokens(self) -> bool:
        return self.mode in ("tokens", "onehot")


def choose_feedback(
    feedback: Any, *, kind: str, input_dim: int, output_dim: int, probs: bool,
    no_zero: bool = False, name: str = "model",
) -> FeedbackPlan:
    """The feedback rule for a model with these facts (see :mod:`streamrnn.engine.generate`).

    Args:
        feedback: None (chosen from the model), ``"tokens"``, ``"onehot"``,
            ``"prediction"`` or a callable.
        kind: the model's input kind, ``"tokens"`` or ``"features"``.
        probs: the model ends in a softmax.
        no_zero: the model starts with ``Embedding(mask_zero=True)``.
        name: the model's name, for messages.

    Raises:
        UnsupportedModelError: the rule does not fit the model.
        InvalidInputError: ``feedback`` is not a known value.
    """
    if callable(feedback):
        return FeedbackPlan("custom", probs, feedback)
    if feedback is None:
        feedback = _default_rule(kind, input_dim, output_dim, probs, name)
    _check_rule(feedback, kind, input_dim, output_dim, name)
    return FeedbackPlan(feedback, probs, no_zero=no_zero)


def _default_rule(kind: str, din: int, dout: int, probs: bool, name: str) -> str:
    if kind == "tokens":
        return "tokens"
    if dout == din:
        return "onehot" if probs else "prediction"
    raise UnsupportedModelError(
        f"model {name!r} maps {din} input features to {dout} outputs: an output "
        "cannot be fed back as the next input. Token models need an Embedding or "
        "one-hot input and an output of vocabulary size; regression models need "
        "output_dim == input_dim; otherwise pass feedback=callable(y) -> next input"
    )


def _check_rule(feedback: Any, kind: str, din: int, dout: int, name: str) -> None:
    if feedback == "tokens":
        if kind != "tokens" or dout != din:
            raise UnsupportedModelError(
                f"feedback='tokens' needs an Embedding input with an output of vocabulary size; "
                f"model {name!r} takes {kind} of size {din} and outputs {dout} values; "
                "pass feedback=callable(y) -> next ids"
            )
    elif feedback in ("onehot", "prediction"):
        if kind != "features" or dout != din:
            raise UnsupportedModelError(
                f"feedback={feedback!r} needs float inputs of the output size; model "
                f"{name!r} takes {kind} of size {din} and outputs {dout} values; "
                "pass feedback=callable(y) -> next input"
            )
    else:
        raise InvalidInputError(
            f"feedback must be None, 'tokens', 'onehot', 'prediction' or a callable, "
            f"got {feedback!r}",
            ErrorCode.BAD_VALUE,
        )


@dataclass(frozen=True)
class SamplingParams:
    """Checked sampling arguments (``top_k == 0`` means no top-k filter)."""

    greedy: bool
    temperature: float
    top_k: int
    end_token: int  # -1: none


def _bad(message: str) -> InvalidInputError:
    return InvalidInputError(message, ErrorCode.BAD_VALUE)


def _is_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | np.integer)


def check_params(
    plan: FeedbackPlan,
    dims: ModelDims,
    steps: int,
    sample: str,
    temperature: float,
    top_k: int | None,
    seed: int | Mapping[str, int] | None,
    end_token: int | None,
) -> SamplingParams:
    """Validate generation arguments against the feedback rule; raises InvalidInputError.

    ``dims`` is the serving model (its input kind and sizes bound ``top_k`` and
    ``end_token``).
    """
    if not _is_int(steps):
        raise _bad(f"steps must be an int, got {steps!r}")
    if not 1 <= steps <= MAX_GENERATE_STEPS:
        raise _bad(f"steps must be in 1..{MAX_GENERATE_STEPS}, got {steps}")
    if sample not in SAMPLERS:
        raise _bad(f"sample must be one of {', '.join(SAMPLERS)}; got {sample!r}")
    if not isinstance(temperature, int | float | np.floating) or not (
        np.isfinite(temperature) and temperature > 0
    ):
        raise _bad(f"temperature must be a finite number > 0, got {temperature!r}")
    if seed is not None and not isinstance(seed, Mapping | int | np.integer):
        raise _bad(f"seed must be an int (or a mapping stream -> int), got {seed!r}")
    _check_sampler(plan, sample, top_k, dims.output_dim)
    if end_token is not None:
        _check_end_token(plan, dims, end_token)
    return SamplingParams(
        greedy=sample == "greedy",
        temperature=float(temperature),
        top_k=int(top_k or 0),
        end_token=-1 if end_token is None else int(end_token),
    )


def _check_sampler(plan: FeedbackPlan, sample: str, top_k: int | None, vocab: int) -> None:
    """``top_k`` and ``sample`` together, and whether the rule samples at all."""
    if top_k is not None:
        if not _is_int(top_k):
            raise _bad(f"top_k must be an int or None, got {top_k!r}")
        if not 1 <= top_k <= vocab:
            raise _bad(f"top_k must be in 1..{vocab} (the vocabulary size), got {top_k}")
    if sample == "top_k" and top_k is None:
        raise _bad("sample='top_k' needs top_k=<int>")
    if sample == "greedy" and top_k is not None:
        raise _bad("top_k has no effect with sample='greedy'; use sample='top_k'")
    if not plan.picks_tokens and sample != "greedy":
        raise _bad(
            f"sample={sample!r} needs a token model; this model feeds back "
            f"{'predictions' if plan.mode == 'prediction' else 'feedback(y)'} "
            "deterministically (use sample='greedy')"
        )


def _check_end_token(plan: FeedbackPlan, dims: ModelDims, end_token: Any) -> None:
    if not _is_int(end_token):
        raise _bad(f"end_token must be an int or None, got {end_token!r}")
    if plan.mode == "prediction":
        raise _bad("end_token needs a token model; this model feeds back predictions")
    limit = dims.input_dim if plan.mode == "custom" else dims.output_dim
    if plan.mode == "custom" and dims.input_kind != "tokens":
        raise _bad("end_token needs token ids; this model's inputs are float features")
    if not 0 <= end_token < limit:
        raise _bad(f"end_token must be in 0..{limit - 1}, got {end_token}")
    if plan.no_zero and end_token == 0:
        raise _bad("end_token 0 is this model's padding id (Embedding mask_zero=True) and "
                   "is never generated")


def seed_of(seed: int | Mapping[str, int] | None, stream: str) -> int:
    """``stream``'s seed: ``seed[stream]`` (0 if absent) for a mapping, else ``seed or 0``."""
    return int(seed.get(stream, 0) if isinstance(seed, Mapping) else (seed or 0))


def stream_key(seed: int, stream: str) -> tuple[int, int]:
    """Two 32-bit words keying a stream's random numbers: from ``seed`` and the stream id."""
    s = int(seed) & ((1 << 64) - 1)
    return (s & M32) ^ zlib.crc32(stream.encode()), (s >> 32) ^ zlib.adler32(stream.encode())
