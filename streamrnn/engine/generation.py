"""``Engine.generate`` / ``generate_many``: prompts pushed, then the closed loop, in waves.

:class:`GenerationMixin` gives :class:`~streamrnn.Engine` its generation methods. Each wave
of at most ``slots`` streams is primed through ``push_many``; the loop then runs on the
engine's executor (:class:`~streamrnn.engine.token_loop.ExecutorTokenLoop`, for ONNX Runtime
or torch and a built-in feedback rule) or as the compiled Keras loop on the serving clone
(:class:`~streamrnn.engine.generate.Generator`, for the Keras executor or a feedback
callable). The feedback rules, what a stream holds afterwards and where tokens can differ
between executors are described in :mod:`streamrnn.engine.generate`.

Example::

    tokens = engine.generate("s", prompt_ids, steps=50, sample="top_k", top_k=5, seed=1)
    outs = engine.generate_many({"a": p1, "b": p2}, steps=50, end_token=0)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from streamrnn.engine.generate import Generator, plan_feedback
from streamrnn.engine.interface import Executor, TakesStepWeights
from streamrnn.engine.sampling import FeedbackPlan, check_params, seed_of, stream_key
from streamrnn.engine.token_loop import EXECUTOR_RULES, ExecutorTokenLoop
from streamrnn.errors import EngineFullError, InvalidInputError
from streamrnn.protocol import ErrorCode

__all__ = ["GenerationMixin"]


class GenerationMixin:
    """``generate`` / ``generate_many`` for an engine (:class:`~streamrnn.Engine` mixes it in).

    Uses the engine's ``serving``, ``jit_compile``, ``executor``, ``versions``, ``table``,
    ``slots``, ``capacity_left``, ``validate``, ``push_many``, ``generation_rows``, ``in``;
    owns the loops (:attr:`generator`, :attr:`token_loop`).
    """

    executor: Executor
    versions: Any  # a WeightVersions: its ``step_weights`` are a pinned version's
    _generator: Generator | None = None
    _token_loop: ExecutorTokenLoop | None = None

    @property
    def generator(self) -> Generator:
        """The compiled generation loops (built on first use)."""
        if self._generator is None:
            self._generator = Generator(self.serving, jit_compile=self.jit_compile)
        return self._generator

    @property
    def token_loop(self) -> ExecutorTokenLoop:
        """The per-token loop on the engine's executor (built on first use; used when the
        executor takes step weights, see :meth:`_on_executor`)."""
        if self._token_loop is None:
            versions = self.versions
            self._token_loop = ExecutorTokenLoop(self.executor, lambda: versions.step_weights)
        return self._token_loop

    def _on_executor(self, plan: FeedbackPlan) -> bool:
        """Whether the loop runs on the executor (not the compiled loop on the clone)."""
        return isinstance(self.executor, TakesStepWeights) and plan.mode in EXECUTOR_RULES

    def generate(
        self,
        stream: str,
        prompt: Any,
        steps: int = 100,
        sample: str = "greedy",
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = 0,
        end_token: int | None = None,
        feedback: Any = None,
    ) -> np.ndarray:
        """Prime ``stream`` with ``prompt``, then feed each output back as the next input.

        The prompt goes through the normal push path (the stream is opened if new). Every
        generated value is then fed in, so afterwards the stream has consumed
        ``prompt + returned values`` and a later :meth:`push` continues from there, exactly
        as one offline call on the concatenated sequence would.

        Args:
            prompt: a chunk as for :meth:`push` (token ids ``(T,)``, or ``(T, D)`` floats;
                one-hot models also take ids). T >= 1.
            steps: values to generate (fewer if ``end_token`` comes first).
            sample: ``"greedy"`` (argmax), ``"temperature"`` (alias ``"sample"``) or
                ``"top_k"``: token models only.
            temperature: divides the logits before sampling.
            top_k: sample among the k most likely tokens.
            seed: sampling is a pure function of (seed, stream id, step): reproducible, and
                independent of slots and of other streams in the batch.
            end_token: stop this stream after emitting (and consuming) this token.
            feedback: None (rule chosen from the model), ``"tokens"``, ``"onehot"``,
                ``"prediction"``, or a callable ``y (slots, out) -> next input`` written in
                TF ops; see :mod:`streamrnn.engine.generate`.

        Returns:
            token models: ``(n,)`` int32 ids; regression models: ``(n, D)`` float32.
        """
        return self.generate_many(
            {stream: prompt}, steps=steps, sample=sample, temperature=temperature,
            top_k=top_k, seed=seed, end_token=end_token, feedback=feedback,
        )[stream]

    def generate_many(
        self,
        prompts: Mapping[str, Any],
        steps: int = 100,
        sample: str = "greedy",
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | Mapping[str, int] | None = 0,
        end_token: int | None = None,
        feedback: Any = None,
    ) -> dict[str, np.ndarray]:
        """:meth:`generate` for several streams in the same batched steps.

        A stream that emits ``end_token`` stops; the others go on. Each stream's result
        equals what :meth:`generate` alone would return. ``seed`` may be a mapping
        stream -> seed.
        """
        plan = plan_feedback(self.serving, feedback)
        params = check_params(plan, self.serving, steps, sample, temperature, top_k, seed,
                              end_token)
        self.generator.check_custom(plan)  # before any state changes
        if not prompts:
            return {}
        ready = self._ready_prompts(plan, prompts)
        result: dict[str, np.ndarray] = {}
        names = list(ready)
        # At most `slots` streams are resident at once: generate in waves, like push_many.
        for start in range(0, len(names), self.slots):
            wave = names[start : start + self.slots]
            primed = self.push_many({s: ready[s] for s in wave})  # leaves the wave resident
            slots = [self.table.slot_of(s) for s in wave]
            first = np.stack([primed[s][-1] for s in wave])
            keys = [stream_key(seed_of(seed, s), s) for s in wave]
            if self._on_executor(plan):  # the state stays in the executor's rows
                values = self.token_loop.run(plan, params, slots, first, int(steps), keys)
            else:
                with self.generation_rows(slots):  # the loop runs on the Keras clone
                    values = self.generator.run(plan, params, slots, first, int(steps), keys)
            for s, v in zip(wave, values, strict=True):
                self.table.touch(s, len(v))
                result[s] = v
        return result

    def _ready_prompts(self, plan: FeedbackPlan, prompts: Mapping[str, Any]
                       ) -> dict[str, np.ndarray]:
        """Every prompt validated, and room checked for the new streams (no state changes)."""
        for stream in prompts:
            if not isinstance(stream, str):
                raise InvalidInputError(f"stream ids are strings, got {stream!r}",
                                        ErrorCode.BAD_VALUE)
        ready = {s: self.validate(self.generator.normalise_prompt(plan, p))
                 for s, p in prompts.items()}
        new = [s for s in ready if s not in self]
        room = self.capacity_left
        if len(new) > room:
            raise EngineFullError(
                f"{len(new)} new streams but room for only {room} (slots={self.slots}); "
                "close streams or build the engine with more slots"
            )
        return ready
