"""The torch executor: ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` on CPU or CUDA (cuDNN on or off).

:class:`TorchExecutor` (``name == "torch"``) runs a :class:`~streamrnn.executors.torch_layers.
TorchChain` built from a :class:`~streamrnn.executors.torch_spec.ModelSpec` and Keras-layout
weights. :meth:`TorchExecutor.from_keras` converts a Keras model (TensorFlow is imported
there only); the spec path needs no TensorFlow, so a GPU machine with torch alone runs it.

State: :class:`TorchStateBank`, one ``(slots, units)`` tensor per recurrent state (h and c
per LSTM cell, h per GRU / SimpleRNN cell, in the Keras serving clone's order, so snapshots
move between executors) on the executor's device (host memory on CPU). A step gathers the
busy slots' rows only, steps them (packed when their lengths differ: each row's state is
taken at its own last valid step) and scatters the new states back; idle rows are never
read or written.

CUDA: ``cudnn=True`` runs under ``torch.backends.cudnn.flags(enabled=True)`` (the cuDNN RNN
kernels), ``cudnn=False`` under ``enabled=False`` (torch's own per-step kernels), so one
engine can measure both. TF32 stays off (``tf32=False``) to keep float32 results within
1e-5 of Keras.

Reduced precision (opt-in, never the default): ``precision="bf16"`` keeps the weights of the
recurrent cells, Dense and Embedding in bf16 and runs their GEMMs in bf16 (norms and
activations stay float32: :mod:`~streamrnn.executors.torch_layers`). It is accepted where bf16
math is fast: a CPU with AMX (``amx_bf16``) or AVX512-BF16 (``avx512_bf16``), or a CUDA device
with bf16 support (:func:`~streamrnn.executors.precision.bf16_missing` decides, from the
facts :func:`host_bf16_facts` reads); anywhere else the constructor raises
:class:`~streamrnn.executors.precision.PrecisionUnsupported` naming what is missing
(on AVX2 torch computes bf16 too, by emulation: slower than float32, so it is refused).
State between chunks: the state bank keeps float32 rows, as with ``precision="float32"`` (so
snapshots move between executors and precisions unchanged); a step casts the gathered rows to
bf16 and the new states back. torch's CPU kernel carries its states in bf16 from step to step
inside a chunk anyway, so there the chunk boundary adds no rounding (bf16 -> float32 -> bf16 is
exact) and a stream's results do not depend on its chunking (measured: a 2,000-step stream in
random chunks of 1..64 equals one bf16 call on the whole stream bit for bit); a kernel that
keeps the cell state in float32 inside a chunk (oneDNN, cuDNN may) rounds it once per chunk,
the size of one step's rounding. A row restored from a float32 snapshot is rounded once.
Accuracy: the contract is streamed == offline float32 Keras within ``BF16_TOLERANCE``
(``|got - want| <= 2e-2 + 2e-2 * |want|``); the error comes from rounding the weights and each
step's activations and does not grow with the stream's length (2,000 steps, LSTM/GRU(256):
max abs 0.004-0.007 vs float32 in every 200-step window; tests/executors/test_precision.py).

Threads (CPU): ``torch.set_num_threads(threads)`` is process-wide (default: all cores).
torch's OpenMP runtime (GNU libgomp in the pip wheels) spins its waiting threads by default;
beside other busy threads on few cores a spinning pool collapses (measured 10x slower).
libgomp reads its wait policy once, when torch loads, so importing this module (or
:mod:`~streamrnn.executors.torch_layers`) before anything else imports torch puts
``OMP_WAIT_POLICY=PASSIVE`` in the environment unless it is set already. To keep spinning,
start the process with ``OMP_WAIT_POLICY=ACTIVE``; if torch was imported first, set the
policy in the shell or the service file. (``KMP_BLOCKTIME`` is Intel OpenMP's; libgomp
ignores it; ``GOMP_SPINCOUNT=0`` is PASSIVE's spin count.)

Example::

    ex = TorchExecutor.from_keras(model, slots=64)       # or TorchExecutor(spec, weights, 64)
    out = ex.run({0: chunk_a, 5: chunk_b}, bucket=16)    # {slot: (t, output_dim)}
    ex.state.reset([5])
    ex.set_weights(new_model.get_weights())               # copied in place, no rebuild
    pinned = ex.convert_weights(old_weights)               # {parameter: tensor on the device}
    out = ex.run({3: chunk_c}, bucket=16, weights=pinned)  # this step only (functional_call)
    TorchExecutor.from_keras(model, slots=64, precision="bf16")  # AMX / AVX512-BF16 / CUDA
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Mapping, Sequence
from typing import Any

# libgomp reads its wait policy once, when torch loads (module docstring: Threads)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

from streamrnn.executors.buckets import bucket_sizes
from streamrnn.executors.padding import pad_chunks
from streamrnn.executors.precision import PrecisionUnsupported, bf16_missing, cpu_flags
from streamrnn.executors.rows import StateSnapshot, slot_indices
from streamrnn.executors.torch_layers import TorchChain
from streamrnn.executors.torch_spec import (
    LayerSpec,
    ModelSpec,
    TorchUnsupported,
    spec_from_keras,
)

__all__ = [
    "LayerSpec",
    "ModelSpec",
    "PRECISIONS",
    "PrecisionUnsupported",
    "TorchExecutor",
    "TorchStateBank",
    "TorchUnsupported",
    "host_bf16_facts",
]

_KIND_NAMES = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}

#: precision name -> the dtype of the GEMM weights and math
PRECISIONS: dict[str, torch.dtype] = {"float32": torch.float32, "bf16": torch.bfloat16}


def host_bf16_facts(device: torch.device) -> tuple[Collection[str], bool]:
    """This machine's CPU flags and, on CUDA, the device's bf16 support (for
    :func:`bf16_missing`): /proc/cpuinfo where there is one, plus torch's own probes."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(cpu_flags(f.read()))
    except OSError:
        flags = set()
    # torch's cpuinfo probes (every AMX CPU has amx_bf16 with amx_tile)
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    flags |= {flag for flag, probe in probes.items()
              if getattr(torch.cpu, probe, lambda: False)()}
    return flags, device.type == "cuda" and torch.cuda.is_available() and _cuda_bf16()


def _cuda_bf16() -> bool:
    """The current CUDA device computes bf16 natively (Ampere+; not torch's emulation)."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.4: no emulation, no argument
        return torch.cuda.is_bf16_supported()


def _check_precision(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of ``precision`` on ``device``; ValueError / PrecisionUnsupported."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if precision != "float32":
        missing = bf16_missing(device.type, *host_bf16_facts(device))
        if missing:
            raise PrecisionUnsupported(precision, str(device), missing)
    return PRECISIONS[precision]


class TorchStateBank:
    """Row-wise reset/read/write/snapshot/restore of ``(slots, units)`` tensors on one
    device (a :class:`~streamrnn.engine.interface.StateRows`); rows start at zeros.

    ``read`` returns host numpy copies, ``write`` takes numpy rows; the executor itself
    uses :meth:`gather` / :meth:`scatter`, which stay on the device.
    """

    def __init__(self, units: Sequence[int], slots: int, device: torch.device | str = "cpu"):
        if not units:
            raise ValueError("TorchStateBank needs at least one state")
        self.slots = slots
        self.device = torch.device(device)
        self.tensors = [torch.zeros(slots, u, device=self.device) for u in units]
        self.initial_rows: StateSnapshot = [np.zeros(u, np.float32) for u in units]

    @property
    def nbytes_per_slot(self) -> int:
        return sum(r.nbytes for r in self.initial_rows)

    def index(self, slots: Sequence[int]) -> torch.Tensor:
        """``slots`` as an int64 index tensor on the device (IndexError when out of range)."""
        return torch.from_numpy(slot_indices(slots, self.slots, np.int64)).to(self.device)

    def gather(self, index: torch.Tensor) -> list[torch.Tensor]:
        return [t.index_select(0, index) for t in self.tensors]

    def scatter(self, index: torch.Tensor, rows: Sequence[torch.Tensor]) -> None:
        for t, r in zip(self.tensors, rows, strict=True):
            t.index_copy_(0, index, r)

    def reset(self, slots: Sequence[int]) -> None:
        """Put ``slots`` back to the initial state (zeros); every other row is untouched."""
        index = self.index(slots)
        for t in self.tensors:
            t.index_fill_(0, index, 0.0)

    def read(self, slots: Sequence[int]) -> list[np.ndarray]:
        """One host array ``(len(slots), units)`` per state (copies)."""
        return [r.cpu().numpy() for r in self.gather(self.index(slots))]

    def write(self, slots: Sequence[int], rows: Sequence[np.ndarray]) -> None:
        """Overwrite the rows of ``slots`` (``rows[k]`` is ``(len(slots), units_k)``)."""
        if len(rows) != len(self.tensors):
            raise ValueError(f"expected {len(self.tensors)} state arrays, got {len(rows)}")
        index = self.index(slots)
        values = [np.asarray(r, np.float32) for r in rows]
        for t, v in zip(self.tensors, values, strict=True):
            if v.shape != (len(index), t.shape[1]):
                raise ValueError(f"state rows of shape {v.shape}; expected "
                                 f"{(len(index), t.shape[1])}")
        self.scatter(index, [torch.from_numpy(v).to(self.device) for v in values])

    def snapshot(self, slot: int) -> StateSnapshot:
        """A copy of one slot's state, one numpy row per state."""
        return [a[0] for a in self.read([slot])]

    def restore(self, slot: int, snapshot: StateSnapshot) -> None:
        """Make ``slot`` continue from ``snapshot`` (from any slot of the same model)."""
        self.write([slot], [np.asarray(r)[None] for r in snapshot])


class TorchExecutor:
    """Runs a layer chain with torch over ``slots`` state rows.

    Args:
        spec: the layer chain (:meth:`from_keras` makes it from a Keras model).
        weights: Keras-layout weights, in ``spec.weight_shapes()`` order.
        slots: state rows (concurrent streams).
        max_bucket: longest chunk a step takes (buckets are powers of two up to it).
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:1"``, ...).
        cudnn: on CUDA, run the recurrent layers with cuDNN (False: torch's own kernels).
        threads: CPU intra-op threads (process-wide; default ``os.cpu_count()``).
        tf32: allow TF32 math in cuDNN (faster on Ampere+, but not within 1e-5 of Keras).
        precision: ``"float32"`` (default: within 1e-5 of Keras) or ``"bf16"`` (GEMMs in
            bf16 where the device does them fast; within :data:`BF16_TOLERANCE`).

    Raises:
        PrecisionUnsupported: ``precision="bf16"`` on a device without fast bf16 math.
    """

    name = "torch"

    def __init__(self, spec: ModelSpec, weights: Sequence[np.ndarray], slots: int, *,
                 max_bucket: int = 64, device: str = "cpu", cudnn: bool = True,
                 threads: int | None = None, tf32: bool = False, precision: str = "float32"):
        self.spec = spec
        self.slots = slots
        self.max_bucket = max_bucket
        self.buckets = bucket_sizes(max_bucket)
        self.torch_device = torch.device(device)
        self.dtype = _check_precision(precision, self.torch_device)
        self.precision = precision
        self.cudnn = cudnn
        self.tf32 = tf32
        self.threads = threads or os.cpu_count() or 1
        if self.torch_device.type == "cpu":
            torch.set_num_threads(self.threads)
        self.chain = TorchChain(spec, self.dtype).to(self.torch_device).eval()
        self.chain.load(weights)
        self.state = TorchStateBank(spec.state_units(), slots, self.torch_device)
        self._dtype = np.int64 if spec.input_kind == "tokens" else np.float32
        self._feature_shape = () if spec.input_kind == "tokens" else (spec.input_dim,)
        self.steps_run = 0
        self.timesteps_run = 0
        self.trace_count = 0  # nothing is traced

    @classmethod
    def from_keras(cls, model: Any, slots: int, **options: Any) -> TorchExecutor:
        """The executor of a built Keras model (or ``.keras`` path).

        Raises:
            UnsupportedModelError: the model cannot stream.
            TorchUnsupported: it streams but some part has no torch equivalent (use Keras).
        """
        spec, weights = spec_from_keras(model)
        return cls(spec, weights, slots, **options)

    @property
    def input_kind(self) -> str:
        return self.spec.input_kind

    @property
    def input_dim(self) -> int:
        return self.spec.input_dim

    @property
    def output_dim(self) -> int:
        return self.spec.output_dim

    @property
    def device(self) -> str:
        """``"GPU"`` on CUDA, else ``"CPU"``."""
        return "GPU" if self.torch_device.type == "cuda" else "CPU"

    @property
    def kernel(self) -> str:
        """What runs, e.g. ``"LSTM torch on CUDA, cuDNN"``, ``"LSTM torch on CPU (2 threads)"``
        (``", bf16"`` added in reduced precision)."""
        kinds = "+".join(sorted({_KIND_NAMES[s.kind] for s in self.spec.layers
                                 if s.kind in _KIND_NAMES}))
        bf16 = "" if self.precision == "float32" else f", {self.precision}"
        if self.device == "GPU":
            return f"{kinds} torch on CUDA, {'cuDNN' if self.cudnn else 'no cuDNN'}{bf16}"
        return f"{kinds} torch on CPU ({self.threads} threads{bf16})"

    def convert_weights(self, weights: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        """Keras-order weights -> parameters on the device (in each parameter's dtype), for
        :meth:`run`'s ``weights`` (keep one per pinned version). ValueError if a count or
        shape differs."""
        return {name: torch.from_numpy(a).to(self.torch_device,
                                             self.chain.get_parameter(name).dtype)
                for name, a in self.chain.convert(weights).items()}

    def set_weights(self, weights: Sequence[np.ndarray] | Mapping[str, torch.Tensor]) -> None:
        """Run later steps with ``weights``: a Keras ``get_weights()`` list (same shapes as
        the model's) or parameters from :meth:`convert_weights`, copied into the existing
        modules (no rebuild); states are kept. ValueError if a count or shape differs."""
        if not isinstance(weights, Mapping):
            self.chain.load(weights)
            return
        with torch.no_grad():
            for name, value in weights.items():
                self.chain.get_parameter(name).copy_(value)

    def backend_flags(self) -> contextlib.AbstractContextManager[Any]:
        """The cuDNN settings a step runs under (on CUDA: cuDNN on or off, no TF32)."""
        if self.torch_device.type != "cuda":
            return contextlib.nullcontext()
        return torch.backends.cudnn.flags(enabled=self.cudnn, benchmark=False,
                                          deterministic=False, allow_tf32=self.tf32)

    def run(self, chunks: Mapping[int, np.ndarray], bucket: int,
            weights: Mapping[str, torch.Tensor] | None = None) -> dict[int, np.ndarray]:
        """One step for the slots in ``chunks``.

        Args:
            chunks: slot -> validated chunk ``(t, D)`` float32 or ``(t,)`` int ids,
                ``t <= bucket``.
            bucket: upper bound of the chunk lengths (the batch is padded to the longest).
            weights: parameters from :meth:`convert_weights` for this step only (default:
                the current weights).

        Returns:
            slot -> outputs ``(t, output_dim)`` float32 (copies). A chunk of length 0 gets
            ``(0, output_dim)`` and its slot is not stepped.
        """
        batch = pad_chunks(chunks, bucket, self._feature_shape, self._dtype, np.int64)
        if not batch.slots:
            return batch.outputs(None, self.output_dim)
        ragged = None if batch.lengths.min() == batch.x.shape[1] else torch.from_numpy(
            batch.lengths)
        y = self._step(batch.x, ragged, self.state.index(batch.slots), weights)
        return batch.outputs(y, self.output_dim)

    def run_rows(self, slots: Sequence[int], x: np.ndarray,
                 weights: Mapping[str, torch.Tensor] | None = None) -> np.ndarray:
        """One step of full rows (no padding): ``x`` ``(n, T, D)`` float32 or ``(n, T)``
        ids, row ``i`` for ``slots[i]`` (distinct, ``n >= 1``) -> outputs
        ``(n, T, output_dim)``. Generation's per-token call."""
        x = np.ascontiguousarray(x, self._dtype)
        return self._step(x, None, self.state.index(slots), weights)

    def _step(self, x: np.ndarray, lengths: torch.Tensor | None, index: torch.Tensor,
              weights: Mapping[str, torch.Tensor] | None) -> np.ndarray:
        """Run the chain on the gathered rows ``index``, scatter their states back, count
        the step and its valid timesteps (``lengths`` None: every row is full)."""
        with torch.inference_mode(), self.backend_flags():
            args = (torch.from_numpy(x).to(self.torch_device), lengths,
                    self.state.gather(index))
            y, states = (self.chain(*args) if weights is None else
                         torch.func.functional_call(self.chain, dict(weights), args))
            self.state.scatter(index, states)
            self.steps_run += 1
            self.timesteps_run += (x.shape[0] * x.shape[1] if lengths is None
                                   else int(lengths.sum()))
            return y.cpu().numpy()

    def warmup(self) -> None:
        """Run every bucket once on all slots (states untouched): allocators and, on CUDA,
        the cuDNN plans warm up before serving."""
        with torch.inference_mode(), self.backend_flags():
            for b in self.buckets:
                x = torch.from_numpy(np.zeros((self.slots, b, *self._feature_shape),
                                              self._dtype)).to(self.torch_device)
                self.chain(x, None, [torch.zeros_like(t) for t in self.state.tensors])
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize(self.torch_device)
