"""Reduced precision: which devices do bf16 math fast (pure: no torch, no TensorFlow).

An executor asked for ``precision="bf16"`` computes its GEMMs in bf16 only where that is
fast: a CPU with AMX (flag ``amx_bf16``) or AVX512-BF16 (``avx512_bf16``), or a CUDA device
with bf16 support. :func:`bf16_missing` decides from facts the executor gathers (CPU flags,
the CUDA probe) and names what is missing; the executor raises :class:`PrecisionUnsupported`
with it. bf16 is never a default, and a refusal never falls back quietly.

Example::

    flags = cpu_flags(open("/proc/cpuinfo").read())     # frozenset({"avx2", ...})
    missing = bf16_missing("cpu", flags, cuda_bf16=False)
    if missing:                                         # "a CPU with AMX or AVX512-BF16 ..."
        raise PrecisionUnsupported("bf16", "cpu", missing)
"""

from __future__ import annotations

from collections.abc import Collection

from streamrnn.errors import NotSupportedError

__all__ = [
    "BF16_CPU_FLAGS",
    "BF16_TOLERANCE",
    "PrecisionUnsupported",
    "bf16_missing",
    "cpu_flags",
]

#: CPU flags (/proc/cpuinfo names) of which one makes bf16 GEMMs fast
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
#: streamed bf16 vs offline float32 Keras: ``|got - want| <= atol + rtol * |want|``
BF16_TOLERANCE = {"atol": 2e-2, "rtol": 2e-2}


class PrecisionUnsupported(NotSupportedError):
    """A reduced precision was asked for where it is not fast (or not computable).

    Not a :class:`TorchUnsupported`: the caller asked for it explicitly, so nothing should
    fall back quietly. ``kind`` is ``"precision"``; ``missing`` says what the device lacks.
    """

    kind = "precision"

    def __init__(self, precision: str, device: str, missing: str):
        super().__init__(f"precision={precision!r} on {device} needs {missing}; "
                         f"use precision='float32' (the default)")
        self.precision = precision
        self.device = device
        self.missing = missing


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The ``flags`` of a ``/proc/cpuinfo`` text (empty when it has none)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def bf16_missing(device_type: str, flags: Collection[str], cuda_bf16: bool) -> str | None:
    """What a device lacks for fast bf16 math, or None when it has it (pure).

    Args:
        device_type: ``"cpu"`` or ``"cuda"``.
        flags: the CPU's flags (/proc/cpuinfo names, e.g. ``{"avx2", "amx_bf16"}``).
        cuda_bf16: the CUDA device computes bf16 (``torch.cuda.is_bf16_supported()``).
    """
    if device_type == "cuda":
        return None if cuda_bf16 else "a CUDA device with bf16 support (Ampere or later)"
    if device_type != "cpu":
        return f"a CPU or CUDA device (got {device_type!r})"
    if any(f in flags for f in BF16_CPU_FLAGS):
        return None
    return "a CPU with AMX or AVX512-BF16 (flag amx_bf16 or avx512_bf16; this one has neither)"
