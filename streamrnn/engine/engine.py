"""Engine: the in-process streaming API (slots + state rows + an executor, no sockets).

Example::

    engine = Engine.from_keras("model.keras", slots=64)
    y = engine.push("sensor-7", chunk)            # chunk (T, D) float -> (T, output_dim)
    ys = engine.push_many({"a": c1, "b": c2})      # one batched step for both streams
    engine.reset("sensor-7"); engine.close("sensor-7")
    engine.stats()["executor"]                     # "onnxruntime" (the CPU default)

An :class:`Engine` meets :class:`~streamrnn.engine.interface.EngineLike` and the optional
:class:`~streamrnn.engine.interface.SupportsGeneration` and
:class:`~streamrnn.engine.interface.SupportsSnapshots`. It runs its steps through an
:class:`~streamrnn.engine.interface.Executor` (ONNX Runtime, torch or Keras, chosen by
:mod:`streamrnn.engine.backends`), keeps each stream's state in one row of the executor's
:class:`~streamrnn.engine.interface.StateRows` (a step gathers the busy rows, runs and
scatters them back; idle rows are never written), and swaps streams beyond its slots to
host memory (:mod:`streamrnn.engine.residency`). Snapshots hold the rows in the Keras
serving clone's state order whatever the executor, so one taken under one executor
restores under another. Weights versions (swaps and pins) are kept converted per executor
by :mod:`streamrnn.engine.versions`.

The engine is not thread-safe: one thread (a worker's compute loop) drives it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

from streamrnn.engine.backends import build_executor
from streamrnn.engine.generate import Generator
from streamrnn.engine.generation import GenerationMixin
from streamrnn.engine.interface import Executor, StateRows, StateSnapshot
from streamrnn.engine.residency import Residency
from streamrnn.engine.slots import SlotTable
from streamrnn.engine.validation import validate_chunk
from streamrnn.engine.versions import CloneRows, WeightsMixin, WeightVersions
from streamrnn.errors import EngineFullError
from streamrnn.executors.buckets import plan_steps
from streamrnn.executors.keras_runner import gpu_available
from streamrnn.executors.models import ServingModel, build_serving_model, load_model

__all__ = ["DEFAULT_MAX_CHUNK_STEPS", "Engine"]

DEFAULT_MAX_CHUNK_STEPS = 1 << 20


class Engine(GenerationMixin, WeightsMixin):
    """Serves one Keras RNN model to many streams, one slot (batch row) per stream.

    An :class:`~streamrnn.engine.interface.EngineLike` with closed-loop generation
    (``generate`` / ``generate_many``, from :class:`~streamrnn.engine.generation.GenerationMixin`),
    state snapshots (``state_layout``, ``initial_state``, ``export_states``,
    ``import_states``) and weights versions (``set_weights``, ``pinned_weights``, from
    :class:`~streamrnn.engine.versions.WeightsMixin`).
    ``Engine(serving, executor=...)`` steps a serving clone through the executor named
    (``"auto"``, ``"onnxruntime"``, ``"torch"``, ``"keras"``; see :meth:`from_keras`).
    """

    def __init__(
        self,
        serving: ServingModel,
        *,
        max_bucket: int = 64,
        jit_compile: bool | None = None,
        allow_nonfinite: bool = False,
        max_chunk_steps: int = DEFAULT_MAX_CHUNK_STEPS,
        max_streams: int | None = None,
        executor: str = "auto",
        threads: int | None = None,
        precision: str = "float32",
    ):
        self.serving = serving
        #: XLA for the compiled steps and generation loops (None -> on CPU only)
        self.jit_compile = not gpu_available() if jit_compile is None else jit_compile
        choice = build_executor(serving, executor, max_bucket=max_bucket,
                                jit_compile=self.jit_compile, threads=threads,
                                precision=precision)
        self.executor: Executor = choice.executor
        #: why ``executor="auto"`` did not run its first choice (None: it did, or named)
        self.executor_fallback: str | None = choice.fallback
        self.bank: StateRows = self.executor.state
        self.versions = WeightVersions(serving, self.executor)
        self.clone_rows = CloneRows(serving, self.executor)
        self.table = SlotTable(serving.slots)
        # Streams beyond the slot count live in host memory (LRU swap); None: slots only.
        self.residency = Residency(self.table, self.bank, max_streams)
        self.allow_nonfinite = allow_nonfinite
        self.max_chunk_steps = max_chunk_steps
        self._generator: Generator | None = None

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
        executor: str = "auto",
        threads: int | None = None,
        precision: str = "float32",
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
                loop, same weights and state variables). None (default): on for CPU, where it
                measured 1.15x the Keras layer (interleaved, 64 slots x 16 steps x 256
                units); off on GPU, where the Keras layer can use cuDNN. Custom cells: Keras.
            max_streams: live streams allowed in all; those beyond ``slots`` are swapped to
                host memory (least recently used first) and back in on their next chunk,
                with identical outputs. Default: ``slots`` (no swapping).
            executor: ``"auto"`` (default: ONNX Runtime on CPU when it covers the model, on a
                GPU torch when installed, else Keras; ``stats()["executor_fallback"]`` says
                why it fell back), or ``"onnxruntime"``, ``"torch"``, ``"keras"`` (else
                UnsupportedModelError with the reason); :mod:`streamrnn.engine.backends`.
                ``jit_compile``, ``fused``, ``use_cudnn`` shape the Keras executor and
                generation's compiled loop (Keras executor, feedback callables).
            threads: ONNX Runtime / torch CPU threads (default: all cores; not Keras).
            precision: ``"float32"`` (default) or ``"bf16"`` (torch only: auto means torch).
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
            executor=executor,
            threads=threads,
            precision=precision,
        )

    # ---- facts -------------------------------------------------------------------------

    @property
    def runner(self) -> Any:  # the executor's older name (Keras extras: ``row_buckets``)
        return self.executor

    @property
    def slots(self) -> int:
        return self.serving.slots

    @property
    def max_streams(self) -> int:
        """Live streams allowed in all (those beyond ``slots`` are swapped to host memory)."""
        return self.residency.max_streams

    @property
    def free_slots(self) -> int:
        return self.table.free

    @property
    def streams(self) -> list[str]:
        """Every live stream, resident in a slot or swapped out to host memory."""
        return self.residency.streams

    @property
    def capacity_left(self) -> int:
        """How many new streams can still be opened (free slots plus swap room)."""
        return self.residency.capacity_left

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
    def kernel(self) -> str:  # what runs the steps, in words (the executor's description)
        return self.executor.kernel

    def stats(self) -> dict[str, Any]:
        homes = self.residency
        return {
            "slots": self.slots,
            "streams": len(homes),
            "free_slots": self.free_slots,
            "swapped_streams": len(homes.parked),
            "swaps_in": homes.swaps_in,
            "swaps_out": homes.swaps_out,
            "steps": self.executor.steps_run,
            "timesteps": self.executor.timesteps_run,
            "traces": self.executor.trace_count,
            "kernel": self.kernel,
            "executor": self.executor.name,
            "executor_fallback": self.executor_fallback,
            "weight_conversions": self.versions.conversions,
        }

    # ---- streaming ---------------------------------------------------------------------

    def validate(self, chunk: Any) -> np.ndarray:
        """Check a chunk and return it normalised (float32 ``(T, D)`` or int32 ``(T,)``).

        Raises InvalidInputError (with an ErrorCode) and touches no state; see
        :func:`~streamrnn.engine.validation.validate_chunk`.
        """
        return validate_chunk(
            chunk, input_kind=self.input_kind, input_dim=self.input_dim,
            max_chunk_steps=self.max_chunk_steps, allow_nonfinite=self.allow_nonfinite,
        )

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
            self.residency.make_resident(wave)
            outputs.update(self._run_resident({s: ready[s] for s in wave}))
        return outputs

    def _run_resident(self, ready: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        slot_of = {s: self.table.slot_of(s) for s in ready}
        pieces: dict[str, list[np.ndarray]] = {s: [] for s in ready}
        max_bucket = self.executor.buckets[-1]
        step_weights = self.versions.step_weights  # a pinned version's, or None: the latest
        for plan in plan_steps({s: len(c) for s, c in ready.items()}, max_bucket):
            batch = {slot_of[s]: ready[s][a:b] for s, (a, b) in plan.slices.items()}
            out = (self.executor.run(batch, plan.bucket) if step_weights is None else
                   self.executor.run(batch, plan.bucket, weights=step_weights))
            for s in plan.slices:
                pieces[s].append(out[slot_of[s]])
        for s, c in ready.items():
            self.table.touch(s, len(c))
        return {s: p[0] if len(p) == 1 else np.concatenate(p) for s, p in pieces.items()}

    def open(self, stream: str) -> int:
        """Give ``stream`` a slot (a new stream starts in the initial state); returns the slot."""
        if stream not in self and self.capacity_left < 1:
            raise EngineFullError(
                f"no room for stream {stream!r} (slots={self.slots}, "
                f"max_streams={self.max_streams})"
            )
        self.residency.make_resident([stream])
        return self.table.slot_of(stream)

    def open_many(self, streams: list[str]) -> None:
        """Slots for the new ones among ``streams`` (there must be free slots)."""
        self.residency.open_many(streams)

    def reset(self, stream: str) -> None:
        """Put ``stream`` back to its initial state; no other stream is touched."""
        self.residency.reset(stream)

    def close(self, stream: str) -> None:
        """Forget ``stream`` and free its slot."""
        self.residency.close(stream)

    def is_resident(self, stream: str) -> bool:
        """Whether ``stream`` holds a slot now (not swapped out to host memory)."""
        return stream in self.table

    def __contains__(self, stream: object) -> bool:
        return stream in self.residency

    # ---- state snapshots (checkpoints, swapping, failover) ----------------------------

    def snapshot(self, stream: str) -> StateSnapshot:
        """A copy of ``stream``'s recurrent state rows (resident or swapped out)."""
        return self.residency.snapshot(stream)

    def restore(self, stream: str, snapshot: StateSnapshot) -> None:
        """Open ``stream`` (if needed) and make it continue from ``snapshot``."""
        self.bank.restore(self.open(stream), snapshot)

    @property
    def state_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """(dtype, row shape) of every state variable: identifies the model's state format."""
        return [(str(r.dtype), tuple(r.shape)) for r in self.bank.initial_rows]

    def initial_state(self) -> StateSnapshot:
        """A copy of the rows a new (or reset) stream starts from."""
        return [r.copy() for r in self.bank.initial_rows]

    def export_states(self) -> dict[str, tuple[StateSnapshot, int]]:
        """Every live stream's ``(state rows, steps since reset)``, resident or swapped."""
        return self.residency.export_states()

    def import_states(self, states: Mapping[str, tuple[StateSnapshot, int]]) -> None:
        """Open (or overwrite) each stream with the given state rows and step count."""
        if len([s for s in states if s not in self]) > self.capacity_left:
            raise EngineFullError(
                f"cannot import {len(states)} streams: room for {self.capacity_left} "
                f"(slots={self.slots}, max_streams={self.max_streams})"
            )
        self.residency.import_states(states)
