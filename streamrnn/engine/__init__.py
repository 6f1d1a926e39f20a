"""The in-process engine: :class:`~streamrnn.engine.engine.Engine` and what it is made of.

Modules: ``interface`` (the protocols every engine-like object and executor meets),
``engine`` (Engine), ``backends`` (which executor: auto, ONNX Runtime, torch, Keras),
``versions`` (weights versions converted once per executor; the Keras clone kept in step),
``slots`` (stream -> slot table), ``residency`` (resident or swapped to host memory),
``state`` (the Keras executor's state rows), ``validation`` (chunk checks), ``sampling``
(pure feedback and sampling rules), ``token_ops`` (token picking in TF ops), ``generate``
(closed-loop decoding), ``seq2seq`` (encoder-decoder engine), ``weights`` (follow and pin
weight versions), ``weight_files`` (publish / read ``weights-v{N}.npz`` files, signed with
an optional HMAC key). ``interface``, ``slots``, ``residency``,
``validation`` and ``sampling`` import no TensorFlow.

Importing this package imports no TensorFlow; ``Engine`` is loaded on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Engine"]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from streamrnn.engine.engine import Engine

        return Engine
    raise AttributeError(f"module 'streamrnn.engine' has no attribute {name!r}")
