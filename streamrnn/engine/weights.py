"""Versioned weights on disk: the trainer publishes, live workers follow (and streams pin).

A publish directory holds ``weights-v{N}.npz`` files (the model's ``get_weights()`` list as
``w0, w1, ...`` plus a JSON ``meta`` entry) and a ``LATEST`` file naming the newest one.
Both are written atomically (temp file, fsync, rename), weights file first, so a reader
that follows ``LATEST`` always finds a whole file.

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

import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from streamrnn.atomic import atomic_write
from streamrnn.engine.interface import StateSnapshot
from streamrnn.errors import InvalidInputError
from streamrnn.protocol import ErrorCode

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

LATEST = "LATEST"
_NAME = re.compile(r"^weights-v(\d+)\.npz$")


def weights_filename(version: int) -> str:
    """The file name of weights ``version`` in a publish directory."""
    return f"weights-v{int(version)}.npz"


def publish_weights(
    directory: str | os.PathLike, weights: list[np.ndarray], version: int,
    meta: Mapping[str, Any] | None = None, keep: int = 5,
) -> Path:
    """Write ``weights`` as version ``version`` and point ``LATEST`` at it.

    Older versions beyond the newest ``keep`` are deleted (``keep=0`` keeps all).
    Returns the weights file's path.
    """
    if version < 1:
        raise InvalidInputError(f"weights versions start at 1, got {version}", ErrorCode.BAD_VALUE)
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    path = root / weights_filename(version)
    info = {"version": int(version), "time": time.time(), **(meta or {})}
    arrays = {f"w{i}": np.asarray(w) for i, w in enumerate(weights)}
    arrays["meta"] = np.frombuffer(json.dumps(info).encode(), np.uint8)
    atomic_write(path, lambda f: np.savez(f, **arrays))
    atomic_write(root / LATEST, lambda f: f.write(f"{path.name}\n".encode()))
    if keep > 0:
        for old in sorted(list_versions(root))[:-keep]:
            if old != version:
                (root / weights_filename(old)).unlink(missing_ok=True)
    return path


def list_versions(directory: str | os.PathLike) -> list[int]:
    """Versions present in ``directory``, ascending."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = (_NAME.match(p.name) for p in root.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def latest_version(directory: str | os.PathLike) -> int | None:
    """The version ``LATEST`` names, or None when nothing is published yet."""
    try:
        name = (Path(directory) / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    match = _NAME.match(name)
    if not match:
        raise InvalidInputError(f"{LATEST} in {directory} names {name!r}, not a weights file",
                                ErrorCode.BAD_VALUE)
    return int(match.group(1))


def load_weights(directory: str | os.PathLike, version: int | None = None
                 ) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The weights list and meta of ``version`` (default: the latest)."""
    if version is None:
        version = latest_version(directory)
        if version is None:
            raise InvalidInputError(f"no weights published in {directory}", ErrorCode.BAD_VALUE)
    path = Path(directory) / weights_filename(version)
    if not path.exists():
        raise InvalidInputError(f"weights version {version} is not in {directory} (have "
                                f"{list_versions(directory)})", ErrorCode.BAD_VALUE)
    with np.load(path, allow_pickle=False) as data:
        n = sum(1 for k in data.files if k.startswith("w"))
        weights = [data[f"w{i}"] for i in range(n)]
        meta = json.loads(bytes(data["meta"]).decode())
    return weights, meta


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
    """

    def __init__(self, engine: Engine, directory: str | os.PathLike, poll_s: float = 0.5):
        self.engine = engine
        self.directory = Path(directory)
        self.poll_s = poll_s
        self.swaps = 0
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
        """Load a newer published version if there is one; True if the engine swapped."""
        now = time.monotonic()
        if not force and now < self._next_poll:
            return False
        self._next_poll = now + self.poll_s
        try:
            version = latest_version(self.directory)
        except InvalidInputError:
            return False
        if version is None or version <= self.engine.weights_version:
            return False
        try:
            weights, _ = load_weights(self.directory, version)
        except (InvalidInputError, OSError, ValueError):
            return False  # pruned or half-visible on an odd filesystem: try again later
        self.engine.set_weights(weights, version)
        self._latest_weights = weights
        self.swaps += 1
        self.engine.retain_weights(self._pins.values())
        return True

    # ---- pins --------------------------------------------------------------------------

    def pin(self, stream: str, version: int) -> None:
        """Run ``stream``'s steps with weights ``version`` until :meth:`unpin`."""
        version = int(version)
        if version == self.engine.weights_version:
            # keep the weights in use now: after the next swap they may exist nowhere else
            # (version 0, the model file's own weights, is never published)
            self._cache.setdefault(version, self._latest_weights)
        elif version not in self._cache:
            self._cache[version] = load_weights(self.directory, version)[0]
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
            self._cache[version] = load_weights(self.directory, version)[0]
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
