"""Engine: the in-process streaming API (slots + state bank + runner, no sockets).

Example::

    engine = Engine.from_keras("model.keras", slots=64)
    y = engine.push("sensor-7", chunk)            # chunk (T, D) float -> (T, output_dim)
    ys = engine.push_many({"a": c1, "b": c2})      # one batched step for both streams
    engine.reset("sensor-7"); engine.close("sensor-7")

The engine is not thread-safe: one thread (a worker's compute loop) drives it.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from streamrnn.engine.slots import SlotTable
from streamrnn.engine.state import StateBank, StateSnapshot
from streamrnn.errors import EngineFullError, InvalidInputError, UnknownStreamError
from streamrnn.executors.buckets import plan_steps
from streamrnn.executors.keras_runner import ModelRunner, gpu_available
from streamrnn.executors.models import ServingModel, build_serving_model, load_model
from streamrnn.protocol import ErrorCode

DEFAULT_MAX_CHUNK_STEPS = 1 << 20


@dataclass
class _SwappedStream:
    """A stream parked in host memory: its state rows and steps since reset."""

    state: StateSnapshot
    steps: int


class Engine:
    """Serves one Keras RNN model to many streams, one slot (batch row) per stream."""

    def __init__(
        self,
        serving: ServingModel,
        *,
        max_bucket: int = 64,
        jit_compile: bool | None = None,
        allow_nonfinite: bool = False,
        max_chunk_steps: int = DEFAULT_MAX_CHUNK_STEPS,
        max_streams: int | None = None,
    ):
        self.serving = serving
        self.runner = ModelRunner(serving, max_bucket=max_bucket, jit_compile=jit_compile)
        self.bank = StateBank(serving.state_variables())
        self.table = SlotTable(serving.slots)
        self.allow_nonfinite = allow_nonfinite
        self.max_chunk_steps = max_chunk_steps
        # Streams beyond the slot count live in host memory (LRU swap); None: slots only.
        self.max_streams = serving.slots if max_streams is None else max_streams
        if self.max_streams < serving.slots:
            raise ValueError(f"max_streams ({max_streams}) must be >= slots ({serving.slots})")
        self._swapped: OrderedDict[str, _SwappedStream] = OrderedDict()
        self.swaps_in = 0
        self.swaps_out = 0

    @classmethod
    def from_keras(
        cls,
        model_or_path: keras.Model | str | os.PathLike,
        slots: int = 64,
        *,
        max_bucket: int = 64,
        jit_compile: bool | None = None,
        allow_nonfinite: bool = False,
        use_cudnn: bool | str = "auto",
        fused: bool | None = None,
        max_chunk_steps: int = DEFAULT_MAX_CHUNK_STEPS,
        max_streams: int | None = None,
    ) -> Engine:
        """Build an engine from a trained ``keras.Model`` or a ``.keras`` path.

        The model may have any batch size and be stateful or not; a stateful serving clone
        with batch size ``slots`` is built and the weights are copied. Layers that cannot
        stream (Bidirectional, ``go_backwards=True``, attention, pooling, ...) raise
        :class:`~streamrnn.UnsupportedModelError` (a ValueError) naming the layer.

        Args:
            slots: concurrent streams (batch rows of the serving clone).
            max_bucket: longest padded step (power of two); longer chunks are split.
            jit_compile: compile the step with XLA. None (default): XLA on CPU, where it
                measured about 1.2x faster; off on GPU, where cuDNN kernels are not XLA ops.
            allow_nonfinite: accept NaN/Inf in chunks (rejected by default).
            use_cudnn: passed to LSTM/GRU clones (Keras does not save this setting).
            fused: run standard LSTM/GRU/SimpleRNN layers through the fused fast path
                (:mod:`streamrnn.executors.fused`: input projection hoisted out of the time
                loop, same
                weights and state variables). None (default): on for CPU, where it measured
                1.15x the Keras layer (interleaved, 64 slots x 16 steps x 256 units); off on
                GPU, where the Keras layer can use cuDNN. Custom cells always use Keras.
            max_streams: live streams allowed in all; those beyond ``slots`` are swapped to
                host memory (least recently used first) and back in on their next chunk,
                with identical outputs. Default: ``slots`` (no swapping).
        """
        model = load_model(model_or_path)
        if fused is None:
            fused = not gpu_available()
        serving = build_serving_model(model, slots, use_cudnn=use_cudnn, fused=fused)
        return cls(
            serving,
            max_bucket=max_bucket,
            jit_compile=jit_compile,
            allow_nonfinite=allow_nonfinite,
            max_chunk_steps=max_chunk_steps,
            max_streams=max_streams,
        )

    # ---- facts -------------------------------------------------------------------------

    @property
    def slots(self) -> int:
        return self.serving.slots

    @property
    def free_slots(self) -> int:
        return self.table.free

    @property
    def streams(self) -> list[str]:
        """Every live stream, resident in a slot or swapped out to host memory."""
        return [*self.table, *self._swapped]

    @property
    def capacity_left(self) -> int:
        """How many new streams can still be opened (free slots plus swap room)."""
        return self.max_streams - len(self.table) - len(self._swapped)

    @property
    def input_kind(self) -> str:
        """``"tokens"`` (chunks are int ids ``[T]``) or ``"features"`` (float ``[T, D]``)."""
        return self.serving.input_kind

    @property
    def input_dim(self) -> int:
        """Feature size D, or the vocabulary size for token models."""
        return self.serving.input_dim

    @property
    def output_dim(self) -> int:
        return self.serving.output_dim

    @property
    def kernel(self) -> str:
        return self.runner.kernel

    def stats(self) -> dict[str, Any]:
        return {
            "slots": self.slots,
            "streams": len(self.table) + len(self._swapped),
            "free_slots": self.free_slots,
            "swapped_streams": len(self._swapped),
            "swaps_in": self.swaps_in,
            "swaps_out": self.swaps_out,
            "steps": self.runner.steps_run,
            "timesteps": self.runner.timesteps_run,
            "traces": self.runner.trace_count,
            "kernel": self.kernel,
        }

    # ---- validation --------------------------------------------------------------------

    def validate(self, chunk: Any) -> np.ndarray:
        """Check a chunk and return it normalised (float32 ``(T, D)`` or int32 ``(T,)``).

        Raises InvalidInputError (with an ErrorCode) and touches no state.
        """
        arr = np.asarray(chunk)
        if self.input_kind == "tokens":
            if arr.ndim != 1:
                raise InvalidInputError(
                    f"token chunks must be 1-D [T] int ids, got shape {arr.shape}",
                    ErrorCode.BAD_SHAPE,
                )
            if arr.dtype.kind not in "iu":
                raise InvalidInputError(
                    f"token chunks must have an integer dtype, got {arr.dtype}", ErrorCode.BAD_DTYPE
                )
        else:
            if arr.ndim != 2 or arr.shape[1] != self.input_dim:
                raise InvalidInputError(
                    f"feature chunks must be [T, {self.input_dim}], got shape {arr.shape}",
                    ErrorCode.BAD_SHAPE,
                )
            if arr.dtype.kind != "f":
                raise InvalidInputError(
                    f"feature chunks must have a float dtype, got {arr.dtype}", ErrorCode.BAD_DTYPE
                )
        if arr.shape[0] == 0:
            raise InvalidInputError("empty chunk (T = 0)", ErrorCode.EMPTY_CHUNK)
        if arr.shape[0] > self.max_chunk_steps:
            raise InvalidInputError(
                f"chunk of {arr.shape[0]} steps exceeds the limit of {self.max_chunk_steps}",
                ErrorCode.TOO_LARGE,
            )
        if self.input_kind == "tokens":
            low, high = int(arr.min()), int(arr.max())
            if low < 0 or high >= self.input_dim:
                raise InvalidInputError(
                    f"token ids must be in 0..{self.input_dim - 1}, got {low}..{high}",
                    ErrorCode.BAD_VALUE,
                )
            return arr.astype(np.int32, copy=False)
        arr = arr.astype(np.float32, copy=False)
        if not self.allow_nonfinite and not np.isfinite(arr).all():
            bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
            raise InvalidInputError(
                f"chunk contains NaN or Inf (first at step {bad}); "
                "build the engine with allow_nonfinite=True to accept them",
                ErrorCode.NON_FINITE,
            )
        return arr

    # ---- streaming ---------------------------------------------------------------------

    def push(self, stream: str, chunk: Any) -> np.ndarray:
        """Feed ``chunk`` to ``stream`` (opened if new); returns ``(T, output_dim)`` float32."""
        return self.push_many({stream: chunk})[stream]

    def push_many(
        self, chunks: Mapping[str, Any], *, validated: bool = False
    ) -> dict[str, np.ndarray]:
        """Feed one chunk to each of several streams in shared batched steps.

        Every chunk is validated, and room for new streams is checked, before any state
        changes: on an error nothing has been applied. More streams than slots are served in
        waves of at most ``slots`` streams, swapping idle streams out between waves.

        Args:
            chunks: stream -> ``(T, D)`` float or ``(T,)`` int ids.
            validated: every chunk is already what :meth:`validate` returned for it (the
                worker validates each request on arrival), so it is not checked again.
        """
        if not chunks:
            return {}
        if validated:
            ready = dict(chunks)
        else:
            ready = {stream: self.validate(chunk) for stream, chunk in chunks.items()}
        new = [s for s in ready if s not in self]
        if len(new) > self.capacity_left:
            raise EngineFullError(
                f"{len(new)} new streams but room for only {self.capacity_left} "
                f"(slots={self.slots}, max_streams={self.max_streams}); close streams, or "
                "build the engine with more slots or a larger max_streams"
            )
        outputs: dict[str, np.ndarray] = {}
        names = list(ready)
        for start in range(0, len(names), self.slots):
            wave = names[start : start + self.slots]
            self._make_resident(wave)
            outputs.update(self._run_resident({s: ready[s] for s in wave}))
        return outputs

    def _run_resident(self, ready: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        slot_of = {s: self.table.slot_of(s) for s in ready}
        pieces: dict[str, list[np.ndarray]] = {s: [] for s in ready}
        for plan in plan_steps({s: len(c) for s, c in ready.items()}, self.runner.max_bucket):
            batch = {slot_of[s]: ready[s][a:b] for s, (a, b) in plan.slices.items()}
            out = self.runner.run(batch, plan.bucket)
            for s in plan.slices:
                pieces[s].append(out[slot_of[s]])
        for s, c in ready.items():
            self.table.touch(s, len(c))
        return {s: p[0] if len(p) == 1 else np.concatenate(p) for s, p in pieces.items()}

    def _make_resident(self, streams: list[str]) -> None:
        """Give every stream in ``streams`` (at most ``slots``) a slot, swapping others out."""
        absent = [s for s in streams if s not in self.table]
        shortfall = len(absent) - self.table.free
        if shortfall > 0:
            keep = set(streams)
            victims = sorted(
                (info.last_seen, name) for name, info in self.table.items() if name not in keep
            )[:shortfall]
            self._swap_out([name for _, name in victims])
        fresh = [s for s in absent if s not in self._swapped]
        self.open_many(fresh)
        for s in absent:
            if s in self._swapped:
                parked = self._swapped.pop(s)
                slot = self.table.acquire(s)
                self.bank.restore(slot, parked.state)
                self.table.info(s).steps = parked.steps
                self.swaps_in += 1

    def _swap_out(self, streams: list[str]) -> None:
        if not streams:
            return
        slots = [self.table.slot_of(s) for s in streams]
        rows = self.bank.read(slots)
        for k, s in enumerate(streams):
            info = self.table.info(s)
            self._swapped[s] = _SwappedStream([r[k].copy() for r in rows], info.steps)
            self.table.release(s)
            self.swaps_out += 1

    def open(self, stream: str) -> int:
        """Give ``stream`` a slot (a new stream starts in the initial state); returns the slot."""
        if stream not in self and self.capacity_left < 1:
            raise EngineFullError(
                f"no room for stream {stream!r} (slots={self.slots}, "
                f"max_streams={self.max_streams})"
            )
        self._make_resident([stream])
        return self.table.slot_of(stream)

    def open_many(self, streams: list[str]) -> None:
        fresh = [self.table.acquire(s) for s in streams if s not in self.table]
        self.bank.reset(fresh)  # a reused row must not leak the previous stream's state

    def reset(self, stream: str) -> None:
        """Put ``stream`` back to its initial state; no other stream is touched."""
        if stream in self._swapped:
            self._swapped[stream] = _SwappedStream(
                [r.copy() for r in self.bank.initial_rows], 0
            )
            return
        self.bank.reset([self.table.slot_of(stream)])
        self.table.info(stream).steps = 0

    def close(self, stream: str) -> None:
        """Forget ``stream`` and free its slot."""
        if self._swapped.pop(stream, None) is None:
            self.table.release(stream)

    def is_resident(self, stream: str) -> bool:
        """Whether ``stream`` holds a slot now (not swapped out to host memory)."""
        return stream in self.table

    def __contains__(self, stream: object) -> bool:
        return stream in self.table or stream in self._swapped

    # ---- state snapshots (checkpoints, swapping, failover) ----------------------------

    def snapshot(self, stream: str) -> StateSnapshot:
        """A copy of ``stream``'s recurrent state rows (resident or swapped out)."""
        if stream in self._swapped:
            return [r.copy() for r in self._swapped[stream].state]
        if stream not in self.table:
            raise UnknownStreamError(f"unknown stream {stream!r}")
        return self.bank.snapshot(self.table.slot_of(stream))

    def restore(self, stream: str, snapshot: StateSnapshot) -> None:
        """Open ``stream`` (if needed) and make it continue from ``snapshot``."""
        self.bank.restore(self.open(stream), snapshot)

    # ---- closed-loop generation (streamrnn.engine.generate) ----------------------------------

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
        """:meth:`generate` for several streams in the same batched compiled steps.

        A stream that emits ``end_token`` stops; the others go on. Each stream's result
        equals what :meth:`generate` alone would return. ``seed`` may be a mapping
        stream -> seed.
        """
        from streamrnn.engine.generate import generate_many

        return generate_many(
            self, prompts, steps=steps, sample=sample, temperature=temperature,
            top_k=top_k, seed=seed, end_token=end_token, feedback=feedback,
        )

    # ---- whole-engine state (durability) ----------------------------------------------

    @property
    def state_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """(dtype, row shape) of every state variable: identifies the model's state format."""
        return [(str(r.dtype), tuple(r.shape)) for r in self.bank.initial_rows]

    def export_states(self) -> dict[str, tuple[StateSnapshot, int]]:
        """Every live stream's ``(state rows, steps since reset)``, resident or swapped."""
        resident = [s for s in self.table]
        out: dict[str, tuple[StateSnapshot, int]] = {}
        if resident:
            rows = self.bank.read([self.table.slot_of(s) for s in resident])
            for k, s in enumerate(resident):
                out[s] = ([r[k].copy() for r in rows], self.table.info(s).steps)
        for s, parked in self._swapped.items():
            out[s] = ([r.copy() for r in parked.state], parked.steps)
        return out

    def import_states(self, states: Mapping[str, tuple[StateSnapshot, int]]) -> None:
        """Open (or overwrite) each stream with the given state rows and step count."""
        if len([s for s in states if s not in self]) > self.capacity_left:
            raise EngineFullError(
                f"cannot import {len(states)} streams: room for {self.capacity_left} "
                f"(slots={self.slots}, max_streams={self.max_streams})"
            )
        for stream, (state, steps) in states.items():
            if stream in self._swapped or (stream not in self.table and not self.table.free):
                self._swapped[stream] = _SwappedStream([np.array(r) for r in state], steps)
                continue
            self.restore(stream, state)
            self.table.info(stream).steps = steps

    # ---- weights versions (hot swap between steps) -------------------------------------

    weights_version: int = 0
    """Version of the weights the engine serves (0: as loaded; set by :meth:`set_weights`)."""

    def set_weights(self, weights: keras.Model | list[np.ndarray], version: int | None = None
                    ) -> None:
        """Serve new weights from the next step on; no stream's state is touched.

        ``weights`` is a model of the same architecture or its ``get_weights()`` list;
        every shape is checked before anything is assigned (InvalidInputError, BAD_SHAPE).
        ``version`` defaults to the current one + 1.
        """
        if not isinstance(weights, keras.Model):
            current = self.serving.get_weights()
            weights = [np.asarray(w) for w in weights]
            if len(weights) != len(current) or any(
                w.shape != c.shape for w, c in zip(weights, current, strict=False)
            ):
                raise InvalidInputError(
                    f"weights {[w.shape for w in weights]} do not match the served model's "
                    f"{[c.shape for c in current]}", ErrorCode.BAD_SHAPE,
                )
        self.serving.set_weights_from(weights)
        self.weights_version = self.weights_version + 1 if version is None else int(version)
