"""The ONNX Runtime executor: the default CPU kernel (Keras stays reference and fallback).

:class:`OrtExecutor` builds the model's ONNX graph (:mod:`streamrnn.executors.onnx_graph`:
one ``LSTM`` / ``GRU`` / ``RNN`` node per recurrent cell) and keeps
every stream's recurrent state as host numpy rows (:class:`HostStateBank`, one
``(slots, units)`` array per state: h and c per LSTM cell, h per GRU / SimpleRNN cell, in
the Keras serving clone's state variable order, so snapshots move between executors).

A step gathers the busy slots' rows only, right-pads their chunks to the longest one (the
graph's time axis is dynamic; ``bucket`` is only an upper bound), passes each row's length
as ``sequence_lens`` (ONNX Runtime then returns each row's state at its last valid step),
and scatters the new states back to those rows; idle rows are never read or written (a row
of length 0 would come back with a wrong state).

Weights: each version is an :class:`OrtWeights` (a session and its feeds), made once by
:meth:`OrtExecutor.convert_weights`; a swap or a per-step pin passes another one (a pointer
change). By default each version's session has its weights baked in as initializers, which
ONNX Runtime pre-packs once (fed as graph inputs they are not pre-packed: measured up to
2x slower at few rows); ``bake_weights=False`` keeps one session with the weights as
inputs.

Session: ``CPUExecutionProvider``, ``threads`` intra-op threads (default ``os.cpu_count()``)
with spinning off (spinning threads starve the I/O thread on a small machine), one inter-op
thread, all graph optimizations.

Example::

    ex = OrtExecutor(model, slots=64)
    out = ex.run({0: chunk_a, 5: chunk_b}, bucket=16)   # {slot: (t, output_dim)}
    ex.state.reset([5])
    v2 = ex.convert_weights(new_model.get_weights())     # once per version
    ex.set_weights(v2)                                   # a pointer swap
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import keras
import numpy as np
import onnx
import onnxruntime as ort

from streamrnn.executors.buckets import bucket_sizes
from streamrnn.executors.models import load_model
from streamrnn.executors.onnx_graph import OnnxGraph, build_onnx_graph
from streamrnn.executors.padding import pad_chunks
from streamrnn.executors.rows import StateSnapshot, slot_indices

__all__ = ["HostStateBank", "OrtExecutor", "OrtWeights", "session_options"]



class HostStateBank:
    """Row-wise reset/read/write/snapshot/restore of ``(slots, ...)`` host numpy arrays
    (the numpy twin of :class:`~streamrnn.engine.state.StateBank`).

    Args:
        arrays: one array per state variable, all with ``slots`` rows; the bank owns them.
        initial_rows: the initial state of a slot (default: each array's row 0).
    """

    def __init__(self, arrays: Sequence[np.ndarray],
                 initial_rows: StateSnapshot | None = None):
        if not arrays:
            raise ValueError("HostStateBank needs at least one state array")
        self.arrays = list(arrays)
        self.slots = int(self.arrays[0].shape[0])
        for a in self.arrays:
            if a.shape[0] != self.slots:
                raise ValueError(f"state array has {a.shape[0]} rows, not {self.slots}")
        if initial_rows is None:
            initial_rows = [a[0] for a in self.arrays]
        self.initial_rows: StateSnapshot = [np.array(r, a.dtype) for r, a in
                                            zip(initial_rows, self.arrays, strict=True)]

    @property
    def nbytes_per_slot(self) -> int:
        return sum(r.nbytes for r in self.initial_rows)

    def index(self, slots: Sequence[int]) -> np.ndarray:
        """``slots`` as an int64 index array (IndexError when out of range)."""
        return slot_indices(slots, self.slots, np.int64)

    def reset(self, slots: Sequence[int]) -> None:
        """Put ``slots`` back to the initial state; every other row is untouched."""
        idx = self.index(slots)
        for a, row in zip(self.arrays, self.initial_rows, strict=True):
            a[idx] = row

    def read(self, slots: Sequence[int]) -> list[np.ndarray]:
        """State rows of ``slots`` (copies): one array ``(len(slots), ...)`` per state."""
        idx = self.index(slots)
        return [a[idx] for a in self.arrays]

    def write(self, slots: Sequence[int], rows: Sequence[np.ndarray]) -> None:
        """Overwrite the state rows of ``slots`` (``rows[k]`` is ``(len(slots), ...)``)."""
        if len(rows) != len(self.arrays):
            raise ValueError(f"expected {len(self.arrays)} state arrays, got {len(rows)}")
        idx = self.index(slots)
        checked = []
        for a, r in zip(self.arrays, rows, strict=True):
            r = np.asarray(r, a.dtype)
            if r.shape != (len(idx), *a.shape[1:]):
                raise ValueError(f"state rows have shape {r.shape}, expected "
                                 f"{(len(idx), *a.shape[1:])}")
            checked.append(r)
        for a, r in zip(self.arrays, checked, strict=True):
            a[idx] = r

    def snapshot(self, slot: int) -> StateSnapshot:
        """A copy of one slot's state, one numpy row per state."""
        return [a[0] for a in self.read([slot])]

    def restore(self, slot: int, snapshot: StateSnapshot) -> None:
        """Make ``slot`` continue from ``snapshot`` (taken from any slot of the same model)."""
        self.write([slot], [np.asarray(r)[None] for r in snapshot])


def session_options(threads: int) -> ort.SessionOptions:
    """Intra-op ``threads`` without spinning, one inter-op thread, all optimizations."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


@dataclass(frozen=True)
class OrtWeights:
    """One weight version, ready to run: the session and the weight feeds it takes (empty
    when the weights are baked into the session). Switching versions swaps this object."""

    session: ort.InferenceSession
    feeds: Mapping[str, np.ndarray]


class OrtExecutor:
    """Runs a Keras model's ONNX graph on ONNX Runtime (CPU) over ``slots`` state rows.

    Args:
        model: a built ``keras.Model`` (or a ``.keras`` path).
        slots: state rows (concurrent streams).
        max_bucket: longest chunk a step takes (buckets are powers of two up to it).
        threads: intra-op threads (default ``os.cpu_count()``).
        bake_weights: give each weight version its own session with the weights as
            initializers (ONNX Runtime pre-packs them once: measured 1.2x at 64 rows x 16
            steps and about 2x at 1-16 rows, LSTM 256 on 2 cores; a version costs a
            session build, about 20 ms there). False: one session, weights fed per step.
        weights: the weights to start with, in ``model.get_weights()`` order (default: the
            model's own; an engine passes its serving clone's).

    Raises:
        UnsupportedModelError: the model cannot stream.
        OnnxUnsupported: it streams but has no ONNX graph here (use the Keras executor).
    """

    name = "onnxruntime"
    device = "CPU"

    def __init__(self, model: keras.Model | str | os.PathLike, slots: int,
                 max_bucket: int = 64, threads: int | None = None, bake_weights: bool = True,
                 weights: Sequence[np.ndarray] | None = None):
        model = load_model(model)
        self.graph: OnnxGraph = build_onnx_graph(model)
        self.slots = slots
        self.max_bucket = max_bucket
        self.buckets = bucket_sizes(max_bucket)
        self.threads = threads or os.cpu_count() or 1
        self.bake_weights = bake_weights
        self._shared = None if bake_weights else self._session(self.graph.proto)
        self.state = HostStateBank(
            [np.zeros((slots, s.units), np.float32) for s in self.graph.states])
        self._outputs = ["y"] + [s.final for s in self.graph.states]
        self.weights = self.convert_weights(model.get_weights() if weights is None
                                            else weights)
        self._dtype = np.int32 if self.graph.input_kind == "tokens" else np.float32
        self._feature_shape = () if self.graph.input_kind == "tokens" else (
            self.graph.input_dim,)
        self.steps_run = 0
        self.timesteps_run = 0
        self.trace_count = 0  # nothing is traced (Executor protocol counter)

    def _session(self, proto: onnx.ModelProto) -> ort.InferenceSession:
        return ort.InferenceSession(proto.SerializeToString(), session_options(self.threads),
                                    providers=["CPUExecutionProvider"])

    @property
    def input_kind(self) -> str:
        return self.graph.input_kind

    @property
    def input_dim(self) -> int:
        return self.graph.input_dim

    @property
    def output_dim(self) -> int:
        return self.graph.output_dim

    @property
    def kernel(self) -> str:
        """What runs, in words, e.g. ``"LSTM onnxruntime on CPU (2 threads)"``."""
        ops = "+".join(sorted(set(self.graph.recurrent_ops)))
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        return f"{ops} onnxruntime on CPU ({threads})"

    def convert_weights(self, weights: Sequence[np.ndarray]) -> OrtWeights:
        """Keras-order weights (``model.get_weights()``, same shapes) -> a version ready to
        run (with ``bake_weights``, this builds its session). Keep one per pinned version;
        ValueError if a count or shape differs."""
        feeds = self.graph.convert_weights(weights)
        if self._shared is not None:
            return OrtWeights(self._shared, feeds)
        return OrtWeights(self._session(self.graph.baked(feeds)), {})

    def set_weights(self, weights: Sequence[np.ndarray] | OrtWeights) -> None:
        """Run later steps with ``weights`` (Keras order, or from :meth:`convert_weights`:
        then a pointer swap). States are kept."""
        self.weights = (weights if isinstance(weights, OrtWeights)
                        else self.convert_weights(weights))

    def run(self, chunks: Mapping[int, np.ndarray], bucket: int,
            weights: OrtWeights | None = None) -> dict[int, np.ndarray]:
        """One step for the slots in ``chunks``.

        Args:
            chunks: slot -> validated chunk ``(t, D)`` float32 or ``(t,)`` int32,
                ``t <= bucket``.
            bucket: upper bound of the chunk lengths.
            weights: the version to run this step with (default: :attr:`weights`).

        Returns:
            slot -> outputs ``(t, output_dim)`` float32 (copies). A chunk of length 0 gets
            ``(0, output_dim)`` and its slot is not stepped.
        """
        batch = pad_chunks(chunks, bucket, self._feature_shape, self._dtype, time_major=True)
        if not batch.slots:
            return batch.outputs(None, self.output_dim)
        rows = self.state.index(batch.slots)
        y = self._step(batch.x, batch.lengths, rows, weights or self.weights)
        return batch.outputs(y, self.output_dim)

    def run_rows(self, slots: Sequence[int], x: np.ndarray,
                 weights: OrtWeights | None = None) -> np.ndarray:
        """One step of full rows (no padding): ``x`` ``(n, T, D)`` float32 or ``(n, T)``
        int32 ids, row ``i`` for ``slots[i]`` (distinct, ``n >= 1``, ``T >= 1``) ->
        outputs ``(n, T, output_dim)`` (a view). Generation's per-token call."""
        steps = x.shape[1]
        x = np.ascontiguousarray(x.swapaxes(0, 1), self._dtype)  # time-major; free at T=1
        lengths = np.full(len(slots), steps, np.int32)
        y = self._step(x, lengths, self.state.index(slots), weights or self.weights)
        return y.swapaxes(0, 1)

    def _step(self, x: np.ndarray, lengths: np.ndarray, rows: np.ndarray,
              weights: OrtWeights) -> np.ndarray:
        """Run the graph on the gathered ``rows``, scatter their new states back, count the
        step and its valid timesteps."""
        feed: dict[str, np.ndarray] = {"x": x, "sequence_lens": lengths, **weights.feeds}
        for spec, array in zip(self.graph.states, self.state.arrays, strict=True):
            feed[spec.initial] = array[rows][None]
        y, *finals = weights.session.run(self._outputs, feed)
        for array, final in zip(self.state.arrays, finals, strict=True):
            array[rows] = final[0]
        self.steps_run += 1
        self.timesteps_run += int(lengths.sum())
        return y

    def warmup(self) -> None:
        """Run the graph once on every slot at the longest bucket (states untouched)."""
        steps = self.buckets[-1]
        feed: dict[str, np.ndarray] = {
            "x": np.zeros((steps, self.slots, *self._feature_shape), self._dtype),
            "sequence_lens": np.full(self.slots, steps, np.int32), **self.weights.feeds}
        for spec in self.graph.states:
            feed[spec.initial] = np.zeros((1, self.slots, spec.units), np.float32)
        self.weights.session.run(self._outputs, feed)
