"""Versioned weights on disk: the trainer publishes, live workers follow (and streams pin).

A publish directory holds ``weights-v{N}.npz`` files and a ``LATEST`` file naming the
newest one (:mod:`streamrnn.engine.weight_files`, whose functions this module re-exports).
A version that cannot be served (unreadable, a pickled array, weights of another shape, not
signed with the follower's ``key``) is logged once, with the reason, and skipped: the
follower keeps serving the weights it has.

:class:`WeightsFollower` wraps an :class:`~streamrnn.Engine`: between steps (before each
push/generate) it checks ``LATEST`` at most every ``poll_s`` seconds and swaps in a newer
version with :meth:`Engine.set_weights`, which touches no stream's state. A stream may pin
a version: its steps run with that version's weights (the pinned group's steps run inside
:meth:`Engine.pinned_weights`: each version is converted for the executor once and kept
while some stream pins it, so a pinned step is a pointer change, not a rebuild). The
follower is itself an :class:`~streamrnn.engine.interface.EngineLike` with every optional
capability (generation, pins, snapshots), so a worker serves it exactly like an Engine.

Example::

    publish_weights("pub", model.get_weights(), version=3)   # trainer side
    engine = WeightsFollower(Engine.from_keras("m.keras"), "pub")   # worker side
    engine.pin("replay-7", 2)                                  # this stream stays on v2
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from streamrnn.engine.interface import StateSnapshot
from streamrnn.engine.weight_files import (
    LATEST,
    latest_version,
    list_versions,
    load_weights,
    publish_weights,
    weights_filename,
)
from streamrnn.errors import InvalidInputError

if TYPE_CHECKING:
    from streamrnn.engine.engine import Engine
    from streamrnn.engine.interface import StateRows
    from streamrnn.engine.slots import SlotTable
    from streamrnn.executors.models import ServingModel

__all__ = [
    "LATEST",
    "WeightsFollower",
    "latest_version",
    "list_versions",
    "load_weights",
    "publish_weights",
    "weights_filename",
]

log = logging.getLogger("streamrnn.weights")
_REMEMBERED_BAD = 64  # bad versions remembered (so each is logged once)

class WeightsFollower:
    """An Engine that follows a publish directory between steps and honours version pins.

    It implements :class:`~streamrnn.engine.interface.EngineLike`,
    :class:`~streamrnn.engine.interface.SupportsGeneration`,
    :class:`~streamrnn.engine.interface.SupportsPins` and
    :class:`~streamrnn.engine.interface.SupportsSnapshots`, each member delegating to the
    wrapped engine (the ones that run steps poll first and honour pins).

    Args:
        engine: the :class:`~streamrnn.Engine` to update.
        directory: the trainer's ``--publish-dir``.
        poll_s: check ``LATEST`` at most this often (0: before every step).
        key: the checkpoint key: only weights files signed with it are loaded.
    """

    def __init__(self, engine: Engine, directory: str | os.PathLike, poll_s: float = 0.5,
                 key: bytes | None = None):
        self.engine = engine
        self.directory = Path(directory)
        self.poll_s = poll_s
        self.key = key
        self.swaps = 0
        #: version -> (mtime_ns, size) of a file that could not be served (logged once)
        self._bad: dict[int | str, tuple[int, int] | str] = {}
        self._next_poll = 0.0
        self._pins: dict[str, int] = {}
        self._cache: dict[int, list[np.ndarray]] = {}
        self._latest_weights: list[np.ndarray] = [
            np.array(w) for w in engine.serving.get_weights()
        ]
        if engine.weights_version == 0:
            # the model file's own weights are never published: keep them pinnable after
            # the first swap (a checkpoint restored after a restart may pin version 0)
            self._cache[0] = self._latest_weights
        self.poll(force=True)

    # ---- EngineLike: facts, delegated ---------------------------------------------------

    @property
    def slots(self) -> int:
        return self.engine.slots

    @property
    def max_streams(self) -> int:
        return self.engine.max_streams

    @property
    def capacity_left(self) -> int:
        return self.engine.capacity_left

    @property
    def streams(self) -> list[str]:
        return self.engine.streams

    @property
    def input_kind(self) -> str:
        return self.engine.input_kind

    @property
    def input_dim(self) -> int:
        return self.engine.input_dim

    @property
    def output_dim(self) -> int:
        return self.engine.output_dim

    @property
    def weights_version(self) -> int:
        return self.engine.weights_version

    def __contains__(self, stream: object) -> bool:
        return stream in self.engine

    def is_resident(self, stream: str) -> bool:
        return self.engine.is_resident(stream)

    def validate(self, chunk: Any) -> np.ndarray:
        return self.engine.validate(chunk)

    def reset(self, stream: str) -> None:
        self.engine.reset(stream)

    # ---- the wrapped Engine's extras (kernel, serving clone, slot table, state rows) ---

    @property
    def kernel(self) -> str:
        return self.engine.kernel

    @property
    def serving(self) -> ServingModel:
        return self.engine.serving

    @property
    def table(self) -> SlotTable:
        return self.engine.table

    @property
    def bank(self) -> StateRows:
        return self.engine.bank

    @property
    def free_slots(self) -> int:
        return self.engine.free_slots

    def snapshot(self, stream: str) -> StateSnapshot:
        return self.engine.snapshot(stream)

    def restore(self, stream: str, snapshot: StateSnapshot) -> None:
        self.engine.restore(stream, snapshot)

    # ---- SupportsSnapshots, delegated ---------------------------------------------------

    @property
    def state_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        return self.engine.state_layout

    def initial_state(self) -> StateSnapshot:
        return self.engine.initial_state()

    def export_states(self) -> dict[str, tuple[StateSnapshot, int]]:
        return self.engine.export_states()

    def import_states(self, states: Mapping[str, tuple[StateSnapshot, int]]) -> None:
        self.engine.import_states(states)

    # ---- following ---------------------------------------------------------------------

    def poll(self, force: bool = False) -> bool:
        """Load a newer published version if there is one; True if the engine swapped.

        A version that cannot be served is logged once (with the reason) and skipped until
        its file changes; the engine keeps the weights it has."""
        now = time.monotonic()
        if not force and now < self._next_poll:
            return False
        self._next_poll = now + self.poll_s
        try:
            version = latest_version(self.directory)
        except (InvalidInputError, OSError) as exc:
            self._refuse(LATEST, str(exc), str(exc))
            return False
        if version is None or version <= self.engine.weights_version:
            return False
        try:
            stat = (self.directory / weights_filename(version)).stat()
        except FileNotFoundError:
            return False  # pruned, or not visible yet on an odd filesystem: try again later
        mark = (stat.st_mtime_ns, stat.st_size)
        if self._bad.get(version) == mark:
            return False
        try:
            weights, _ = load_weights(self.directory, version, key=self.key)
            self.engine.set_weights(weights, version)
        except FileNotFoundError:
            return False
        except (InvalidInputError, OSError, ValueError, TypeError) as exc:
            self._refuse(version, mark, f"weights version {version} in {self.directory} "
                                        f"cannot be served: {exc}")
            return False
        self._latest_weights = weights
        self.swaps += 1
        self.engine.retain_weights(self._pins.values())
        return True

    def _refuse(self, what: int | str, mark: tuple[int, int] | str, reason: str) -> None:
        """Log ``reason`` once per ``what`` (a version, or LATEST) and ``mark`` (its file)."""
        if self._bad.get(what) == mark:
            return
        self._bad[what] = mark
        while len(self._bad) > _REMEMBERED_BAD:
            del self._bad[next(iter(self._bad))]
        log.error("%s; still serving weights version %d", reason, self.engine.weights_version)

    # ---- pins --------------------------------------------------------------------------

    def pin(self, stream: str, version: int) -> None:
        """Run ``stream``'s steps with weights ``version`` until :meth:`unpin`."""
        version = int(version)
        if version == self.engine.weights_version:
            # keep the weights in use now: after the next swap they may exist nowhere else
            # (version 0, the model file's own weights, is never published)
            self._cache.setdefault(version, self._latest_weights)
        elif version not in self._cache:
            self._cache[version] = load_weights(self.directory, version, key=self.key)[0]
        self._pins[stream] = version

    def unpin(self, stream: str) -> None:
        if self._pins.pop(stream, None) is not None:
            self.engine.retain_weights(self._pins.values())

    def pinned(self, stream: str) -> int | None:
        return self._pins.get(stream)

    def pins(self) -> dict[str, int]:
        """Every pinned stream's version (a copy; the worker's checkpoints save it)."""
        return dict(self._pins)

    def _weights_of(self, version: int) -> list[np.ndarray]:
        if version == self.engine.weights_version:
            return self._latest_weights
        if version not in self._cache:
            self._cache[version] = load_weights(self.directory, version, key=self.key)[0]
        return self._cache[version]

    # ---- the Engine verbs that run steps -----------------------------------------------

    def push(self, stream: str, chunk: Any) -> np.ndarray:
        return self.push_many({stream: chunk})[stream]

    def push_many(
        self, chunks: Mapping[str, Any], *, validated: bool = False
    ) -> dict[str, np.ndarray]:
        """Poll, then run each version group of streams in its own batched step(s)."""
        self.poll()
        return self._grouped(self.engine.push_many, chunks, validated=validated)

    def generate(self, stream: str, prompt: Any, steps: int = 100, **kwargs: Any
                 ) -> np.ndarray:
        self.poll()
        version = self._pins.get(stream)
        if version is None or version == self.engine.weights_version:
            return self.engine.generate(stream, prompt, steps=steps, **kwargs)
        return self._with_version(version, self.engine.generate, stream, prompt, steps=steps,
                                  **kwargs)

    def generate_many(self, prompts: Mapping[str, Any], steps: int = 100, **kwargs: Any
                      ) -> dict[str, np.ndarray]:
        """Poll, then generate each version group of streams in its own batched call."""
        self.poll()
        return self._grouped(self.engine.generate_many, prompts, steps=steps, **kwargs)

    def _grouped(self, fn: Any, items: Mapping[str, Any], **kwargs: Any
                 ) -> dict[str, np.ndarray]:
        """``fn(group, **kwargs)`` per version group of ``items`` (stream -> chunk/prompt):
        the unpinned streams (and those pinned to the latest version) first, then each
        pinned version with its weights swapped in."""
        current = self.engine.weights_version
        groups: dict[int | None, dict[str, Any]] = {}
        for stream, item in items.items():
            version = self._pins.get(stream)
            groups.setdefault(None if version in (None, current) else version, {})[stream] = item
        out = fn(groups.pop(None, {}), **kwargs)
        for version, group in groups.items():
            out.update(self._with_version(version, fn, group, **kwargs))
        return out

    def _with_version(self, version: int, fn: Any, *args: Any, **kwargs: Any) -> Any:
        with self.engine.pinned_weights(version, self._weights_of(version)):
            return fn(*args, **kwargs)

    def close(self, stream: str) -> None:
        self.unpin(stream)
        self.engine.close(stream)

    def stats(self) -> dict[str, Any]:
        return {**self.engine.stats(), "weights_version": self.engine.weights_version,
                "weight_swaps": self.swaps, "pinned_streams": len(self._pins)}
