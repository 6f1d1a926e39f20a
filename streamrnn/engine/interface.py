"""The declared interfaces of the engine layer (typing protocols; no TensorFlow here).

Three kinds of object play "engine" for the layers above: :class:`~streamrnn.Engine`, a
:class:`~streamrnn.engine.weights.WeightsFollower` around one, and the online trainer
(:class:`~streamrnn.training.online.OnlineTrainer`). The worker, its checkpointer, the
router registration and the weights follower are typed against :class:`EngineLike`; the
optional capabilities (closed-loop generation, weight-version pins, state snapshots) are
protocols of their own, checked once when a worker is built (:func:`capabilities_of`), never
per request.

:class:`Executor` is the seam below the engine: the thing that runs one compiled step over
some slots' rows and keeps those rows. It has three implementations: ONNX Runtime
(:class:`~streamrnn.executors.ort.OrtExecutor`, the CPU default), torch
(:class:`~streamrnn.executors.torch_rnn.TorchExecutor`, optional; cuDNN on a GPU) and Keras
(:class:`~streamrnn.executors.keras_runner.ModelRunner`: fused XLA or the Keras layer, the
reference and fallback); :mod:`streamrnn.engine.backends` picks one. The first two also meet
:class:`TakesStepWeights`: a weights version is converted once and a step may name it.

:data:`StateSnapshot` (one slot's rows) is defined with the executors' shared row helpers
(:mod:`streamrnn.executors.rows`, below this layer, so executors can name it too) and
re-exported here.

Shapes: a chunk is ``(T, D)`` float32 features or ``(T,)`` int32 token ids; outputs are
``(T, output_dim)`` float32; a state snapshot is one numpy row per state variable (for an
LSTM of ``units``: ``[h (units,), c (units,)]``).

Example::

    from streamrnn.engine.interface import EngineLike, capabilities_of

    def serve(engine: EngineLike) -> None:
        caps = capabilities_of(engine)          # once, at construction
        if caps.generation:
            ...
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from streamrnn.executors.rows import StateSnapshot

__all__ = [
    "Capabilities",
    "EXECUTORS",
    "EngineLike",
    "Executor",
    "ModelDims",
    "PRECISIONS",
    "StateRows",
    "StateSnapshot",
    "SupportsGeneration",
    "SupportsPins",
    "SupportsSnapshots",
    "TakesStepWeights",
    "capabilities_of",
]

#: what ``Engine(executor=...)`` and ``streamrnn worker --executor`` take
EXECUTORS = ("auto", "onnxruntime", "torch", "keras")
#: what ``Engine(precision=...)`` and ``streamrnn worker --precision`` take
PRECISIONS = ("float32", "bf16")


@runtime_checkable
class ModelDims(Protocol):
    """What a model takes and gives: its input kind and sizes (a serving clone, an engine)."""

    @property
    def input_kind(self) -> str:
        """``"features"`` (chunks ``(T, D)`` float) or ``"tokens"`` (chunks ``(T,)`` int)."""

    @property
    def input_dim(self) -> int:
        """``D`` for feature chunks; the vocabulary size for token chunks."""

    @property
    def output_dim(self) -> int:
        """Width of each output step."""


@runtime_checkable
class EngineLike(ModelDims, Protocol):
    """What every engine-like object offers: slots, chunk validation, stepping, lifecycle
    (and the :class:`ModelDims` of its model).

    Not thread-safe: one thread (a worker's compute thread) drives it.
    """

    @property
    def slots(self) -> int:
        """Batch rows of the serving model (streams that can step together)."""

    @property
    def max_streams(self) -> int:
        """Live streams allowed in all (those beyond ``slots`` are swapped to host memory)."""

    @property
    def capacity_left(self) -> int:
        """How many more streams may open now (free slots plus swap room)."""

    @property
    def streams(self) -> list[str]:
        """Every live stream (resident or swapped out)."""

    @property
    def weights_version(self) -> int:
        """Version of the weights in use (0: the model file's own)."""

    def __contains__(self, stream: object) -> bool:
        """Whether ``stream`` is live (resident or swapped out)."""

    def is_resident(self, stream: str) -> bool:
        """Whether ``stream`` holds a slot now (as opposed to a host-memory copy)."""

    def validate(self, chunk: Any) -> np.ndarray:
        """Check and convert one chunk; raises InvalidInputError with a code."""

    def push(self, stream: str, chunk: Any) -> np.ndarray:
        """Step one stream: ``(T, D)`` or ``(T,)`` -> ``(T, output_dim)``."""

    def push_many(self, chunks: Mapping[str, Any], *, validated: bool = False
                  ) -> dict[str, np.ndarray]:
        """Step many streams in one batched step: stream -> outputs.

        ``validated=True``: every chunk is already what :meth:`validate` returned for it.
        """

    def reset(self, stream: str) -> None:
        """Back to the initial state; other streams untouched."""

    def close(self, stream: str) -> None:
        """Free the stream's slot (or its host-memory copy)."""

    def stats(self) -> dict[str, Any]:
        """Counters and facts (slots, streams, kernel, ...), msgpack-able."""


@runtime_checkable
class SupportsGeneration(Protocol):
    """Closed-loop decoding: each step's output picks (or is) the next input."""

    def generate(self, stream: str, prompt: Any, steps: int, **options: Any) -> np.ndarray:
        """Feed ``prompt`` then decode ``steps`` steps; tokens ``(steps,)`` or ``(steps, D)``."""

    def generate_many(self, prompts: Mapping[str, Any], steps: int, **options: Any
                      ) -> dict[str, np.ndarray]:
        """:meth:`generate` for many streams in one batched loop."""


@runtime_checkable
class SupportsPins(Protocol):
    """Per-stream weight-version pins (a :class:`~streamrnn.engine.weights.WeightsFollower`)."""

    def pin(self, stream: str, version: int) -> None:
        """Run ``stream`` with weights ``version`` until :meth:`unpin`."""

    def unpin(self, stream: str) -> None:
        """Back to the latest weights."""

    def pinned(self, stream: str) -> int | None:
        """The version ``stream`` is pinned to, or None."""

    def pins(self) -> dict[str, int]:
        """Every pinned stream's version (a copy)."""


@runtime_checkable
class SupportsSnapshots(Protocol):
    """Export and import every live stream's state rows (worker checkpoints)."""

    @property
    def state_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """(dtype, row shape) of each state variable, to check a checkpoint matches."""

    def initial_state(self) -> StateSnapshot:
        """A copy of the rows a new (or reset) stream starts from."""

    def export_states(self) -> dict[str, tuple[StateSnapshot, int]]:
        """stream -> (state rows, steps since reset)."""

    def import_states(self, states: Mapping[str, tuple[StateSnapshot, int]]) -> None:
        """Open (or overwrite) each stream with the given rows."""


@dataclass(frozen=True)
class Capabilities:
    """Which optional protocols an engine-like object meets (decided once)."""

    generation: bool
    pins: bool
    snapshots: bool


def capabilities_of(engine: object) -> Capabilities:
    """The optional capabilities of ``engine``; call once, when a worker is built."""
    return Capabilities(
        generation=isinstance(engine, SupportsGeneration),
        pins=isinstance(engine, SupportsPins),
        snapshots=isinstance(engine, SupportsSnapshots),
    )


@runtime_checkable
class StateRows(Protocol):
    """Row-wise access to every recurrent state of ``slots`` rows (where they live is the
    executor's business: Keras variables, host numpy arrays, device tensors)."""

    slots: int
    initial_rows: StateSnapshot

    def reset(self, slots: Sequence[int]) -> None:
        """Put ``slots`` back to the initial state; every other row is untouched."""

    def read(self, slots: Sequence[int]) -> list[np.ndarray]:
        """One array ``(len(slots), ...)`` per state variable."""

    def write(self, slots: Sequence[int], rows: Sequence[np.ndarray]) -> None:
        """Overwrite the rows of ``slots``."""

    def snapshot(self, slot: int) -> StateSnapshot:
        """A copy of one slot's state."""

    def restore(self, slot: int, snapshot: StateSnapshot) -> None:
        """Make ``slot`` continue from ``snapshot``."""


@runtime_checkable
class Executor(Protocol):
    """Runs one batched step over some slots and keeps their state rows.

    ``run({slot: chunk}, bucket)`` right-pads each chunk (``t <= bucket`` steps) to
    ``bucket``, steps only those slots (other rows keep their state), and returns
    ``{slot: (t, output_dim)}``. ``bucket`` is one of :attr:`buckets`.
    """

    #: which executor: "keras", "onnxruntime" or "torch"
    name: str
    #: padded step lengths it compiles for (powers of two up to the max bucket)
    buckets: list[int]
    #: the state rows of every slot, kept where this executor computes
    state: StateRows
    #: counters reported in STATS: ``run`` calls, chunk timesteps stepped, compiled traces
    #: (0 for an executor that does not trace)
    steps_run: int
    timesteps_run: int
    trace_count: int

    @property
    def kernel(self) -> str:
        """What runs, in words (``engine.kernel`` and STATS report it)."""

    @property
    def device(self) -> str:
        """``"CPU"`` or ``"GPU"``."""

    def run(self, chunks: Mapping[int, np.ndarray], bucket: int) -> dict[int, np.ndarray]:
        """One batched step over the slots in ``chunks``."""

    def warmup(self) -> None:
        """Compile every bucket before serving."""


@runtime_checkable
class TakesStepWeights(Protocol):
    """An executor whose weights travel with a step (ONNX Runtime, torch): each weights
    version is converted once, and a swap or a per-stream pin passes the converted object
    (a pointer change, no rebuild per step). The Keras executor is not one: its weights are
    the serving clone's variables."""

    def convert_weights(self, weights: Sequence[np.ndarray]) -> Any:
        """Keras-order weights (``model.get_weights()``) -> this executor's ready form."""

    def set_weights(self, weights: Any) -> None:
        """Run later steps with ``weights`` (a list, or from :meth:`convert_weights`)."""

    def run(self, chunks: Mapping[int, np.ndarray], bucket: int, weights: Any = None
            ) -> dict[int, np.ndarray]:
        """One step; ``weights`` (from :meth:`convert_weights`) for this step only."""

    def run_rows(self, slots: Sequence[int], x: np.ndarray, weights: Any = None
                 ) -> np.ndarray:
        """One step of full rows: ``x`` ``(n, T, D)`` floats or ``(n, T)`` ids, row ``i``
        for ``slots[i]`` (distinct) -> outputs ``(n, T, output_dim)``. No chunk dict, no
        padding: the per-token call of generation on the executor."""
