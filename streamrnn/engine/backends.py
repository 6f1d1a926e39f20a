"""Which executor an engine steps through, and building it.

``executor=`` names one of :data:`EXECUTORS`:

- ``"auto"`` (default): on CPU, ONNX Runtime when its graph covers the model, else Keras;
  on a GPU, torch (cuDNN) when torch is installed and covers the model, else Keras (TF
  cuDNN). When it falls back, :attr:`ExecutorChoice.fallback` says why (the engine reports
  it as ``stats()["executor_fallback"]``) and one INFO line on logger ``streamrnn.engine``
  says so. With ``precision="bf16"`` auto means torch (the only executor with a bf16 mode).
- ``"onnxruntime"``, ``"torch"``, ``"keras"``: that one, or an error with the reason
  (:class:`~streamrnn.UnsupportedModelError` when it cannot run the model,
  :class:`~streamrnn.NotSupportedError` when torch is not installed or a precision is not
  offered): explicit means explicit.

"On a GPU": TensorFlow sees one, or an NVIDIA driver is loaded and torch sees CUDA (torch is
imported only then, or when named). ``threads`` sets the ONNX Runtime intra-op threads and
torch's CPU threads (default ``os.cpu_count()``); the Keras executor ignores it.

The Keras serving clone is built for every executor (it holds the model facts, runs
generation and checks weight formats); the ONNX Runtime and torch executors are built from
the model it was cloned from (``serving.source``), with the clone's weights.

Example::

    choice = build_executor(serving, "auto", max_bucket=64, jit_compile=True)
    choice.executor.name, choice.fallback     # ("keras", "masking: layer 'embedding' ...")
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamrnn.engine.interface import EXECUTORS, PRECISIONS, Executor
from streamrnn.errors import NotSupportedError, UnsupportedModelError
from streamrnn.executors.keras_runner import ModelRunner, gpu_available
from streamrnn.executors.models import ServingModel
from streamrnn.executors.onnx_layers import OnnxUnsupported

__all__ = ["ExecutorChoice", "build_executor", "on_gpu"]

log = logging.getLogger("streamrnn.engine")


@dataclass(frozen=True)
class ExecutorChoice:
    """The executor built, and why ``auto`` did not pick its first choice (None if it did,
    or when the executor was named)."""

    executor: Executor
    fallback: str | None = None


class _Unavailable(Exception):
    """An executor cannot run this model here; ``reason`` says why (``missing``: it is not
    installed, rather than unable to map the model)."""

    def __init__(self, reason: str, missing: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.missing = missing


def on_gpu() -> bool:
    """Whether ``auto`` plans for a GPU (see the module docstring)."""
    if gpu_available():
        return True
    return Path("/proc/driver/nvidia/version").exists() and _torch_cuda()


def _torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def _torch_cuda() -> bool:
    if not _torch_installed():
        return False
    import torch

    return bool(torch.cuda.is_available())


def build_executor(serving: ServingModel, executor: str = "auto", *, max_bucket: int = 64,
                   jit_compile: bool = True, threads: int | None = None,
                   precision: str = "float32") -> ExecutorChoice:
    """Build the executor ``executor`` names for ``serving`` (see the module docstring)."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor={executor!r}: expected one of {', '.join(EXECUTORS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    options = {"max_bucket": max_bucket, "threads": threads}
    if precision != "float32":
        if executor not in ("auto", "torch"):
            raise NotSupportedError(
                f"precision={precision!r} runs on the torch executor only; executor="
                f"{executor!r} computes in float32 (use executor='torch' or 'auto')")
        return ExecutorChoice(_named(serving, "torch", options | {"precision": precision}))
    if executor == "keras":
        return ExecutorChoice(ModelRunner(serving, max_bucket=max_bucket,
                                          jit_compile=jit_compile))
    if executor != "auto":
        return ExecutorChoice(_named(serving, executor, options))
    first = "torch" if on_gpu() else "onnxruntime"
    try:
        chosen = _build(serving, first, options)
    except _Unavailable as exc:
        fallback = f"{first}: {exc.reason}"
    else:
        log.debug("executor: %s (auto)", first)
        return ExecutorChoice(chosen)
    log.info("executor: keras (auto; %s)", fallback)
    return ExecutorChoice(ModelRunner(serving, max_bucket=max_bucket, jit_compile=jit_compile),
                          fallback)


def _named(serving: ServingModel, name: str, options: dict[str, Any]) -> Executor:
    """The executor ``name``, or the error that says why it cannot run ``serving``."""
    try:
        return _build(serving, name, options)
    except _Unavailable as exc:
        if exc.missing:
            raise NotSupportedError(f"executor={name!r}: {exc.reason}") from exc
        raise UnsupportedModelError(
            f"executor={name!r} cannot run model {serving.name!r}: {exc.reason} "
            "(executor='keras' runs it; executor='auto' falls back to Keras)") from exc


def _build(serving: ServingModel, name: str, options: dict[str, Any]) -> Executor:
    if serving.source is None:
        raise _Unavailable("the serving clone has no source model to build a graph from")
    if name == "onnxruntime":
        from streamrnn.executors.ort import OrtExecutor

        try:
            return OrtExecutor(serving.source, serving.slots, weights=serving.get_weights(),
                               **options)
        except (OnnxUnsupported, UnsupportedModelError) as exc:
            raise _Unavailable(str(exc)) from exc
    return _build_torch(serving, options)


def _build_torch(serving: ServingModel, options: dict[str, Any]) -> Executor:
    if not _torch_installed():
        raise _Unavailable("torch is not installed (pip install 'streamrnn[torch]')",
                           missing=True)
    from streamrnn.executors.torch_rnn import TorchExecutor
    from streamrnn.executors.torch_spec import TorchUnsupported, spec_from_keras

    try:
        spec, _ = spec_from_keras(serving.source)
    except (TorchUnsupported, UnsupportedModelError) as exc:
        raise _Unavailable(str(exc)) from exc
    device = "cuda" if _torch_cuda() else "cpu"
    return TorchExecutor(spec, serving.get_weights(), serving.slots, device=device, **options)
