"""Published weights on disk: ``weights-v{N}.npz`` files and the ``LATEST`` pointer.

A publish directory holds ``weights-v{N}.npz`` files (the model's ``get_weights()`` list as
``w0, w1, ...`` plus a JSON ``meta`` entry) and a ``LATEST`` file naming the newest one.
Both are written atomically (temp file, fsync, rename), weights file first, so a reader
that follows ``LATEST`` always finds a whole file.

A file is something from elsewhere: :func:`load_weights` reads it with
``allow_pickle=False`` and turns anything unreadable (a pickled object array, a missing
entry, bad JSON, a non-numeric array) into one :class:`~streamrnn.errors.InvalidInputError`
naming the file. With a ``key`` (the trainer's and workers' ``--checkpoint-key``), a
publisher adds an ``hmac`` entry, the HMAC-SHA256 of every array's name, dtype, shape and
bytes, and a reader refuses a file without it or with another.

Example::

    publish_weights("pub", model.get_weights(), version=3, key=key)
    weights, meta = load_weights("pub", key=key)    # the latest: [(units, ...), ...], {...}
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from streamrnn.atomic import atomic_write
from streamrnn.errors import InvalidInputError
from streamrnn.protocol import ErrorCode

__all__ = [
    "LATEST",
    "latest_version",
    "list_versions",
    "load_weights",
    "publish_weights",
    "weights_digest",
    "weights_filename",
]

LATEST = "LATEST"
_NAME = re.compile(r"^weights-v(\d+)\.npz$")
_HMAC = "hmac"


def weights_filename(version: int) -> str:
    """The file name of weights ``version`` in a publish directory."""
    return f"weights-v{int(version)}.npz"


def weights_digest(key: bytes, arrays: Mapping[str, np.ndarray]) -> bytes:
    """HMAC-SHA256 under ``key`` of ``arrays`` (name -> array; the ``hmac`` entry left out),
    in name order: each one's name, dtype, shape and bytes."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for name in sorted(arrays):
        if name == _HMAC:
            continue
        array = np.ascontiguousarray(arrays[name])
        head = json.dumps([name, array.dtype.str, list(array.shape)]).encode()
        mac.update(len(head).to_bytes(8, "little") + head)
        mac.update(array.nbytes.to_bytes(8, "little"))
        mac.update(array.tobytes())
    return mac.digest()


def publish_weights(
    directory: str | os.PathLike, weights: list[np.ndarray], version: int,
    meta: Mapping[str, Any] | None = None, keep: int = 5, key: bytes | None = None,
) -> Path:
    """Write ``weights`` as version ``version`` and point ``LATEST`` at it.

    Older versions beyond the newest ``keep`` are deleted (``keep=0`` keeps all). With
    ``key``, the file carries the weights' HMAC-SHA256 (:func:`weights_digest`).
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
    if key is not None:
        arrays[_HMAC] = np.frombuffer(weights_digest(key, arrays), np.uint8)
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
        raise InvalidInputError(f"{LATEST} in {directory} names {name[:80]!r}, not a weights "
                                "file", ErrorCode.BAD_VALUE)
    return int(match.group(1))


def _read(path: Path) -> dict[str, np.ndarray]:
    """Every entry of the ``.npz`` at ``path`` (no pickles), or InvalidInputError."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise
    except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise InvalidInputError(f"weights file {path} cannot be read safely: {exc}",
                                ErrorCode.BAD_VALUE) from None


def _check_signed(path: Path, arrays: Mapping[str, np.ndarray], key: bytes) -> None:
    mac = arrays.get(_HMAC)
    if mac is None:
        raise InvalidInputError(f"weights file {path} is not signed (published without a "
                                "checkpoint key), but a key is configured: refused",
                                ErrorCode.BAD_VALUE)
    if not hmac.compare_digest(weights_digest(key, arrays), np.asarray(mac).tobytes()):
        raise InvalidInputError(f"weights file {path} fails its HMAC check: published under "
                                "another key, or forged", ErrorCode.BAD_VALUE)


def _unpack(path: Path, arrays: Mapping[str, np.ndarray]
            ) -> tuple[list[np.ndarray], dict[str, Any]]:
    n = sum(1 for k in arrays if re.fullmatch(r"w\d+", k))
    try:
        weights = [arrays[f"w{i}"] for i in range(n)]
        meta = json.loads(bytes(arrays["meta"]).decode())
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"weights file {path} is malformed: {exc!r}",
                                ErrorCode.BAD_VALUE) from None
    for i, w in enumerate(weights):
        if w.dtype.kind not in "fiu":
            raise InvalidInputError(f"weights file {path}: w{i} holds {w.dtype} values, not "
                                    "numbers", ErrorCode.BAD_VALUE)
    if not isinstance(meta, dict):
        raise InvalidInputError(f"weights file {path}: meta is not a map", ErrorCode.BAD_VALUE)
    return weights, meta


def load_weights(directory: str | os.PathLike, version: int | None = None,
                 key: bytes | None = None) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The weights list and meta of ``version`` (default: the latest).

    InvalidInputError (BAD_VALUE) if the file is missing, unreadable, malformed, or with
    ``key`` not signed with it; FileNotFoundError if it vanished while being read."""
    if version is None:
        version = latest_version(directory)
        if version is None:
            raise InvalidInputError(f"no weights published in {directory}", ErrorCode.BAD_VALUE)
    path = Path(directory) / weights_filename(version)
    if not path.exists():
        raise InvalidInputError(f"weights version {version} is not in {directory} (have "
                                f"{list_versions(directory)})", ErrorCode.BAD_VALUE)
    arrays = _read(path)
    if key is not None:
        _check_signed(path, arrays, key)
    return _unpack(path, arrays)
