"""The trainer's settings (:class:`TrainConfig`) and the scheduled-sampling curriculum.

A :class:`TrainConfig` says how a :class:`~streamrnn.training.trainer.FreeRunningTrainer`
chooses each step's input (the observation, or the model's own previous output), how it
picks a fed-back token, and how it optimizes. :func:`feed_probability` is the curriculum:
the probability of feeding back at a given optimizer step.

Example::

    config = TrainConfig(mode="scheduled", schedule="linear", schedule_steps=1000)
    config.validate()                    # InvalidInputError (BAD_VALUE) if unusable
    feed_probability(config, 250)        # 0.25
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from streamrnn.engine.generate import SAMPLERS
from streamrnn.errors import InvalidInputError
from streamrnn.protocol import ErrorCode

__all__ = [
    "LOSSES",
    "MODES",
    "Mode",
    "SCHEDULES",
    "Schedule",
    "TrainConfig",
    "feed_probability",
]

Mode = Literal["free", "teacher", "scheduled"]
Schedule = Literal["linear", "exponential", "inverse_sigmoid"]
MODES: tuple[str, ...] = ("free", "teacher", "scheduled")
SCHEDULES: tuple[str, ...] = ("linear", "exponential", "inverse_sigmoid")
LOSSES: tuple[str, ...] = ("auto", "mse", "sparse_ce", "ce")


@dataclass
class TrainConfig:
    """How the trainer feeds inputs and optimizes.

    Attributes:
        mode: ``"free"`` (after the warm-up always feed back), ``"teacher"`` (never) or
            ``"scheduled"`` (feed back with probability :func:`feed_probability`).
        warmup: observed (teacher-forced) steps at the start of every chunk (>= 1); they
            re-synchronise the state with the data before the model runs on its own.
        schedule, schedule_steps, schedule_k: the scheduled-sampling curriculum.
        learning_rate, clipnorm: Adam settings (used when no optimizer is given).
        loss: ``"auto"`` (sparse cross-entropy for token ids, cross-entropy for one-hot
            models, mse otherwise), ``"mse"``, ``"sparse_ce"``, ``"ce"``.
        sample: how a token is picked (token/one-hot models), as in generation:
            ``"greedy"``, ``"temperature"`` (== ``"sample"``) or ``"top_k"``.
        temperature, top_k: for the sampling pickers.
        feedback_gradient: regression only: let the gradient flow through the fed-back
            prediction (True) or stop it.
        seed: keys every random draw (with the step counter).
        max_chunk: longest window trained in one step (a power of two); longer chunks are
            split into consecutive windows, each starting with its own warm-up.
        jit_compile: compile the train step with XLA.
    """

    mode: Mode = "free"
    warmup: int = 8
    schedule: Schedule = "inverse_sigmoid"
    schedule_steps: int = 1000
    schedule_k: float = 100.0
    learning_rate: float = 1e-3
    clipnorm: float | None = 1.0
    loss: Literal["auto", "mse", "sparse_ce", "ce"] = "auto"
    sample: Literal["greedy", "temperature", "top_k", "sample"] = "greedy"
    temperature: float = 1.0
    top_k: int | None = None
    feedback_gradient: bool = True
    seed: int = 0
    max_chunk: int = 256
    jit_compile: bool = False

    def validate(self) -> None:
        """Raise InvalidInputError (BAD_VALUE) naming every unusable setting at once."""
        problems = [message for bad, message in _checks(self) if bad]
        if problems:
            raise InvalidInputError("; ".join(problems), ErrorCode.BAD_VALUE)


def _checks(c: TrainConfig) -> list[tuple[bool, str]]:
    """``(is the setting bad, what to say)`` for every rule, in message order."""
    return [
        (c.mode not in MODES, f"mode must be one of {MODES}, got {c.mode!r}"),
        (c.schedule not in SCHEDULES,
         f"schedule must be one of {SCHEDULES}, got {c.schedule!r}"),
        (c.warmup < 1, f"warmup must be >= 1 observed step, got {c.warmup}"),
        (c.schedule_steps < 1, f"schedule_steps must be >= 1, got {c.schedule_steps}"),
        (c.schedule == "exponential" and not 0 < c.schedule_k < 1,
         f"exponential schedule needs 0 < schedule_k < 1, got {c.schedule_k}"),
        (c.schedule == "inverse_sigmoid" and c.schedule_k < 1,
         f"inverse_sigmoid schedule needs schedule_k >= 1, got {c.schedule_k}"),
        (c.loss not in LOSSES, f"loss must be auto, mse, sparse_ce or ce, got {c.loss!r}"),
        (c.sample not in SAMPLERS, f"sample must be one of {SAMPLERS}, got {c.sample!r}"),
        (c.sample == "top_k" and c.top_k is None, "sample='top_k' needs top_k"),
        (not c.temperature > 0, f"temperature must be > 0, got {c.temperature}"),
        (c.top_k is not None and c.top_k < 1, f"top_k must be >= 1 or None, got {c.top_k}"),
        (c.max_chunk < 2 or bool(c.max_chunk & (c.max_chunk - 1)),
         f"max_chunk must be a power of two >= 2, got {c.max_chunk}"),
        (c.learning_rate <= 0, f"learning_rate must be > 0, got {c.learning_rate}"),
    ]


def feed_probability(config: TrainConfig, step: int) -> float:
    """Probability of feeding the model's own output (after the warm-up) at ``step``.

    ``free`` -> 1, ``teacher`` -> 0; ``scheduled`` rises from 0 towards 1 (Bengio et al.
    2015, with epsilon = the teacher-forcing probability, so this is ``1 - epsilon``):

    - linear: ``min(1, step / schedule_steps)``
    - exponential: ``1 - k**step`` (``0 < k < 1``)
    - inverse_sigmoid: ``1 - k / (k + exp(step / k))`` (``k >= 1``)
    """
    if config.mode == "free":
        return 1.0
    if config.mode == "teacher":
        return 0.0
    if config.schedule == "linear":
        return min(1.0, step / config.schedule_steps)
    k = config.schedule_k
    if config.schedule == "exponential":
        return 1.0 - k**step
    z = step / k
    if z > 700:  # exp overflow; the limit is 1
        return 1.0
    return 1.0 - k / (k + math.exp(z))
