"""The Keras serving clone in step with an engine's executor: weights versions and rows.

An engine serves one weights version to every stream (the *latest*, set by
:meth:`WeightVersions.set_latest`) and may run a group of streams with another one for a
while (:meth:`WeightVersions.pinned`, what a
:class:`~streamrnn.engine.weights.WeightsFollower` does around a pinned group's step).

- Executors whose weights travel with a step (:class:`~streamrnn.engine.interface.
  TakesStepWeights`: ONNX Runtime, torch) convert each version once (an ONNX Runtime
  session with the weights baked in; torch tensors on the device) and keep it, keyed by
  version: a pinned step passes the kept object (:attr:`WeightVersions.step_weights`), a
  pointer change, never a rebuild per step. The kept versions are bounded: :meth:`retain`
  drops the ones nobody pins any more (the follower calls it), and at most ``limit`` are
  kept in any case (least recently used dropped first).
- The Keras executor's weights are the serving clone's variables: a pin assigns them for
  the group's step and assigns the latest back afterwards.

The Keras serving clone always holds the latest weights outside :meth:`pinned`; inside it,
:meth:`sync_clone` (called before a generation that runs on the clone) assigns the pinned
weights on demand, and the latest come back when the pin ends.

Generation runs on the clone for the Keras executor, and for a feedback callable on any
executor (:mod:`streamrnn.engine.generate`; the built-in rules run on the other executors'
own token loop): :meth:`CloneRows.borrowed` copies the generating slots' rows from the
executor's state into the clone's state variables and, afterwards, their new rows back (no
other row moves).
:class:`WeightsMixin` gives :class:`~streamrnn.Engine` its ``set_weights``,
``pinned_weights``, ``retain_weights`` and ``generation_rows`` over the two.

Example::

    versions = WeightVersions(serving, executor)
    versions.set_latest(new_weights, version=2)
    with versions.pinned(1, old_weights):                  # converted once, then kept
        executor.run(chunks, bucket, weights=versions.step_weights)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import keras
import numpy as np

from streamrnn.engine.interface import Executor, TakesStepWeights
from streamrnn.errors import InvalidInputError
from streamrnn.executors.keras_state import StateBank
from streamrnn.executors.models import ServingModel
from streamrnn.protocol import ErrorCode

__all__ = ["CloneRows", "MAX_KEPT_VERSIONS", "WeightVersions", "WeightsMixin", "checked_weights"]

#: converted weights versions kept at most (besides the latest)
MAX_KEPT_VERSIONS = 16


def checked_weights(weights: Sequence[Any], shapes: Sequence[tuple[int, ...]]
                    ) -> list[np.ndarray]:
    """``weights`` as arrays, if every shape matches ``shapes`` (else BAD_SHAPE)."""
    arrays = [np.asarray(w) for w in weights]
    if len(arrays) != len(shapes) or any(
            w.shape != tuple(s) for w, s in zip(arrays, shapes, strict=False)):
        raise InvalidInputError(
            f"weights {[w.shape for w in arrays]} do not match the served model's "
            f"{[tuple(s) for s in shapes]}", ErrorCode.BAD_SHAPE,
        )
    return arrays


class WeightVersions:
    """The weights versions an engine runs (see the module docstring).

    Args:
        serving: the Keras serving clone (kept holding the latest weights).
        executor: the engine's executor.
        version: the version the clone holds now.
        limit: converted versions kept at most, besides the latest.
    """

    def __init__(self, serving: ServingModel, executor: Executor, version: int = 0,
                 limit: int = MAX_KEPT_VERSIONS):
        self.serving = serving
        self.executor = executor
        self.per_step = isinstance(executor, TakesStepWeights)
        self.limit = limit
        self.latest = version
        self.shapes = [tuple(w.shape) for w in serving.get_weights()]
        #: converted weights for this step (None: the executor's own, the latest)
        self.step_weights: Any = None
        #: weights conversions so far (ONNX Runtime session builds, torch uploads)
        self.conversions = 0
        self._kept: OrderedDict[int, Any] = OrderedDict()
        self._latest_arrays: list[np.ndarray] | None = None  # read from the clone on demand
        self._active: tuple[int, Sequence[np.ndarray]] | None = None  # inside pinned()
        self._clone_version = version

    @property
    def kept(self) -> list[int]:
        """The versions whose converted weights are kept, oldest use first."""
        return list(self._kept)

    def _convert(self, arrays: Sequence[np.ndarray]) -> Any:
        self.conversions += 1
        return self.executor.convert_weights(arrays)  # type: ignore[attr-defined]

    def _keep(self, version: int, converted: Any) -> None:
        self._kept[version] = converted
        self._kept.move_to_end(version)
        while len(self._kept) > self.limit + 1:
            oldest = next(v for v in self._kept if v != self.latest)
            del self._kept[oldest]

    def set_latest(self, weights: keras.Model | Sequence[Any], version: int) -> None:
        """Serve ``weights`` (a model of the same architecture, or its ``get_weights()``)
        as ``version`` from the next step on; shapes are checked before anything changes
        (InvalidInputError, BAD_SHAPE)."""
        if isinstance(weights, keras.Model):
            self.serving.set_weights_from(weights)  # checks the architecture first
            arrays = [np.asarray(w) for w in self.serving.get_weights()]
        else:
            arrays = checked_weights(weights, self.shapes)
        converted = self._convert(arrays) if self.per_step else None
        if not isinstance(weights, keras.Model):
            self.serving.set_weights_from(arrays)
        if self.per_step:
            self.executor.set_weights(converted)  # type: ignore[attr-defined]
        self.latest = self._clone_version = version
        self._latest_arrays = arrays
        if self.per_step:
            self._keep(version, converted)

    @contextmanager
    def pinned(self, version: int, weights: Sequence[Any]) -> Iterator[None]:
        """Run the steps (and generation) inside with ``weights`` as ``version``; the
        latest weights are back afterwards. Shapes are checked first (BAD_SHAPE)."""
        if version == self.latest or self._active is not None:
            yield  # the latest already; nested pins keep the outer one
            return
        if self._latest_arrays is None:  # the clone holds the latest outside pins
            self._latest_arrays = [np.asarray(w) for w in self.serving.get_weights()]
        arrays = checked_weights(weights, self.shapes)
        self._active = (version, arrays)
        try:
            if self.per_step:
                converted = self._kept.get(version)
                if converted is None:
                    converted = self._convert(arrays)
                self._keep(version, converted)
                self.step_weights = converted
            else:
                self.sync_clone()  # the Keras executor's weights are the clone's
            yield
        finally:
            self.step_weights = None
            self._active = None
            if self._clone_version != self.latest:
                self.serving.set_weights_from(self._latest_arrays)
                self._clone_version = self.latest

    def sync_clone(self) -> None:
        """Make the Keras clone hold the weights steps run with now (before generation)."""
        version, arrays = self._active or (self.latest, self._latest_arrays)
        if version != self._clone_version and arrays is not None:
            self.serving.set_weights_from(arrays)
            self._clone_version = version

    def retain(self, versions: Iterable[int]) -> None:
        """Drop the converted weights of every version but ``versions`` and the latest."""
        keep = {*versions, self.latest}
        for version in [v for v in self._kept if v not in keep]:
            del self._kept[version]


class CloneRows:
    """The Keras serving clone's state rows, lent the executor's rows for a while.

    Args:
        serving: the Keras serving clone.
        executor: the engine's executor (for the Keras executor the rows are the clone's
            own, and nothing is copied).
    """

    def __init__(self, serving: ServingModel, executor: Executor):
        self.serving = serving
        self.executor = executor
        self._bank: StateBank | None = None  # built on first use

    @contextmanager
    def borrowed(self, slots: list[int]) -> Iterator[None]:
        """Inside, the clone's rows of ``slots`` are the executor's; on a normal exit their
        new values are written back to the executor's rows."""
        if self.executor.name == "keras":
            yield
            return
        if self._bank is None:
            self._bank = StateBank(self.serving.state_variables())
        self._bank.write(slots, self.executor.state.read(slots))
        yield
        self.executor.state.write(slots, self._bank.read(slots))


class WeightsMixin:
    """``set_weights``, ``pinned_weights``, ``retain_weights`` and ``generation_rows`` for an
    engine (:class:`~streamrnn.Engine` mixes it in): they act through the engine's
    :attr:`versions` (a :class:`WeightVersions`) and :attr:`clone_rows` (a
    :class:`CloneRows`)."""

    versions: WeightVersions
    clone_rows: CloneRows

    weights_version: int = 0
    """Version of the weights the engine serves (0: as loaded; set by :meth:`set_weights`)."""

    def set_weights(self, weights: keras.Model | list[np.ndarray], version: int | None = None
                    ) -> None:
        """Serve new weights from the next step on; no stream's state is touched.

        ``weights`` is a model of the same architecture or its ``get_weights()`` list;
        every shape is checked before anything is assigned (InvalidInputError, BAD_SHAPE).
        ``version`` defaults to the current one + 1. The executor gets them (ONNX Runtime:
        a session with the weights baked in, kept for later pins of this version) and so
        does the Keras serving clone (the Keras executor's generation loop runs on it).
        """
        version = self.weights_version + 1 if version is None else int(version)
        self.versions.set_latest(weights, version)
        self.weights_version = version

    @contextmanager
    def pinned_weights(self, version: int, weights: Sequence[np.ndarray]) -> Iterator[None]:
        """Run the steps (and generation) inside with ``weights`` as ``version``; the
        latest weights are back afterwards. Each version is converted for the executor
        once and kept (a pointer change per step; see :mod:`streamrnn.engine.versions`),
        until :meth:`retain_weights` drops it. Shapes are checked first (BAD_SHAPE)."""
        with self.versions.pinned(int(version), weights):
            yield

    def retain_weights(self, versions: Iterable[int]) -> None:
        """Keep the converted weights of ``versions`` (and the latest) only."""
        self.versions.retain(versions)

    @contextmanager
    def generation_rows(self, slots: list[int]) -> Iterator[None]:
        """Inside, the Keras serving clone holds the executor's weights and, for ``slots``,
        its state rows; their new rows go back to the executor afterwards (every other row
        is left alone). The compiled generation loop runs there (see
        :mod:`streamrnn.engine.generate`)."""
        self.versions.sync_clone()
        with self.clone_rows.borrowed(slots):
            yield
