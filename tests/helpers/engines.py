"""Engines on each executor, for the tests that run one contract under all of them.

``EXECUTORS`` parametrizes a test by executor; :func:`engine_on` builds the engine and skips
the test when the executor is torch and torch is not installed (an optional extra).
"""

from __future__ import annotations

from typing import Any

import keras
import pytest

from streamrnn import Engine

EXECUTORS = ["keras", "onnxruntime", "torch"]


def torch_installed() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def engine_on(executor: str, model: keras.Model, slots: int, **options: Any) -> Engine:
    """``Engine.from_keras(model, slots, executor=executor, **options)``; torch: skipped
    where it is not installed."""
    if executor == "torch":
        pytest.importorskip("torch")
    return Engine.from_keras(model, slots=slots, executor=executor, **options)
