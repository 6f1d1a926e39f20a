"""The trainer's checkpoint: one ``.npz`` file a FreeRunningTrainer resumes from exactly.

This is the checkpoint of a :class:`~streamrnn.training.trainer.FreeRunningTrainer` (its
``save_checkpoint`` / ``load_checkpoint`` / ``state_dict``), and only that. It is not a
serving worker's checkpoint (:mod:`streamrnn.serving.checkpoint`: stream states, sequence
numbers and reply caches), nor a published weights version (:mod:`streamrnn.engine.weights`:
weights only, which serving workers follow).

File format (:data:`CHECKPOINT_FORMAT` 2), named numpy arrays (``np.savez``):

- ``weight/{i}``: the model's weights, in ``model.get_weights()`` order.
- ``optimizer/{i}``: the optimizer's variables, in order (its step counter among them).
- ``state/{i}``: each recurrent state variable, ``(slots, ...)`` (e.g. ``(slots, units)``).
- ``pending/{i}``: the kept last observation of the ``i``-th stream of ``meta["streams"]``
  (next-step training without targets), ``(D,)`` or ``()``; absent if it has none.
- ``meta``: uint8 bytes of a JSON object: ``format``, ``step`` (optimizer steps),
  ``version`` (published weights version), ``timesteps``, ``last_loss``, ``config`` (the
  :class:`~streamrnn.training.config.TrainConfig`, for the record), ``streams``
  (``[[stream, slot, steps], ...]`` in table order) and ``optimizer`` (its class name);
  ``extra`` when its user saved more (the online trainer: its front's ``sequences``
  ``{stream: next_seq}``, and ``log`` ``{"last_id", "applied", "streams"}``, the durable
  training log position, :mod:`streamrnn.training.consumer`).
- ``checksum``: 32 bytes, the SHA-256 of every other array (name, dtype, shape, bytes, in
  name order). :meth:`TrainerCheckpoint.load` refuses a truncated, edited or unreadable file
  with :class:`~streamrnn.errors.CheckpointError` (a format-1 file, written before the
  checksum, still loads). Every meta field is checked (types, ranges, stream id sizes).

Files are written atomically (temp file, fsync, rename): a restart after kill -9 finds the
previous checkpoint or the new one, whole.

Example::

    trainer.save_checkpoint("ck/trainer.npz")        # writes this file
    ck = TrainerCheckpoint.load("ck/trainer.npz")    # None if there is no such file
    ck.step, ck.streams                              # 1200, [("s0", 0, 28800), ...]
    table = ck.table(slots=16)                       # each stream back in its own slot
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamrnn.atomic import atomic_write
from streamrnn.engine.slots import SlotTable
from streamrnn.errors import CheckpointError, InvalidInputError
from streamrnn.protocol import MAX_SEQ, MAX_STREAM_ID_BYTES, ErrorCode

__all__ = ["CHECKPOINT_FORMAT", "TrainerCheckpoint", "atomic_savez", "checksum",
           "table_from"]

CHECKPOINT_FORMAT = 2
_READS = (1, 2)  # format 1: the same arrays without "checksum"
_CHECKSUM = "checksum"


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
        extra: JSON-able facts of the trainer's user (see the module docstring).
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
    extra: dict[str, Any] = field(default_factory=dict)

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
        if self.extra:
            meta["extra"] = self.extra
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> TrainerCheckpoint:
        """Parse :meth:`to_arrays` output; InvalidInputError (NOT_SUPPORTED) for another
        format, CheckpointError for a malformed one."""
        try:
            meta = json.loads(bytes(np.asarray(arrays["meta"], np.uint8)).decode())
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"checkpoint meta is unreadable: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") not in _READS:
            found = meta.get("format") if isinstance(meta, dict) else meta
            raise InvalidInputError(f"unknown checkpoint format {found}",
                                    ErrorCode.NOT_SUPPORTED)
        try:
            return cls._parse(arrays, meta)
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"checkpoint is malformed: {exc}") from exc

    @classmethod
    def _parse(cls, arrays: Mapping[str, np.ndarray], meta: dict) -> TrainerCheckpoint:
        streams = [_stream_row(row) for row in meta["streams"]]
        extra = _checked_extra(meta.get("extra", {}))
        return cls(
            weights=_numbered(arrays, "weight"),
            optimizer=_numbered(arrays, "optimizer"),
            states=_numbered(arrays, "state"),
            streams=streams,
            pending={s: np.asarray(arrays[f"pending/{i}"])
                     for i, (s, _, _) in enumerate(streams) if f"pending/{i}" in arrays},
            step=_count(meta["step"], "step"),
            version=_count(meta["version"], "version"),
            timesteps=_count(meta["timesteps"], "timesteps"),
            last_loss=float(meta["last_loss"]),
            config=meta.get("config", {}),
            optimizer_name=str(meta.get("optimizer", "")),
            extra=extra,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the file atomically (temp file, fsync, rename), with its checksum."""
        arrays = self.to_arrays()
        arrays[_CHECKSUM] = np.frombuffer(checksum(arrays), np.uint8)
        atomic_savez(path, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainerCheckpoint | None:
        """Read and verify ``path``; None if it does not exist.

        Raises CheckpointError for a truncated, edited or unreadable file (and
        InvalidInputError NOT_SUPPORTED for another format).
        """
        if not os.path.exists(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"trainer checkpoint {path} is unreadable (truncated or "
                                  f"not an .npz file): {exc}") from exc
        stored = arrays.pop(_CHECKSUM, None)
        checkpoint = cls.from_arrays(arrays)
        if stored is None and _format_of(arrays) != 1:
            raise CheckpointError(f"trainer checkpoint {path} has no checksum")
        if stored is not None and bytes(np.asarray(stored, np.uint8)) != checksum(arrays):
            raise CheckpointError(f"trainer checkpoint {path} is corrupted or was edited "
                                  "(SHA-256 mismatch)")
        return checkpoint

    def table(self, slots: int) -> SlotTable:
        """A SlotTable of ``slots`` rows with every stream in its saved slot."""
        return table_from(slots, self.streams)


def checksum(arrays: Mapping[str, np.ndarray]) -> bytes:
    """SHA-256 of named arrays: each name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(json.dumps([name, value.dtype.str, list(value.shape)]).encode())
        digest.update(value.tobytes())
    return digest.digest()


def _format_of(arrays: Mapping[str, np.ndarray]) -> object:
    return json.loads(bytes(np.asarray(arrays["meta"], np.uint8)).decode()).get("format")


def _count(value: Any, what: str) -> int:
    """A non-negative integer counter (bool, float and out-of-range values refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQ:
        raise ValueError(f"{what} must be an integer in 0..{MAX_SEQ}, got {value!r}")
    return value


def _stream_row(row: Any) -> tuple[str, int, int]:
    """``[stream, slot, steps]`` with a stream id of at most MAX_STREAM_ID_BYTES."""
    if not isinstance(row, list) or len(row) != 3 or not isinstance(row[0], str):
        raise ValueError(f"a stream row is [id, slot, steps], got {row!r:.80}")
    if len(row[0].encode()) > MAX_STREAM_ID_BYTES:
        raise ValueError(f"stream id longer than {MAX_STREAM_ID_BYTES} bytes")
    return row[0], _count(row[1], "slot"), _count(row[2], "steps")


def _checked_extra(extra: Any) -> dict[str, Any]:
    """The ``extra`` map with its known parts checked: ``sequences`` ``{stream: next_seq}``
    and ``log`` ``{"last_id": "<ms>-<n>", "applied": int, "streams": {stream: next_seq}}``."""
    if not isinstance(extra, dict):
        raise TypeError("extra must be a map")
    _check_seq_map(extra.get("sequences", {}), "sequences")
    log = extra.get("log")
    if log is not None:
        if not isinstance(log, dict) or not isinstance(log.get("last_id"), str):
            raise ValueError("log must be a map with a last_id")
        parts = log["last_id"].split("-")
        if len(parts) != 2 or not all(p.isdigit() and len(p) <= 20 for p in parts):
            raise ValueError(f"log last_id {log['last_id']!r:.40} is not a stream entry id")
        _count(log.get("applied"), "log applied")
        _check_seq_map(log.get("streams", {}), "log streams")
    return extra


def _check_seq_map(value: Any, what: str) -> None:
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be a map")
    for stream, seq in value.items():
        if len(stream.encode()) > MAX_STREAM_ID_BYTES:
            raise ValueError(f"{what}: stream id longer than {MAX_STREAM_ID_BYTES} bytes")
        _count(seq, f"{what} next_seq")


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
