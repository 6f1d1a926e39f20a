"""The trainer's checkpoint: one ``.npz`` file a FreeRunningTrainer resumes from exactly.

This is the checkpoint of a :class:`~streamrnn.training.trainer.FreeRunningTrainer` (its
``save_checkpoint`` / ``load_checkpoint`` / ``state_dict``), and only that. It is not a
serving worker's checkpoint (:mod:`streamrnn.serving.checkpoint`: stream states, sequence
numbers and reply caches), nor a published weights version (:mod:`streamrnn.engine.weights`:
weights only, which serving workers follow).

File format (:data:`CHECKPOINT_FORMAT` 1), named numpy arrays (``np.savez``):

- ``weight/{i}``: the model's weights, in ``model.get_weights()`` order.
- ``optimizer/{i}``: the optimizer's variables, in order (its step counter among them).
- ``state/{i}``: each recurrent state variable, ``(slots, ...)`` (e.g. ``(slots, units)``).
- ``pending/{i}``: the kept last observation of the ``i``-th stream of ``meta["streams"]``
  (next-step training without targets), ``(D,)`` or ``()``; absent if it has none.
- ``meta``: uint8 bytes of a JSON object: ``format``, ``step`` (optimizer steps),
  ``version`` (published weights version), ``timesteps``, ``last_loss``, ``config`` (the
  :class:`~streamrnn.training.config.TrainConfig`, for the record), ``streams``
  (``[[stream, slot, steps], ...]`` in table order) and ``optimizer`` (its class name).

Files are written atomically (temp file, fsync, rename): a restart after kill -9 finds the
previous checkpoint or the new one, whole.

Example::

    trainer.save_checkpoint("ck/trainer.npz")        # writes this file
    ck = TrainerCheckpoint.load("ck/trainer.npz")    # None if there is no such file
    ck.step, ck.streams                              # 1200, [("s0", 0, 28800), ...]
    table = ck.table(slots=16)                       # each stream back in its own slot
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamrnn.atomic import atomic_write
from streamrnn.engine.slots import SlotTable
from streamrnn.errors import InvalidInputError
from streamrnn.protocol import ErrorCode

__all__ = ["CHECKPOINT_FORMAT", "TrainerCheckpoint", "atomic_savez", "table_from"]

CHECKPOINT_FORMAT = 1


@dataclass
class TrainerCheckpoint:
    """Everything a trainer needs to resume exactly, as numpy arrays and counters.

    Attributes:
        weights: the model's weights (``get_weights()`` order).
        optimizer: the optimizer's variables.
        states: one ``(slots, ...)`` array per recurrent state variable.
        streams: ``(stream, slot, steps)`` per live stream, in table order.
        pending: stream -> its kept last observation (next-step training).
        step, version, timesteps, last_loss: the trainer's counters.
        config: the trainer's settings (written for the record; not read back).
        optimizer_name: the optimizer's class name (written for the record).
    """

    weights: list[np.ndarray]
    optimizer: list[np.ndarray]
    states: list[np.ndarray]
    streams: list[tuple[str, int, int]]
    pending: dict[str, np.ndarray]
    step: int
    version: int
    timesteps: int
    last_loss: float
    config: dict[str, Any] = field(default_factory=dict)
    optimizer_name: str = ""

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The named arrays of the file format (see the module docstring)."""
        arrays: dict[str, np.ndarray] = {}
        for prefix, values in (("weight", self.weights), ("optimizer", self.optimizer),
                               ("state", self.states)):
            for i, value in enumerate(values):
                arrays[f"{prefix}/{i}"] = value
        for i, (stream, _, _) in enumerate(self.streams):
            if stream in self.pending:
                arrays[f"pending/{i}"] = self.pending[stream]
        meta = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "version": self.version,
            "timesteps": self.timesteps,
            "last_loss": self.last_loss,
            "config": self.config,
            "streams": [[s, slot, steps] for s, slot, steps in self.streams],
            "optimizer": self.optimizer_name,
        }
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> TrainerCheckpoint:
        """Parse :meth:`to_arrays` output; InvalidInputError (NOT_SUPPORTED) for another
        format."""
        meta = json.loads(bytes(np.asarray(arrays["meta"], np.uint8)).decode())
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise InvalidInputError(f"unknown checkpoint format {meta.get('format')}",
                                    ErrorCode.NOT_SUPPORTED)
        streams = [(s, slot, steps) for s, slot, steps in meta["streams"]]
        return cls(
            weights=_numbered(arrays, "weight"),
            optimizer=_numbered(arrays, "optimizer"),
            states=_numbered(arrays, "state"),
            streams=streams,
            pending={s: np.asarray(arrays[f"pending/{i}"])
                     for i, (s, _, _) in enumerate(streams) if f"pending/{i}" in arrays},
            step=int(meta["step"]),
            version=int(meta["version"]),
            timesteps=int(meta["timesteps"]),
            last_loss=float(meta["last_loss"]),
            config=meta.get("config", {}),
            optimizer_name=meta.get("optimizer", ""),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the file atomically (temp file, fsync, rename)."""
        atomic_savez(path, self.to_arrays())

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainerCheckpoint | None:
        """Read ``path``; None if it does not exist."""
        if not os.path.exists(path):
            return None
        with np.load(path, allow_pickle=False) as data:
            return cls.from_arrays({k: data[k] for k in data.files})

    def table(self, slots: int) -> SlotTable:
        """A SlotTable of ``slots`` rows with every stream in its saved slot."""
        return table_from(slots, self.streams)


def _numbered(arrays: Mapping[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    """``arrays[prefix/0]``, ``arrays[prefix/1]``, ... (as many as there are)."""
    n = sum(1 for k in arrays if k.startswith(prefix + "/"))
    return [arrays[f"{prefix}/{i}"] for i in range(n)]


def table_from(capacity: int, streams: list) -> SlotTable:
    """A SlotTable in which each ``[stream, slot, steps]`` holds exactly that slot."""
    by_slot = {int(slot): (str(s), int(steps)) for s, slot, steps in streams}
    if len(by_slot) != len(streams) or any(not 0 <= k < capacity for k in by_slot):
        raise InvalidInputError("checkpoint stream table does not fit the slots",
                                ErrorCode.BAD_VALUE)
    table = SlotTable(capacity)
    filler = [f"\0free-{k}" for k in range(capacity)]
    for k in range(capacity):  # the free list hands out the lowest slot first
        table.acquire(by_slot[k][0] if k in by_slot else filler[k])
    for k in range(capacity):
        if k in by_slot:
            table.info(by_slot[k][0]).steps = by_slot[k][1]
        else:
            table.release(filler[k])
    return table


def atomic_savez(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez`` to a temp file in the same directory, fsync, then rename over ``path``.

    A reader (or a restart after kill -9) sees either the old file or the new one, whole.
    """
    atomic_write(path, lambda f: np.savez(f, **arrays))
