"""Closed-loop generation on the engine's executor: one batched executor call per token.

:class:`ExecutorTokenLoop` is the executor twin of the compiled Keras loop
(:class:`streamrnn.engine.generate.Generator`), with the same ``run`` contract, for the
built-in feedback rules ``"tokens"``, ``"onehot"`` and ``"prediction"`` (a user callable is
written in TF ops and stays on the compiled loop). Each step picks the next value of every
still-generating slot from its last output (:func:`streamrnn.engine.token_pick.pick_tokens`,
numpy, keyed by ``(stream key, step index)`` exactly as the compiled loop), then feeds all
of them in ONE ``executor.run_rows(slots, x)`` call (``x`` ``(n, 1)`` int32 ids or
``(n, 1, D)`` float32: no chunk dict, no padding). The executor is one whose weights travel
with a step (:class:`~streamrnn.engine.interface.TakesStepWeights`: ONNX Runtime, torch).
The state stays in the executor's rows; no other slot is read or written.

A step runs with the weights the engine's steps run with now (``step_weights()``: a pinned
version's converted weights inside :meth:`~streamrnn.Engine.pinned_weights`, else None, the
latest), as :meth:`~streamrnn.Engine.push_many` does: a
:class:`~streamrnn.engine.weights.WeightsFollower` generates each version group in its own
pinned call.

Example::

    loop = ExecutorTokenLoop(engine.executor, step_weights=lambda: None)
    values = loop.run(plan, params, slots=[0, 3], first_outputs=y_last, steps=20,
                      keys=[stream_key(1, "a"), stream_key(1, "b")])   # [(n0,), (n1,)]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from streamrnn.engine.interface import TakesStepWeights
from streamrnn.engine.sampling import M32, FeedbackPlan, SamplingParams
from streamrnn.engine.token_pick import pick_tokens

__all__ = ["EXECUTOR_RULES", "ExecutorTokenLoop"]

#: the feedback rules the executor loop runs (``"custom"`` stays on the compiled loop)
EXECUTOR_RULES = ("tokens", "onehot", "prediction")


class ExecutorTokenLoop:
    """Per-token generation through an executor's ``run_rows`` (see the module docstring).

    Args:
        executor: the engine's executor (its state rows hold the streams' state).
        step_weights: called once per :meth:`run`: the weights to pass to each step
            (None: the executor's own).

    Attributes:
        calls: executor calls made so far (one per generated token position per run).
    """

    def __init__(self, executor: TakesStepWeights,
                 step_weights: Callable[[], Any] = lambda: None):
        self.executor = executor
        self.step_weights = step_weights
        self.calls = 0

    @staticmethod
    def _values(plan: FeedbackPlan, sampling: tuple[np.ndarray, ...], y: np.ndarray,
                key: np.ndarray, step: int) -> np.ndarray:
        """The values fed back for rows ``y`` at ``step``: ids ``(n,)`` or ``y`` itself
        (``sampling``: the rows' greedy, inverse temperature and top-k arrays)."""
        if plan.mode == "prediction":
            return y
        return pick_tokens(y, plan.probs, *sampling, key, np.full(len(y), step, np.int64),
                           plan.no_zero)

    @staticmethod
    def _inputs(plan: FeedbackPlan, v: np.ndarray, vocab: int) -> np.ndarray:
        """Executor chunks ``(n, 1)`` ids or ``(n, 1, D)`` floats for the values ``v``."""
        if plan.mode == "onehot":
            return np.eye(vocab, dtype=np.float32)[v][:, None]
        if plan.mode == "tokens":
            return v.astype(np.int32)[:, None]
        return np.asarray(v, np.float32)[:, None]

    def run(self, plan: FeedbackPlan, params: SamplingParams, slots: list[int],
            first_outputs: np.ndarray, steps: int, keys: list[tuple[int, int]]
            ) -> list[np.ndarray]:
        """:meth:`streamrnn.engine.generate.Generator.run` on the executor: from each slot's
        output at its last consumed step (``first_outputs``, one row per slot), feed back up
        to ``steps`` values (a slot stops after feeding ``params.end_token``), each picked
        with the slot's key (``keys``: two words per slot) and its step index.

        Returns:
            per slot the values fed back (all of them were fed in): ``(n,)`` int32 ids or
            ``(n, D)`` float32, ``n <= steps``. ``plan.mode`` must be in
            :data:`EXECUTOR_RULES` (else ValueError).
        """
        if plan.mode not in EXECUTOR_RULES:
            raise ValueError(f"the executor loop runs {EXECUTOR_RULES}, not {plan.mode!r}")
        n = len(slots)
        y = np.array(first_outputs, np.float32).reshape(n, -1)
        key = np.asarray(keys, np.int64).reshape(-1, 2) & M32
        sampling = (np.full(n, params.greedy), np.full(n, 1.0 / params.temperature, np.float32),
                    np.full(n, params.top_k, np.int32))
        ids = plan.picks_tokens
        values = np.zeros((steps, n) + (() if ids else y.shape[1:]),
                          np.int32 if ids else np.float32)
        count = np.zeros(n, np.int64)
        rows = np.arange(n)  # the slots still generating (indices into `slots`)
        slots_arr = np.asarray(slots, np.int64)
        weights = self.step_weights()
        for step in range(steps):
            if not rows.size:
                break
            every = len(rows) == n  # no fancy indexing while all are generating
            v = self._values(plan, sampling if every else tuple(a[rows] for a in sampling),
                             y if every else y[rows], key if every else key[rows], step)
            values[step, rows] = v
            count[rows] += 1
            x = self._inputs(plan, v, y.shape[1])
            last = self.executor.run_rows(slots_arr[rows], x, weights)[:, -1]
            self.calls += 1
            if every:
                y = last
            else:
                y[rows] = last
            if ids:
                rows = rows[v != params.end_token]
        return [values[: count[i], i].copy() for i in range(n)]
