"""Per-request and per-round limits that keep one client from taking a worker's time (pure:
no TensorFlow, no sockets).

* :func:`over_limits`: the I/O thread's check of a decoded request against the limits that
  are not the codec's: a chunk or prompt of more than ``MAX_CHUNK_STEPS`` timesteps
  (``TOO_LARGE``) and a GENERATE asking for more than the worker's
  ``--max-generate-steps`` (``BAD_VALUE``). The error travels with the request
  (``Work.invalid``) and the compute thread answers it after the sequence check, with
  ``expected`` like every other error about a stream.
* :func:`limit_generates`: one round runs GENERATE calls worth at most ``budget`` generated
  steps (at least one call) before its batched push step; the other GENERATEs, and
  everything after them of their streams, wait for the next round. Between two long
  GENERATEs the other streams' pushes are stepped, so a client sending many long
  GENERATEs delays them by one GENERATE call at most.

Example::

    work.invalid = over_limits(work.msg, max_generate_steps=4096)
    plan = limit_generates(plan_batch(batch, coalesce_steps=64), budget=4096)
"""

from __future__ import annotations

from streamrnn.codec import Message
from streamrnn.errors import InvalidInputError
from streamrnn.protocol import A_CHUNK, A_PROMPT, F_STEPS, MAX_CHUNK_STEPS, ErrorCode, MessageType
from streamrnn.serving.batching import GenerateGroup, Plan, Work

__all__ = ["limit_generates", "over_limits"]


def over_limits(msg: Message, max_generate_steps: int) -> InvalidInputError | None:
    """Why a PUSH or GENERATE exceeds the worker's limits, or None."""
    array = msg.arrays.get(A_CHUNK, msg.arrays.get(A_PROMPT))
    if array is not None and array.ndim and array.shape[0] > MAX_CHUNK_STEPS:
        return InvalidInputError(
            f"chunk of {array.shape[0]} steps exceeds {MAX_CHUNK_STEPS}; split it",
            ErrorCode.TOO_LARGE)
    if msg.type == MessageType.GENERATE and msg.header[F_STEPS] > max_generate_steps:
        return InvalidInputError(
            f"'steps' {msg.header[F_STEPS]} exceeds this worker's --max-generate-steps "
            f"{max_generate_steps}; ask in several GENERATEs", ErrorCode.BAD_VALUE)
    return None


def _generate_steps(item: Work | GenerateGroup) -> int:
    """Generated steps (loop iterations) one item of a plan's ``before`` runs."""
    if isinstance(item, GenerateGroup):
        return item.options[0] if any(w.invalid is None for w in item.works) else 0
    if item.type == MessageType.GENERATE and item.invalid is None:
        return int(item.msg.header[F_STEPS])
    return 0


def limit_generates(plan: Plan, budget: int) -> Plan:
    """``plan`` with at most ``budget`` generated steps before its push step (at least one
    GENERATE call); the GENERATEs beyond, and every later request of their streams in
    the batch, are moved to ``later`` (``budget <= 0``: no limit)."""
    if budget <= 0:
        return plan
    spent = 0
    kept: list[Work | GenerateGroup] = []
    deferred: list[Work] = []
    blocked: set[str] = set()
    for item in plan.before:
        works = item.works if isinstance(item, GenerateGroup) else (item,)
        streams = {w.stream for w in works}
        steps = _generate_steps(item)
        if streams & blocked or (steps and spent and spent + steps > budget):
            blocked |= streams
            deferred += works
            continue
        kept.append(item)
        spent += steps
    if not deferred:
        return plan
    runs = [run for run in plan.runs if run[0].stream not in blocked]
    held = [w for run in plan.runs if run[0].stream in blocked for w in run]
    return Plan(stats=plan.stats, before=kept, runs=runs,
                later=[*plan.later, *deferred, *held], batch=plan.batch)
